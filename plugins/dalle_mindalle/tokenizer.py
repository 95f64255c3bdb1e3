"""DALL-E Mini / Mega's tokenizer as min-dalle applies it: BART's BPE from ``vocab.json`` + ``merges.txt``.

A caption is read as min-dalle's ``TextTokenizer`` reads it: emoji spelled out by name
(``emoji.demojize`` without delimiters), lower-cased, everything outside ASCII dropped,
split at single spaces; each word is merged pair by pair, always the pair of lowest
merge rank (the leftmost of equals), starting from ``Ġ`` and its characters; subwords the
vocabulary lacks are ``<unk>``; ``<s>`` and ``</s>`` frame the caption and it is cut
to ``text_len`` tokens.

Ids are BART's plus one, so that 0 is the framework's padding (``PAD_ID``) and BART's own
``<pad>`` (1) never appears: the ``min-dalle`` prior shifts them back.
"""

from __future__ import annotations

import json
import math
from functools import cached_property
from pathlib import Path
from typing import Optional

import torch

from dalle_framework import PAD_ID, Tokenizer, UsageError
from dalle_framework.convert import copy_released, write_converted

from .params import MinDalleTokenizerParams

SHIFT = 1  # our id = BART id + 1
WORD_START = chr(ord(" ") + 256)  # "Ġ": GPT-2 / BART byte-level space, as min-dalle writes it


class MinDalleTokenizer(Tokenizer):
    """BART BPE as min-dalle tokenizes (ids shifted by one; 0 is padding): ``encode(list[str]) -> LongTensor[B, text_len]``.

    The two files are read on first use. Convert them once with
    ``dalle convert min-dalle-bpe vocab.json merges.txt OUT`` (copied and checked).
    """

    Params = MinDalleTokenizerParams

    def __init__(self, params: Optional["MinDalleTokenizer.Params"] = None, **runtime) -> None:
        self.params = params or self.Params()
        self.vocab_size = self.params.vocab_size
        self.text_len = self.params.text_len

    @cached_property
    def tables(self) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
        """(subword -> BART id, merge pair -> rank), read and checked once."""
        p = self.params
        if p.vocab is None or p.merges is None:
            raise UsageError("tokenizer min-dalle-bpe: set tokenizer.params.vocab and .merges (`dalle convert min-dalle-bpe vocab.json merges.txt OUT` writes the block)")
        vocab, ranks = read_vocab(Path(p.vocab)), read_merges(Path(p.merges))
        if len(vocab) + SHIFT != self.vocab_size:
            raise UsageError(f"{p.vocab}: holds {len(vocab)} subwords, so tokenizer.params.vocab_size must be {len(vocab) + SHIFT}")
        return vocab, ranks

    def _word(self, word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
        subwords = [WORD_START, *word]
        while len(subwords) > 1:
            pairs = list(zip(subwords[:-1], subwords[1:]))
            best = min(pairs, key=lambda pair: ranks.get(pair, math.inf))
            if best not in ranks:
                break
            i = pairs.index(best)
            subwords = subwords[:i] + [best[0] + best[1]] + subwords[i + 2 :]
        return subwords

    def bart_ids(self, text: str) -> list[int]:
        """min-dalle's ``TextTokenizer.tokenize``: BART ids with ``<s>`` and ``</s>``, not yet cut."""
        from emoji import demojize

        vocab, ranks = self.tables
        text = demojize(text, delimiters=("", "")).lower().encode("ascii", errors="ignore").decode()
        unk = vocab["<unk>"]
        ids = [vocab.get(sub, unk) for word in text.split(" ") if word for sub in self._word(word, ranks)]
        return [vocab["<s>"], *ids, vocab["</s>"]]

    def encode(self, texts: list[str]) -> torch.Tensor:
        assert not isinstance(texts, str), "encode takes a list of captions"
        out = torch.full((len(texts), self.text_len), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.bart_ids(text)[: self.text_len]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long) + SHIFT
        return out

    def decode(self, ids: torch.Tensor) -> list[str]:
        assert ids.ndim == 2, f"expected [B, T], got {tuple(ids.shape)}"
        vocab, _ = self.tables
        words = {i: w for w, i in vocab.items()}
        special = {vocab.get(t) for t in ("<s>", "</s>", "<pad>", "<unk>")}
        texts = []
        for row in ids.tolist():
            pieces = [words.get(i - SHIFT, "") for i in row if i != PAD_ID and i - SHIFT not in special]
            texts.append("".join(pieces).replace(WORD_START, " ").strip())
        return texts

    @classmethod
    def convert_released(cls, files, out_dir, *, trust_pickle: bool, params=None) -> dict:
        """``vocab.json`` + ``merges.txt`` -> copies in ``OUT`` and ``OUT/tokenizer.yaml``."""
        by_name = {Path(f).suffix: Path(f) for f in files}
        if len(files) != 2 or set(by_name) != {".json", ".txt"}:
            raise UsageError(f"{cls.name}: give vocab.json, merges.txt and the output directory: dalle convert {cls.name} vocab.json merges.txt OUT")
        vocab = read_vocab(by_name[".json"])
        read_merges(by_name[".txt"])
        found = {"vocab": str(copy_released(by_name[".json"], out_dir, "vocab.json")),
                 "merges": str(copy_released(by_name[".txt"], out_dir, "merges.txt")), "vocab_size": len(vocab) + SHIFT}
        return write_converted(cls, out_dir, kind="tokenizer", params=found, sources=[by_name[".json"], by_name[".txt"]], overrides=params,
                               notes={"released_format": "BART BPE vocab.json + merges.txt (min-dalle 0.4.11's TextTokenizer)"})


def read_vocab(path: Path) -> dict[str, int]:
    try:
        vocab = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file; give min-dalle's vocab.json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not a JSON vocabulary ({exc})") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise UsageError(f"{path}: expected a JSON object of subword -> id")
    missing = [t for t in ("<s>", "</s>", "<unk>") if t not in vocab]
    if missing:
        raise UsageError(f"{path}: lacks BART's special tokens {missing}")
    return vocab


def read_merges(path: Path) -> dict[tuple[str, str], int]:
    """min-dalle's reading: every line but the first (a version header) and the last (empty), split in two."""
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")[1:-1]
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file; give min-dalle's merges.txt") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not a UTF-8 merges file ({exc})") from None
    pairs = [tuple(line.split()) for line in lines]
    bad = next((i for i, pair in enumerate(pairs) if len(pair) != 2), None)
    if bad is not None:
        raise UsageError(f"{path}: line {bad + 2} is not a merge of two subwords")
    return dict(zip(pairs, range(len(pairs))))  # type: ignore[arg-type]
