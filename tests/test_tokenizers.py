"""Tokenizers: words, bytes, clip-bpe (real open_clip vocabulary)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dalle_framework import PAD_ID, Tokenizer


@pytest.fixture(scope="module")
def tok_registry():
    from dalle_framework.plugins import PluginManager

    return PluginManager().registry("tokenizer")


def build(registry, name, **params) -> Tokenizer:
    return registry.build({"name": name, "params": params})


def test_registered(tok_registry):
    assert {"words", "bytes", "clip-bpe"} <= set(tok_registry.names())
    for name in ("words", "bytes", "clip-bpe"):
        assert issubclass(tok_registry.get(name), Tokenizer) and tok_registry.get(name).plugin == "tokenizers"


def check_contract(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    ids = tok.encode(texts)
    assert ids.shape == (len(texts), tok.text_len) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < tok.vocab_size
    for row in ids:  # padding only on the right: no real token after the first pad
        pads = (row == PAD_ID).nonzero().flatten()
        if len(pads):
            assert (row[pads[0] :] == PAD_ID).all(), row
    return ids


# --------------------------------------------------------------------------- words


def test_words_round_trip_and_ids(tok_registry):
    tok = build(tok_registry, "words", vocab=["a", "red", "circle", "in", "the", "top", "left", "!"], text_len=10)
    assert tok.vocab_size == 10
    ids = check_contract(tok, ["a red circle in the top left", "A RED circle!", ""])
    assert ids[0].tolist() == [2, 3, 4, 5, 6, 7, 8, 0, 0, 0]
    assert ids[1].tolist()[:5] == [2, 3, 4, 9, 0]
    assert (ids[2] == PAD_ID).all()
    assert tok.decode(ids) == ["a red circle in the top left", "a red circle !", ""]


def test_words_unknown_and_truncation(tok_registry):
    tok = build(tok_registry, "words", vocab=["a", "b"], text_len=3)
    ids = tok.encode(["a zebra b a b"])
    assert ids.tolist() == [[2, 1, 3]]
    assert tok.decode(ids) == ["a <unk> b"]


def test_words_default_covers_shapes_captions(tok_registry):
    from dalle_data import ShapesSource  # the demo pairing; test-only import
    from dalle_data.shapes import COLOURS, POSITIONS, SHAPES

    tok = build(tok_registry, "words")
    src = ShapesSource(ShapesSource.Params(colours=list(COLOURS), shapes=list(SHAPES), positions=list(POSITIONS)))
    captions = src.captions("train") + src.captions("heldout")
    ids = check_contract(tok, captions)
    assert (ids != 1).all(), "no unknown words"
    assert tok.decode(ids) == captions


def test_words_vocab_validated(tok_registry):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="duplicate"):
        tok_registry.validate_params("words", {"vocab": ["a", "a"]})
    with pytest.raises(ValidationError, match="single lower-case"):
        tok_registry.validate_params("words", {"vocab": ["Red"]})
    with pytest.raises(ValidationError, match="single lower-case"):
        tok_registry.validate_params("words", {"vocab": ["two words"]})


def test_vocab_from_captions():
    from dalle_tokenizers import vocab_from_captions

    assert vocab_from_captions(["a red dog", "a blue dog", "a cat!"]) == ["a", "dog", "!", "blue", "cat", "red"]
    assert vocab_from_captions(["a red dog", "a blue dog"], min_count=2) == ["a", "dog"]


# --------------------------------------------------------------------------- bytes


def test_bytes_round_trip_padding_truncation(tok_registry):
    tok = build(tok_registry, "bytes", text_len=8)
    assert tok.vocab_size == 257
    ids = check_contract(tok, ["hi", "", "abcdefghijk", "ééééé"])
    assert ids[0].tolist() == [ord("h") + 1, ord("i") + 1, 0, 0, 0, 0, 0, 0]
    assert tok.decode(ids) == ["hi", "", "abcdefgh", "éééé"], "truncation never splits a character"
    assert int(ids[2].min()) > 0


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=20))
def test_bytes_round_trip_any_text(text):
    from dalle_tokenizers import ByteTokenizer

    tok = ByteTokenizer(ByteTokenizer.Params(text_len=80))  # 20 chars are at most 80 bytes
    if "\x00" in text:
        return  # NUL is byte 0 -> id 1; it round-trips too, checked below without hypothesis
    assert tok.decode(tok.encode([text])) == [text]


def test_bytes_nul_is_not_padding():
    from dalle_tokenizers import ByteTokenizer

    tok = ByteTokenizer(ByteTokenizer.Params(text_len=4))
    ids = tok.encode(["a\x00b"])
    assert ids.tolist() == [[98, 1, 99, 0]] and tok.decode(ids) == ["a\x00b"]


# --------------------------------------------------------------------------- clip-bpe


@pytest.fixture(scope="module")
def clip(tok_registry):
    return build(tok_registry, "clip-bpe", text_len=12)


def test_clip_bpe_round_trip(clip):
    assert clip.vocab_size == 49409 and clip.text_len == 12
    texts = ["a red circle in the top left!", "woman office worker: medium-dark skin tone", "Grinning face"]
    ids = check_contract(clip, texts)
    assert ids[0, 0] == 320 + 1, "'a' is CLIP id 320, shifted by one"
    assert clip.decode(ids) == [
        "a red circle in the top left !",
        "woman office worker : medium - dark skin tone",
        "grinning face",
    ]


def test_clip_bpe_bang_is_not_padding(clip):
    ids = clip.encode(["!~"])  # BPE: "!" (CLIP id 0) then "~</w>" (349)
    assert ids[0, :2].tolist() == [1, 350] and (ids[0, 2:] == PAD_ID).all(), "CLIP id 0 becomes 1"
    assert clip.decode(ids) == ["!~"]


def test_clip_bpe_truncation_and_start_end(tok_registry, clip):
    long = " ".join(["word"] * 40)
    assert (clip.encode([long]) != PAD_ID).all()
    tok = build(tok_registry, "clip-bpe", text_len=6, start_end=True)
    ids = check_contract(tok, ["hello", long])
    sot, eot = 49406 + 1, 49407 + 1
    assert ids[0, 0] == sot and ids[0, 2] == eot and (ids[0, 3:] == PAD_ID).all()
    assert ids[1, 0] == sot and ids[1, -1] == eot, "the end token survives truncation"
    assert tok.decode(ids) == ["hello", "word word word word"]


def test_default_clip_len_is_papers(tok_registry):
    assert build(tok_registry, "clip-bpe").text_len == 256
