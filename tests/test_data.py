"""Data sources: shapes (with its oracle), emoji, fashion-mnist, folder; core image IO."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_framework import DataSource, UsageError
from dalle_framework.data import load_split, save_grid, square_resize, to_pil, to_tensor


@pytest.fixture(scope="module")
def data_registry():
    from dalle_framework.plugins import PluginManager

    return PluginManager().registry("data")


def build(registry, name, **params):
    return registry.build({"name": name, "params": params})


def test_all_sources_registered(data_registry):
    assert {"shapes", "emoji", "fashion-mnist", "folder", "webdataset"} <= set(data_registry.names())
    for name in ("shapes", "emoji", "fashion-mnist", "folder", "webdataset"):
        cls = data_registry.get(name)
        assert issubclass(cls, DataSource) and cls.plugin == "data"


# --------------------------------------------------------------------------- shapes


def test_shapes_split_holds_out_combinations_but_every_value(data_registry):
    src = build(data_registry, "shapes", samples_per_caption=2, heldout_samples_per_caption=3)
    train, held = src.combos["train"], src.combos["heldout"]
    assert len(held) == round(0.1 * 7 * 3 * 5) and not set(train) & set(held)
    assert len(train) + len(held) == 105
    for k in range(3):  # every single colour, shape and position appears in train
        assert {c[k] for c in train} == {c[k] for c in train + held}
    train_caps = {s.caption for s in src.samples("train")}
    held_samples = list(src.samples("heldout"))
    assert len(held_samples) == src.size("heldout") == 3 * len(held)
    assert not train_caps & {s.caption for s in held_samples}
    assert src.size("train") == 2 * len(train) == len(list(src.samples("train")))
    s = held_samples[0]
    assert s.image.dtype == np.uint8 and s.image.shape == (32, 32, 3)
    assert s.caption == f"a {s.meta['colour']} {s.meta['shape']} in the {s.meta['position']}"


def test_shapes_deterministic_given_seed(data_registry):
    a = [s.image for s in itertools.islice(build(data_registry, "shapes", seed=3).samples("train"), 20)]
    b = [s.image for s in itertools.islice(build(data_registry, "shapes", seed=3).samples("train"), 20)]
    c = [s.image for s in itertools.islice(build(data_registry, "shapes", seed=4).samples("train"), 20)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert build(data_registry, "shapes", seed=3).combos != build(data_registry, "shapes", seed=4).combos


def test_shapes_heldout_count_and_none(data_registry):
    assert len(build(data_registry, "shapes", heldout_count=20).combos["heldout"]) == 20
    none = build(data_registry, "shapes", heldout_fraction=0.0, samples_per_caption=1)
    assert none.size("heldout") == 0 and list(none.samples("heldout")) == [] and none.size("train") == 105
    # 2 colours x 1 shape x 1 position: holding one out would hide a colour from train
    tiny = build(data_registry, "shapes", colours=["red", "blue"], shapes=["circle"], positions=["center"])
    assert tiny.combos["heldout"] == [] and len(tiny.combos["train"]) == 2


def test_shapes_caption_format_and_parse():
    from dalle_data import caption_for, parse_caption

    assert caption_for("red", "circle", "top left") == "a red circle in the top left"
    assert parse_caption("a blue square in the center") == {"colour": "blue", "shape": "square", "position": "center"}
    assert parse_caption("A  Red circle in the top left") == {
        "colour": "red",
        "shape": "circle",
        "position": "top left",
    }
    assert parse_caption("a teal circle in the center") is None
    assert parse_caption("grinning face") is None


def test_shapes_params_validated(data_registry):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown colours"):
        data_registry.validate_params("shapes", {"colours": ["red", "teal"]})
    with pytest.raises(ValidationError, match="unknown positions"):
        data_registry.validate_params("shapes", {"positions": ["upstairs"]})
    with pytest.raises(ValidationError):
        data_registry.validate_params("shapes", {"colour": ["red"]})  # typo: extra key


def test_shapes_render_speed(data_registry):
    import time

    src = build(data_registry, "shapes", samples_per_caption=20)
    start = time.perf_counter()
    n = sum(1 for _ in src.samples("train"))
    rate = n / (time.perf_counter() - start)
    assert n == 1900 and rate > 1000, f"{rate:.0f} images/s"


def _judged(src, split, noise=0.0, seed=0):
    images, captions = load_split(src, split, progress=False)
    x = images.float() / 255
    if noise:
        x = (x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)
    return x, captions, src.judge(x, captions)


@pytest.mark.parametrize("noise", [0.0, 0.08])
def test_oracle_is_right_on_heldout_renderings(data_registry, noise):
    src = build(data_registry, "shapes", heldout_samples_per_caption=20)
    _, _, verdict = _judged(src, "heldout", noise)
    for key in ("colour", "shape", "position", "all"):
        assert np.mean(verdict[key]) >= 0.99, (key, np.mean(verdict[key]))


def test_oracle_all_values_both_sizes(data_registry):
    from dalle_data.shapes import COLOURS, POSITIONS, SHAPES

    for size in (32, 64):
        src = build(
            data_registry,
            "shapes",
            image_size=size,
            colours=list(COLOURS),
            shapes=list(SHAPES),
            positions=list(POSITIONS),
            samples_per_caption=1,
            heldout_fraction=0.0,
        )
        _, _, verdict = _judged(src, "train", noise=0.05)
        assert np.mean(verdict["all"]) >= 0.99, (size, {k: np.mean(v) for k, v in verdict.items()})


def test_oracle_rejects_wrong_captions(data_registry):
    from dalle_data import caption_for, parse_caption

    src = build(data_registry, "shapes", heldout_samples_per_caption=2)
    x, captions, _ = _judged(src, "heldout")
    p = src.params
    for key, values in (("colour", p.colours), ("shape", p.shapes), ("position", p.positions)):
        wrong = []
        for caption in captions:
            parts = parse_caption(caption)
            parts[key] = values[(values.index(parts[key]) + 1) % len(values)]
            wrong.append(caption_for(parts["colour"], parts["shape"], parts["position"]))
        verdict = src.judge(x, wrong)
        assert not any(verdict[key]) and not any(verdict["all"]), key
        others = [k for k in ("colour", "shape", "position") if k != key]
        assert all(all(verdict[k]) for k in others), key  # the other attributes still pass


def test_oracle_rejects_blank_and_noise_images(data_registry):
    src = build(data_registry, "shapes")
    captions = ["a red circle in the center"] * 2
    blank = torch.zeros(2, 3, 32, 32)
    assert src.judge(blank, captions)["all"] == [False, False]
    mid = torch.full((2, 3, 32, 32), 0.5)  # grey everywhere: a "circle" whose colour is no palette colour
    assert src.judge(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), captions)["all"] == [
        False,
        False,
    ]
    assert src.judge(mid, captions)["all"] == [False, False]
    assert src.judge(blank[:1], ["not a shapes caption"])["all"] == [False]


# --------------------------------------------------------------------------- emoji


@pytest.fixture(scope="module")
def emoji(data_registry):
    return build(data_registry, "emoji")


@pytest.mark.debian_data("emoji")
def test_emoji_split_and_captions(emoji):
    assert emoji.size("train") == 3289 and emoji.size("heldout") == 366
    first = list(itertools.islice(emoji.samples("heldout"), 3))
    assert [s.caption for s in first] == ["grinning face", "melting face", "kissing face with closed eyes"]
    assert first[0].image.shape == (64, 64, 3) and first[0].image.dtype == np.uint8
    img = first[0].image
    assert (img[0, 0] == 255).all(), "background is white"
    assert img.reshape(-1, 3).std(0).mean() > 20, "a coloured glyph is drawn"
    train_keys = {e.index for e in emoji.emoji["train"]}
    assert not train_keys & {e.index for e in emoji.emoji["heldout"]}
    assert emoji.skipped == 0


@pytest.mark.debian_data("emoji")
def test_emoji_filters_keep_the_split(data_registry):
    src = build(
        data_registry, "emoji", subgroups=["face-smiling"], caption_template="an emoji of {name}", image_size=32
    )
    held = list(src.samples("heldout"))
    assert held and all(s.meta["subgroup"] == "face-smiling" for s in held)
    assert held[0].caption == "an emoji of grinning face" and held[0].image.shape == (32, 32, 3)
    assert all(int(s.key.split("-")[1]) % 10 == 0 for s in held)
    with pytest.raises(UsageError, match="unknown"):
        build(data_registry, "emoji", groups=["Dinosaurs"])


def test_emoji_missing_files_name_the_package(data_registry, tmp_path):
    with pytest.raises(UsageError, match="apt-get install unicode-data"):
        build(data_registry, "emoji", names_path=str(tmp_path / "nope.txt"))
    names = tmp_path / "emoji-test.txt"  # the names are there (written here, so no package is needed), the font is not
    names.write_text("# group: Smileys & Emotion\n# subgroup: face-smiling\n1F600 ; fully-qualified # 😀 E1.0 grinning face\n")
    with pytest.raises(UsageError, match="apt-get install fonts-noto-color-emoji"):
        build(data_registry, "emoji", names_path=str(names), font_path=str(tmp_path / "nope.ttf"))


@pytest.mark.debian_data("emoji")
@pytest.mark.slow
def test_emoji_all_render(emoji):
    images, captions = load_split(emoji, "train", progress=False)
    assert images.shape == (3289, 3, 64, 64) and len(captions) == 3289 and emoji.skipped == 0
    assert (images.float().std((1, 2, 3)) > 5).all(), "every emoji draws something"


# --------------------------------------------------------------------------- core image IO


def test_to_tensor_to_pil_round_trip():
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    for img in (arr, Image.fromarray(arr), torch.from_numpy(arr)):
        t = to_tensor(img)
        assert t.shape == (3, 5, 7) and t.dtype == torch.float32 and 0 <= t.min() and t.max() <= 1
        assert np.array_equal(np.asarray(to_pil(t)), arr)
    assert np.array_equal(np.asarray(to_pil(arr)), arr)


def test_square_resize_crops_centre():
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, 20:60] = 200  # the centre square
    out = square_resize(arr, 20)
    assert out.shape == (20, 20, 3) and (out == 200).all()
    assert square_resize(arr, None).shape == (40, 40, 3)


def test_save_grid_writes_png(tmp_path):
    images = torch.rand(6, 3, 8, 8)
    path = save_grid(images, tmp_path / "sub" / "grid.png", nrow=3)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (3 * 10 + 2, 2 * 10 + 2)


def test_load_split_limit(data_registry):
    src = build(data_registry, "shapes")
    images, captions = load_split(src, "train", limit=10, progress=False)
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.uint8 and len(captions) == 10
    assert len(set(captions)) == 10, "round-robin order: a prefix covers many captions"


def test_batches_stream_a_split(data_registry):
    from dalle_framework.data import split_batches

    src = build(data_registry, "shapes", heldout_samples_per_caption=2)
    got = list(split_batches(src, "heldout", 8))
    assert [b[0].shape[0] for b in got] == [8, 8, 4] and got[0][0].dtype == torch.uint8
    images, captions = load_split(src, "heldout", progress=False)
    assert torch.equal(torch.cat([b[0] for b in got]), images) and sum((b[1] for b in got), []) == captions
    assert [b[0].shape[0] for b in split_batches(src, "heldout", 8, limit=17, drop_last=True)] == [8, 8]


# --------------------------------------------------------------------------- fashion-mnist


@pytest.mark.debian_data("fashion-mnist")
def test_fashion_mnist(data_registry):
    src = build(data_registry, "fashion-mnist", limit=50)
    assert src.size("train") == 50 and src.size("heldout") == 50
    samples = list(src.samples("heldout"))
    assert len(samples) == 50 and samples[0].image.shape == (32, 32, 3) and samples[0].image.dtype == np.uint8
    # official test file: its first label is 9 (ankle boot)
    assert samples[0].caption == "a photo of an ankle boot" and samples[0].meta["label"] == 9
    assert all(np.array_equal(s.image[..., 0], s.image[..., 2]) for s in samples), "grey as RGB"
    assert {s.caption for s in samples} <= set(src.captions("heldout"))
    full = build(data_registry, "fashion-mnist", template="{label}")
    assert full.size("train") == 60_000 and full.size("heldout") == 10_000
    assert next(iter(full.samples("train"))).caption in full.captions("train")


def test_fashion_mnist_missing_names_package(data_registry, tmp_path):
    with pytest.raises(UsageError, match="apt-get install dataset-fashion-mnist"):
        build(data_registry, "fashion-mnist", root=str(tmp_path))


# --------------------------------------------------------------------------- folder


def make_folder(root: Path, n: int = 40) -> dict[str, str]:
    """n captioned images (one non-square jpg), one without caption, one corrupt."""
    rng = np.random.default_rng(0)
    captions = {}
    for i in range(n):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(arr).save(sub / f"img{i:03d}.png")
        (sub / f"img{i:03d}.txt").write_text(f"  picture   number {i}\n")
        captions[f"{sub.name}/img{i:03d}.png"] = f"picture number {i}"
    Image.fromarray(np.full((30, 60, 3), 128, np.uint8)).save(root / "wide.jpg")
    (root / "wide.txt").write_text("a wide grey image")
    captions["wide.jpg"] = "a wide grey image"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "nocaption.png")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "broken.txt").write_text("broken")
    (root / "notes.md").write_text("ignored: not an image")
    return captions


def test_folder_source(data_registry, tmp_path):
    captions = make_folder(tmp_path)
    src = build(data_registry, "folder", root=str(tmp_path), image_size=16)
    train, held = list(src.samples("train")), list(src.samples("heldout"))
    got = {s.key: s.caption for s in train + held}
    assert got == captions
    assert src.skipped == 2, "no caption + corrupt image are skipped and counted"
    assert all(s.image.shape == (16, 16, 3) for s in train + held)
    assert not {s.key for s in train} & {s.key for s in held} and held, "a non-empty held-out split"
    assert src.size("train") + src.size("heldout") == len(captions) + 2
    # the split is a hash of the path: adding files never moves existing ones
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "new.png")
    (tmp_path / "new.txt").write_text("new")
    again = build(data_registry, "folder", root=str(tmp_path), image_size=16)
    assert {s.key for s in held} <= {s.key for s in again.samples("heldout")}
    assert [s.key for s in train] == [s.key for s in again.samples("train") if s.key != "new.png"]


def test_folder_missing_root(data_registry, tmp_path):
    with pytest.raises(UsageError, match="root"):
        build(data_registry, "folder", root=str(tmp_path / "missing"))
