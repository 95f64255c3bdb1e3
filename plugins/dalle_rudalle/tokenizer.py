"""ruDALL-E's tokenizer: its YouTokenToMe BPE (``bpe.model``) read without the YTTM package.

A caption becomes ``[BOS] ids [EOS]`` padded with YTTM's ``<PAD>`` (id 0, the
framework's ``PAD_ID``) and cut to ``text_len``, exactly as ruDALL-E's
``YTTMTokenizerWrapper.encode_text`` frames it; ruDALL-E's generation lower-cases and
strips the caption first, and so does this tokenizer unless ``lowercase: false``.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Optional

import torch

from dalle_framework import PAD_ID, Tokenizer, UsageError
from dalle_framework.convert import copy_released, write_converted

from .params import RudalleTokenizerParams
from .yttm import YttmEncoder, read_model

MODEL_FILE = "bpe.model"


class RudalleTokenizer(Tokenizer):
    """ruDALL-E's BPE (16,384 ids, 0 padding, 1 unknown, 2 BOS, 3 EOS): ``encode(list[str]) -> LongTensor[B, text_len]``.

    The model file is read on first use, so recipes can be inspected before it exists.
    Convert it once with ``dalle convert rudalle-bpe bpe.model OUT`` (it is copied and checked).
    """

    Params = RudalleTokenizerParams

    def __init__(self, params: Optional["RudalleTokenizer.Params"] = None, **runtime) -> None:
        self.params = params or self.Params()
        self.vocab_size = self.params.vocab_size
        self.text_len = self.params.text_len

    @cached_property
    def encoder(self) -> YttmEncoder:
        if self.params.path is None:
            raise UsageError("tokenizer rudalle-bpe: set tokenizer.params.path to ruDALL-E's bpe.model (`dalle convert rudalle-bpe bpe.model OUT` writes the block)")
        model = read_model(Path(self.params.path))
        if model.vocab_size != self.vocab_size:
            raise UsageError(f"{self.params.path}: holds {model.vocab_size} ids but tokenizer.params.vocab_size is {self.vocab_size}; set it to {model.vocab_size}")
        if model.pad_id != PAD_ID or min(model.bos_id, model.eos_id) < 0:
            raise UsageError(f"{self.params.path}: needs <PAD> at id {PAD_ID} and BOS / EOS tokens (ruDALL-E's model has them)")
        return YttmEncoder(model)

    def encode(self, texts: list[str]) -> torch.Tensor:
        assert not isinstance(texts, str), "encode takes a list of captions"
        model = self.encoder.model
        out = torch.full((len(texts), self.text_len), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            if self.params.lowercase:
                text = text.lower().strip()
            ids = [model.bos_id, *self.encoder.encode(text), model.eos_id][: self.text_len]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: torch.Tensor) -> list[str]:
        assert ids.ndim == 2, f"expected [B, T], got {tuple(ids.shape)}"
        model = self.encoder.model
        ignore = {model.eos_id, model.bos_id, model.unk_id, model.pad_id}
        return [self.encoder.decode(row, ignore) for row in ids.tolist()]

    @classmethod
    def convert_released(cls, files, out_dir, *, trust_pickle: bool, params=None) -> dict:
        """``bpe.model`` -> ``OUT/bpe.model`` (checked) and ``OUT/tokenizer.yaml``."""
        if len(files) != 1:
            raise UsageError(f"{cls.name}: give ruDALL-E's bpe.model and the output directory: dalle convert {cls.name} bpe.model OUT")
        model = read_model(Path(files[0]))  # refuse a file that is no YTTM model before writing anything
        copied = copy_released(Path(files[0]), Path(out_dir), MODEL_FILE)
        found = {"path": str(copied), "vocab_size": model.vocab_size}
        return write_converted(cls, out_dir, kind="tokenizer", params=found, sources=[Path(files[0])], overrides=params,
                               notes={"released_format": "YouTokenToMe 1.0 BPE model (ruDALL-E bpe.model)"})
