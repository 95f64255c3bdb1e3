"""A byte-level BPE learned from the training captions (the paper's 16,384-token vocabulary).

Built on Hugging Face ``tokenizers``: captions are normalised (Unicode NFKC / NFC
or none, then optionally lower-cased), split GPT-2 style into words over UTF-8
bytes, and merged by a BPE learned with ``fit``. Working on bytes means any
caption, in any script, encodes without an unknown token, and ``decode``
returns the normalised caption exactly.

Id 0 is ``<pad>`` (``dalle_framework.PAD_ID``); the 256 byte tokens follow, then
the merges in the order learned. ``vocab_size`` comes from the params alone, so
a prior can be sized before the tokenizer is trained; a small caption set may
learn fewer merges, leaving the top ids unused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from dalle_framework import PAD_ID, CaptionReading, Tokenizer, UsageError
from dalle_framework.rundir import write_text

from .params import BpeTokenizerParams

PAD_TOKEN = "<pad>"
FILE = "tokenizer.json"


class BpeTokenizer(Tokenizer):
    """Byte-level BPE trained on a data source's captions; ``encode(list[str]) -> LongTensor[B, text_len]``.

    Either ``fit(captions)`` (then ``save`` / ``load`` a directory's ``tokenizer.json``),
    or point ``path`` at an existing ``tokenizer.json`` whose id 0 is ``<pad>``.
    """

    Params = BpeTokenizerParams

    def __init__(self, params: Optional["BpeTokenizer.Params"] = None, **runtime) -> None:
        self.params = params or self.Params()
        self.vocab_size = self.params.vocab_size
        self.text_len = self.params.text_len
        self.bpe = None  # a tokenizers.Tokenizer once fitted or loaded
        if self.params.path is not None:
            self._load_file(Path(self.params.path))

    # ------------------------------------------------------------------ the pipeline

    def _normalizer(self):
        from tokenizers import normalizers

        steps = {"nfkc": [normalizers.NFKC()], "nfc": [normalizers.NFC()], "none": []}[self.params.normalization]
        if self.params.lowercase:
            steps.append(normalizers.Lowercase())
        return normalizers.Sequence(steps)

    def _empty(self):
        from tokenizers import Tokenizer as HfTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        bpe = HfTokenizer(models.BPE())
        bpe.normalizer = self._normalizer()
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        bpe.decoder = decoders.ByteLevel()
        return bpe

    @property
    def needs_fit(self) -> bool:
        return self.bpe is None

    def fit(self, captions: list[str]) -> None:
        """Learn merges from ``captions`` (deterministic for the same captions in the same order)."""
        from tokenizers import pre_tokenizers, trainers

        if not captions:
            raise UsageError("bpe tokenizer: no captions to fit on")
        trainer = trainers.BpeTrainer(
            vocab_size=self.vocab_size,
            min_frequency=self.params.min_frequency,
            special_tokens=[PAD_TOKEN],  # the first special token gets id 0
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        bpe = self._empty()
        bpe.train_from_iterator(captions, trainer=trainer, length=len(captions))
        self._check(bpe, "the fitted tokenizer")
        self.bpe = bpe

    def save(self, directory: Path) -> None:
        write_text(Path(directory) / FILE, self._require().to_str(pretty=True))

    def load(self, directory: Path) -> None:
        self._load_file(Path(directory) / FILE)

    def _load_file(self, path: Path) -> None:
        from tokenizers import Tokenizer as HfTokenizer

        if not path.is_file():
            raise UsageError(f"{path}: no tokenizer file; fit the bpe tokenizer first or fix tokenizer.params.path")
        try:
            bpe = HfTokenizer.from_str(path.read_text())
        except Exception as exc:  # the library raises a bare Exception on bad JSON
            raise UsageError(f"{path}: not a tokenizers JSON file ({exc})") from None
        self._check(bpe, str(path))
        self.bpe = bpe

    def _check(self, bpe, source: str) -> None:
        if bpe.token_to_id(PAD_TOKEN) != PAD_ID:
            raise UsageError(f"{source}: id {PAD_ID} must be the padding token {PAD_TOKEN!r}")
        size = bpe.get_vocab_size(with_added_tokens=True)
        if size > self.vocab_size:
            raise UsageError(f"{source}: holds {size} ids but tokenizer.params.vocab_size is {self.vocab_size}; set it to {size}")
        stored = json.loads(bpe.to_str()).get("normalizer")
        wanted = json.loads(self._empty().to_str()).get("normalizer")
        if stored != wanted:
            raise UsageError(
                f"{source}: its normaliser {stored} differs from what tokenizer.params ask for "
                f"(lowercase={self.params.lowercase}, normalization={self.params.normalization}); make them agree"
            )

    def _require(self):
        if self.bpe is None:
            raise UsageError(
                "bpe tokenizer is not trained yet: fit it on the training captions (`dalle tokenizer train RECIPE`) "
                "or set tokenizer.params.path to a tokenizer.json"
            )
        return self.bpe

    # ------------------------------------------------------------------ the contract

    def encode(self, texts: list[str]) -> torch.Tensor:
        assert not isinstance(texts, str), "encode takes a list of captions"
        bpe = self._require()
        out = torch.full((len(texts), self.text_len), PAD_ID, dtype=torch.long)
        for row, encoding in enumerate(bpe.encode_batch(list(texts), add_special_tokens=False)):
            ids = encoding.ids[: self.text_len]
            if ids:
                out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: torch.Tensor) -> list[str]:
        assert ids.ndim == 2, f"expected [B, T], got {tuple(ids.shape)}"
        bpe = self._require()
        return bpe.decode_batch([[i for i in row if i != PAD_ID] for row in ids.tolist()], skip_special_tokens=True)

    def read(self, texts: list[str]) -> list[CaptionReading]:
        bpe = self._require()
        encodings = bpe.encode_batch(list(texts), add_special_tokens=False)
        return [CaptionReading(tokens=len(e.ids), units=len(t.encode("utf-8"))) for e, t in zip(encodings, texts)]

    @property
    def learned_vocab_size(self) -> Optional[int]:
        return None if self.bpe is None else int(self.bpe.get_vocab_size(with_added_tokens=True))

    def normalize(self, text: str) -> str:
        """What ``decode(encode([text]))`` gives back when nothing is truncated."""
        return self._normalizer().normalize_str(text)
