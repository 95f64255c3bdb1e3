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


URLS = ["pipe:touch {marker}", "PIPE:touch {marker}", "https://example.com/a.tar", "s3://bucket/a.tar",
        # schemes that appear only once braces are expanded
        "{{pipe,x}}:touch {marker}", "pi{{pe:touch {marker},}}", "{{s3://bucket/a.tar,local.tar}}"]


@pytest.mark.parametrize("url", URLS)
def test_urls_that_run_commands_or_reach_the_network_are_refused(data_registry, shard_dir, tmp_path, url):
    from pydantic import ValidationError

    out, _ = shard_dir
    marker = tmp_path / "ran"
    for params in ({"train_urls": url.format(marker=marker)}, {"train_urls": str(out / "train-000000.tar"), "heldout_urls": [url.format(marker=marker)]}):
        with pytest.raises(ValidationError, match="names a URL; shards are local files only"):
            build(data_registry, "webdataset", **params)
    assert not marker.exists()
    assert build(data_registry, "webdataset", train_urls=f"file:{out}/heldout-000000.tar").size("train") is None


def test_a_shard_named_like_a_command_is_read_as_a_file_never_run(shard_dir, tmp_path, monkeypatch):
    """The mechanism, below validation: the reader opens local files itself, so a name is only a name."""
    import shutil

    from dalle_framework.data.stream import TarShards

    out, _ = shard_dir
    monkeypatch.chdir(tmp_path)
    named = "pipe:touch ran"  # webdataset's own opener would run `touch ran` with a shell for this URL
    shutil.copy(out / "heldout-000000.tar", tmp_path / named)
    records = list(TarShards().read(named, 0, 100))
    assert len(records) == 20 and {"png", "txt", "json"} <= set(records[0])
    assert not (tmp_path / "ran").exists()


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


def test_samples_read_the_whole_split_whatever_rank_variables_say(data_registry, shard_dir, monkeypatch):
    """Splitting by rank is the training stream's job, done once (tests/test_scale.py); a source's
    `samples` reads everything, even with stale RANK / WORLD_SIZE variables left in the environment."""
    _, stats = shard_dir
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    source = build(data_registry, "webdataset", train_urls=stats["train"]["pattern"])
    assert [s.key for s in source.samples("train")] == [f"{i:06d}" for i in range(95)]


def test_img2dataset_shards_read_as_they_are(data_registry, tmp_path):
    """img2dataset writes 00000.tar with 000000000.jpg / .txt / .json per sample (and parquet beside it)."""
    from PIL import Image

    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for i, colour in enumerate(["red", "green", "blue"]):
            jpeg = io.BytesIO()
            Image.new("RGB", (40, 30), colour).save(jpeg, format="JPEG")
            members = {"jpg": jpeg.getvalue(), "txt": f"a {colour} photo".encode(), "json": json.dumps({"url": "u", "key": f"{i:09d}"}).encode()}
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (tmp_path / "00000.parquet").write_bytes(b"not read")
    (tmp_path / "00000_stats.json").write_text("{}")
    source = build(data_registry, "webdataset", train_urls=str(path), image_size=16)
    samples = list(source.samples("train"))
    assert [s.caption for s in samples] == ["a red photo", "a green photo", "a blue photo"]
    assert samples[0].image.shape == (16, 16, 3) and samples[0].image[8, 8, 0] > 200 and samples[2].image[8, 8, 2] > 200
    assert source.captions("train") == ["a red photo", "a green photo", "a blue photo"]
