"""Webdataset shards: write from a source, read back (local files, workers), refused URLs, corrupt samples; token shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dalle_framework import UsageError
from dalle_framework.data import (
    load_split,
    load_token_shard,
    save_token_shard,
    write_shards,
)


@pytest.fixture(scope="module")
def data_registry():
    from dalle_framework.plugins import PluginManager

    return PluginManager().registry("data")


def build(registry, name, **params):
    return registry.build({"name": name, "params": params})


@pytest.fixture(scope="module")
def shapes(data_registry):
    return build(data_registry, "shapes", samples_per_caption=1, heldout_samples_per_caption=2)


@pytest.fixture(scope="module")
def shard_dir(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    stats = write_shards(shapes, out, max_per_shard=30, progress=False)
    return out, stats


def test_write_shards_layout(shapes, shard_dir):
    out, stats = shard_dir
    assert stats["train"]["count"] == shapes.size("train") == 95
    assert stats["train"]["shards"] == 4 and stats["heldout"] == {
        "count": 20,
        "shards": 1,
        "pattern": str(out / "heldout-000000.tar"),
    }
    assert stats["train"]["pattern"] == str(out / "train-{000000..000003}.tar")
    assert sorted(p.name for p in out.glob("*.tar")) == ["heldout-000000.tar"] + [
        f"train-00000{i}.tar" for i in range(4)
    ]
    with tarfile.open(out / "train-000001.tar") as tar:
        names = tar.getnames()
    assert sorted(names[:3]) == ["000030.json", "000030.png", "000030.txt"] and len(names) == 90
    assert json.loads((out / "stats.json").read_text())["train"]["count"] == 95


def test_round_trip_through_webdataset_source(data_registry, shapes, shard_dir):
    out, stats = shard_dir
    src = build(
        data_registry, "webdataset", train_urls=stats["train"]["pattern"], heldout_urls=stats["heldout"]["pattern"]
    )
    assert src.size("train") == 95 and src.size("heldout") == 20, "sizes from stats.json"
    part = build(data_registry, "webdataset", train_urls=str(out / "train-{000000..000001}.tar"))
    assert part.size("train") is None, "a subset of the shards: size unknown"
    for split in ("train", "heldout"):
        want_images, want_captions = load_split(shapes, split, progress=False)
        got_images, got_captions = load_split(src, split, progress=False)
        assert got_captions == want_captions
        assert torch.equal(got_images, want_images), "PNG is lossless"
    assert src.skipped == 0


@pytest.mark.parametrize("url", ["pipe:touch {marker}", "PIPE:touch {marker}", "https://example.com/a.tar", "s3://bucket/a.tar"])
def test_urls_that_run_commands_or_reach_the_network_are_refused(data_registry, shard_dir, tmp_path, url):
    from pydantic import ValidationError

    out, _ = shard_dir
    marker = tmp_path / "ran"
    for params in ({"train_urls": url.format(marker=marker)}, {"train_urls": str(out / "train-000000.tar"), "heldout_urls": [url.format(marker=marker)]}):
        with pytest.raises(ValidationError, match="URLs run a command or reach the network"):
            build(data_registry, "webdataset", **params)
    assert not marker.exists()
    assert build(data_registry, "webdataset", train_urls=f"file:{out}/heldout-000000.tar").size("train") is None


def test_missing_shard_is_a_usage_error(data_registry, tmp_path):
    with pytest.raises(UsageError, match="train_urls"):
        build(data_registry, "webdataset", train_urls=str(tmp_path / "train-{000000..000001}.tar"))


def test_corrupt_sample_is_skipped_and_counted(data_registry, shard_dir, tmp_path):
    out, _ = shard_dir
    bad = tmp_path / "bad.tar"
    with tarfile.open(out / "heldout-000000.tar") as src_tar, tarfile.open(bad, "w") as dst:
        for member in src_tar.getmembers():
            data = src_tar.extractfile(member).read()
            if member.name in ("000003.png", "000007.png"):
                data = b"\x89PNG\r\n\x1a\n broken"  # undecodable image
            if member.name == "000005.txt":
                continue  # a sample without caption
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    src = build(data_registry, "webdataset", train_urls=str(bad))
    samples = list(src.samples("train"))
    assert len(samples) == 17 and src.skipped == 3
    assert {s.key for s in samples}.isdisjoint({"000003", "000005", "000007"})


def test_dataloader_workers_read_every_sample_once(data_registry, shard_dir):
    out, stats = shard_dir
    src = build(data_registry, "webdataset", train_urls=stats["train"]["pattern"], num_workers=2)
    keys = [s.key for s in src.samples("train")]
    assert sorted(keys) == [f"{i:06d}" for i in range(95)]
    # more workers than shards: the extra worker is simply empty
    one = build(data_registry, "webdataset", train_urls=stats["heldout"]["pattern"], num_workers=2)
    assert len(list(one.samples("train"))) == 20


def test_folder_to_shards(manager, tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    from PIL import Image

    for i in range(12):
        Image.fromarray(np.full((10, 10, 3), i * 20, np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"shade {i}")
    folder = manager.registry("data").build({"name": "folder", "params": {"root": str(root), "image_size": 8}})
    stats = write_shards(folder, tmp_path / "out", progress=False)
    assert stats["train"]["count"] + stats["heldout"]["count"] == 12 and stats["skipped"] == 0
    src = manager.registry("data").build({"name": "webdataset", "params": {"train_urls": stats["train"]["pattern"]}})
    assert all(s.caption.startswith("shade ") and s.image.shape == (8, 8, 3) for s in src.samples("train"))


# --------------------------------------------------------------------------- token shards


def test_token_shard_round_trip(tmp_path):
    text = torch.randint(0, 49409, (5, 7))
    image_tokens = torch.randint(0, 8192, (5, 16))
    path = save_token_shard(
        tmp_path / "t" / "tokens-000000.safetensors",
        text,
        image_tokens,
        ["a", "b", "c", "é", "e"],
        {"codec": "dvae", "step": 3},
    )
    got = load_token_shard(path)
    assert torch.equal(got["text"], text) and got["text"].dtype == torch.long
    assert torch.equal(got["image_tokens"], image_tokens)
    assert got["captions"] == ["a", "b", "c", "é", "e"] and got["meta"] == {"codec": "dvae", "step": 3}
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temp file left behind"


def test_token_shards_concatenate(tmp_path):
    from dalle_framework.data import load_token_shards

    for i in range(3):
        n = i + 1
        text = torch.full((n, 4), i, dtype=torch.long)
        save_token_shard(tmp_path / f"train-{i:06d}.safetensors", text, text[:, :2] + 10, [f"c{i}"] * n, {"i": i})
    got = load_token_shards(tmp_path / "train-*.safetensors")
    assert got["text"].shape == (6, 4) and got["text"][:, 0].tolist() == [0, 1, 1, 2, 2, 2]
    assert got["image_tokens"].shape == (6, 2) and got["captions"][-1] == "c2" and got["meta"] == {"i": 0}
    one = torch.zeros(1, 5, dtype=torch.long)
    save_token_shard(tmp_path / "odd.safetensors", one, one[:, :2], ["x"])
    with pytest.raises(UsageError, match="disagree on text length"):
        load_token_shards([tmp_path / "train-000000.safetensors", tmp_path / "odd.safetensors"])


def test_token_shard_checks(tmp_path):
    with pytest.raises(AssertionError, match="row counts"):
        save_token_shard(
            tmp_path / "x.safetensors",
            torch.zeros(2, 3, dtype=torch.long),
            torch.zeros(3, 4, dtype=torch.long),
            ["a", "b"],
        )
    with pytest.raises(UsageError, match="does not exist"):
        load_token_shard(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(UsageError, match="not a readable"):
        load_token_shard(tmp_path / "junk.safetensors")


def _rank_reads(rank: int, world: int, init: str, pattern: str, out: str) -> None:
    import torch.distributed as dist
    from dalle_data import WebDatasetSource

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        src = WebDatasetSource(WebDatasetSource.Params(train_urls=pattern))
        keys = [s.key for s in src.samples("train")]
        Path(out, f"rank{rank}.json").write_text(json.dumps(keys))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two Python processes (~15 s)
def test_each_rank_reads_its_own_shards(shard_dir, tmp_path):
    import torch.multiprocessing as mp

    _, stats = shard_dir
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_rank_reads, args=(2, init, stats["train"]["pattern"], str(tmp_path)), nprocs=2, join=True)
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(per_rank) and not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == [f"{i:06d}" for i in range(95)]
    # shards 0, 2 go to rank 0 and 1, 3 to rank 1 (30 samples each but the last 5)
    assert len(per_rank[0]) == 60 and len(per_rank[1]) == 35
