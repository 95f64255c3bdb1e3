"""The `bpe` tokenizer: a byte-level BPE learned from a data source's captions."""

from __future__ import annotations

import json
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from dalle_framework import PAD_ID, Tokenizer, UsageError
from dalle_framework.plugins import registry

CORPUS = [
    "a red circle in the top left", "a blue square in the center", "Grinning face with big eyes",
    "cat face", "red heart", "flag: Japan", "woman office worker: medium-dark skin tone", "Côte d’Ivoire",
] * 5  # fmt: skip


def build(**params) -> Tokenizer:
    return registry("tokenizer").build({"name": "bpe", "params": params})


@pytest.fixture(scope="module")
def fitted() -> Tokenizer:
    tok = build(vocab_size=400, text_len=64, min_frequency=1)
    tok.fit(CORPUS)
    return tok


def test_vocab_size_and_defaults_come_from_params_before_fitting():
    tok = build()
    assert (tok.vocab_size, tok.text_len) == (16384, 256)  # the paper's
    assert tok.needs_fit and tok.params.lowercase and tok.params.normalization == "nfkc"
    with pytest.raises(UsageError, match="not trained yet.*tokenizer.params.path"):
        tok.encode(["a cat"])
    assert not registry("tokenizer").build({"name": "bytes", "params": {}}).needs_fit
    with pytest.raises(UsageError, match="learns nothing"):
        registry("tokenizer").build({"name": "bytes", "params": {}}).fit(["a"])
    with pytest.raises(ValidationError, match="vocab_size"):
        build(vocab_size=100)  # fewer ids than the 256 bytes + padding


def test_round_trip_padding_and_ids(fitted):
    assert not fitted.needs_fit
    texts = ["a red circle in the top left", "flag: japan", ""]
    ids = fitted.encode(texts)
    assert ids.shape == (3, 64) and ids.dtype == torch.long
    assert int(ids.max()) < fitted.vocab_size and (ids[2] == PAD_ID).all()
    for row in ids:  # padding only on the right
        pads = (row == PAD_ID).nonzero().flatten()
        if len(pads):
            assert (row[pads[0] :] == PAD_ID).all()
    assert fitted.decode(ids) == texts
    # Learned merges make frequent captions short: far fewer tokens than bytes.
    assert int((ids[0] != PAD_ID).sum()) <= 8 < len(texts[0])


@settings(max_examples=80, deadline=None)
@given(st.text(max_size=15))
def test_any_unicode_round_trips_to_its_normal_form(fitted, text):
    # 15 characters are at most 60 UTF-8 bytes <= text_len 64: never truncated.
    assert fitted.decode(fitted.encode([text])) == [fitted.normalize(text)]


def test_unicode_and_very_long_captions(fitted):
    texts = ["🐈 猫 кошка قطة", "x" * 100_000]
    ids = fitted.encode(texts)
    assert fitted.decode(ids[:1]) == ["🐈 猫 кошка قطة"]
    assert (ids[1] != PAD_ID).all(), "a long caption fills text_len, truncated"
    assert fitted.decode(ids[1:])[0] == "x" * len(fitted.decode(ids[1:])[0])


def test_lowercase_and_normalisation_options():
    def fit(**params) -> Tokenizer:
        tok = build(vocab_size=300, text_len=32, **params)
        tok.fit(CORPUS)
        return tok

    nfkc, nfc, raw = fit(), fit(normalization="nfc", lowercase=False), fit(normalization="none", lowercase=False)
    text = "ＡＢＣ ﬁne Cafe\u0301"  # full-width letters, a ligature, e + combining acute
    assert nfkc.decode(nfkc.encode([text])) == ["abc fine café"]
    assert nfc.decode(nfc.encode([text])) == ["ＡＢＣ ﬁne Café"]
    assert raw.decode(raw.encode([text])) == [text]
    assert len(nfc.decode(nfc.encode([text]))[0]) == len(text) - 1  # NFC composed e + accent


def test_save_load_gives_identical_ids(fitted, tmp_path):
    fitted.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]  # written atomically: no temp file left
    again = build(vocab_size=400, text_len=64, min_frequency=1)
    assert again.needs_fit
    again.load(tmp_path)
    assert not again.needs_fit and torch.equal(again.encode(CORPUS), fitted.encode(CORPUS))
    by_path = build(vocab_size=400, text_len=64, path=str(tmp_path / "tokenizer.json"))
    assert not by_path.needs_fit and torch.equal(by_path.encode(CORPUS), fitted.encode(CORPUS))


def test_fitting_is_deterministic():
    one, two = build(vocab_size=400, min_frequency=1), build(vocab_size=400, min_frequency=1)
    one.fit(CORPUS)
    two.fit(CORPUS)
    assert one.bpe.to_str() == two.bpe.to_str()


def test_bad_files_and_settings_are_named(fitted, tmp_path):
    fitted.save(tmp_path)
    with pytest.raises(UsageError, match="vocab_size is 300; set it to"):
        build(vocab_size=300, path=str(tmp_path / "tokenizer.json"))
    with pytest.raises(UsageError, match="normaliser.*lowercase=False"):
        build(vocab_size=400, lowercase=False, path=str(tmp_path / "tokenizer.json"))
    with pytest.raises(UsageError, match="no tokenizer file"):
        build(path=str(tmp_path / "missing.json"))
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(UsageError, match="not a tokenizers JSON"):
        build(path=str(tmp_path / "junk.json"))
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["added_tokens"][0]["content"] = "<s>"
    data["model"]["vocab"]["<s>"] = data["model"]["vocab"].pop("<pad>")
    (tmp_path / "nopad.json").write_text(json.dumps(data))
    with pytest.raises(UsageError, match="id 0 must be the padding token"):
        build(vocab_size=400, path=str(tmp_path / "nopad.json"))
    with pytest.raises(UsageError, match="no captions"):
        build().fit([])


@pytest.mark.debian_data("emoji")
def test_trains_on_the_emoji_captions_in_seconds(tmp_path):
    data = registry("data").build({"name": "emoji", "params": {}})
    captions = data.captions("train")
    assert len(captions) > 3000
    tok = build(text_len=32)  # the paper's 16,384 ids; the captions hold fewer merges
    start = time.perf_counter()
    tok.fit(captions)
    assert time.perf_counter() - start < 20
    learned = tok.bpe.get_vocab_size()
    assert 1000 < learned <= tok.vocab_size
    heldout = data.captions("heldout")
    ids = tok.encode(heldout)
    assert tok.decode(ids) == [tok.normalize(c) for c in heldout]
    lengths = (ids != PAD_ID).sum(1).float()
    chars = sum(len(c) for c in heldout) / len(heldout)
    assert float(lengths.mean()) < chars / 3, "held-out names take a third of their characters in tokens, or fewer"
    tok.save(tmp_path)
    again = build(text_len=32)
    again.load(tmp_path)
    assert torch.equal(again.encode(heldout), ids)


def test_tokenizer_train_command_and_training_fit_it_into_the_run(tmp_path):
    """`dalle tokenizer train` fits the recipe's bpe on its training captions into <run>/tokenizer;
    `dalle train` fits it first when missing, and the run loads it back with identical ids."""
    import yaml

    from conftest import run_cli
    from test_train import tiny_recipe

    recipe = tiny_recipe(tmp_path / "run", **{"codec.train.steps": 2, "prior.train.steps": 2})
    recipe["tokenizer"] = {"name": "bpe", "params": {"vocab_size": 300, "text_len": 12, "min_frequency": 1}}
    path = tmp_path / "bpe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    fitted = run_cli("tokenizer", "train", str(path), "--vocab-size", "320")
    assert fitted.returncode == 0, fitted.stderr
    summary = json.loads(fitted.stdout)
    assert summary["vocab_size"] == 320 and summary["captions"] > 0
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()
    # --vocab-size changed the recipe's tokenizer: training with the file's 300 is another tokenizer
    refused = run_cli("train", str(path), "--quiet")
    assert refused.returncode == 2 and "tokenizer.params.vocab_size: 320 in the run, 300 now" in refused.stderr
    trained = run_cli("train", str(path), "--quiet", "tokenizer.params.vocab_size=320")
    assert trained.returncode == 0, trained.stderr

    from dalle_framework.pipeline import Pipeline

    pipe = Pipeline.load(tmp_path / "run")
    caption = "a red circle in the top left"
    again = Pipeline.load(tmp_path / "run").tokenizer.encode([caption])
    assert torch.equal(pipe.tokenizer.encode([caption]), again) and int(again[0, 0]) != 0
    assert pipe.tokenizer.decode(again) == [caption]
    shard = pipe.stage("prior").tokens("heldout")  # the prior trained on the fitted tokenizer's ids
    assert torch.equal(shard["text"], pipe.tokenizer.encode(shard["captions"])) and int(shard["text"].max()) < 320
    # a recipe whose tokenizer learns nothing: the command says so
    plain = run_cli("tokenizer", "train", "shapes-demo", f"output_dir={tmp_path / 'plain'}")
    assert plain.returncode == 2 and "learns nothing" in plain.stderr
