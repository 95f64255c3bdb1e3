"""YouTokenToMe BPE models, read and applied in Python (no ``youtokentome`` package needed).

A YTTM model file (ruDALL-E's ``bpe.model``) is plain text:

    n m                  characters and merge rules
    codepoint id         n lines: a Unicode character and its id
    x y z                m lines: merging ids x and y gives id z, in priority order
    unk pad bos eos      the special ids (-1 when absent)

Encoding works word by word, as YTTM's C++ encoder does: trailing white space is dropped,
the text is split at white space (the six ASCII space characters and U+2581, the meta
space), each word starts with the meta space, a run of characters the model does not know
becomes one unknown token, and merges are applied lowest rule first, leftmost first,
until no rule applies.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from pathlib import Path

from dalle_framework import UsageError

META_SPACE = 0x2581  # "▁": marks the start of a word
ASCII_SPACES = frozenset(map(ord, " \t\n\v\f\r"))  # C's isspace in the C locale
DEAD = (0, -1, -1)  # a merged-away node: token 0, unlinked (as the C++ marks it)


def is_space(codepoint: int) -> bool:
    return codepoint in ASCII_SPACES or codepoint == META_SPACE


@dataclass(frozen=True)
class YttmModel:
    """The content of a YTTM model file."""

    char_ids: dict[int, int]  # codepoint -> id
    rules: list[tuple[int, int, int]]  # (x, y, z) in priority order
    unk_id: int
    pad_id: int
    bos_id: int
    eos_id: int

    @property
    def vocab_size(self) -> int:
        specials = sum(i != -1 for i in (self.unk_id, self.pad_id, self.bos_id, self.eos_id))
        return len(self.rules) + len(self.char_ids) + specials


def read_model(path: Path) -> YttmModel:
    """Parse a YTTM model file; anything that is not one is a clear error naming the file."""
    path = Path(path)
    try:
        numbers = [int(word) for word in path.read_text(encoding="utf-8").split()]
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file; give ruDALL-E's YouTokenToMe bpe.model") from None
    except (ValueError, UnicodeDecodeError):
        raise UsageError(f"{path}: not a YouTokenToMe model (expected whitespace-separated integers)") from None
    if len(numbers) < 2:
        raise UsageError(f"{path}: not a YouTokenToMe model (too short)")
    n, m = numbers[0], numbers[1]
    if n < 0 or m < 0 or len(numbers) != 2 + 2 * n + 3 * m + 4:
        raise UsageError(f"{path}: not a YouTokenToMe model ({n} characters and {m} rules do not match its length)")
    body = numbers[2:]
    chars = {body[2 * i]: body[2 * i + 1] for i in range(n)}
    rules_at = 2 * n
    rules = [tuple(body[rules_at + 3 * i : rules_at + 3 * i + 3]) for i in range(m)]
    unk, pad, bos, eos = body[rules_at + 3 * m :]
    if META_SPACE not in chars:
        raise UsageError(f"{path}: a YouTokenToMe model must know the meta space U+2581")
    return YttmModel(chars, rules, unk, pad, bos, eos)  # type: ignore[arg-type]


class YttmEncoder:
    """Encodes text to ids and decodes ids to text exactly as YTTM 1.0.6 does (without BPE dropout)."""

    def __init__(self, model: YttmModel) -> None:
        self.model = model
        self.rule_of = {(x, y): i for i, (x, y, _) in enumerate(model.rules)}
        id_to_char = {i: c for c, i in model.char_ids.items()}
        recipe: dict[int, list[int]] = {i: [c] for i, c in id_to_char.items()}  # id -> codepoints it spells
        for x, y, z in model.rules:
            recipe[z] = recipe[x] + recipe[y]
        self.recipe = recipe

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (no BOS / EOS)."""
        codepoints = [ord(c) for c in text if not 0xD800 <= ord(c) <= 0xDFFF]  # lone surrogates are not UTF-8
        while codepoints and is_space(codepoints[-1]):
            codepoints.pop()
        ids: list[int] = []
        i = 0
        while i < len(codepoints):
            while is_space(codepoints[i]):
                i += 1
            end = i
            while end < len(codepoints) and not is_space(codepoints[end]):
                end += 1
            ids.extend(self._word(codepoints[i:end]))
            i = end
        return ids

    def _word(self, word: list[int]) -> list[int]:
        """One word's ids: the meta space and its characters, merged by the rules."""
        chars, unknown = self.model.char_ids, None
        tokens = [chars[META_SPACE]]
        for codepoint in word:
            if codepoint in chars:
                tokens.append(chars[codepoint])
                unknown = None
            elif unknown is None:  # a run of unknown characters is one token
                unknown = -1 - len(tokens)
                tokens.append(unknown)
        nodes = [[token, i - 1, i + 1] for i, token in enumerate(tokens)]
        nodes[-1][2] = -1
        queue: list[tuple[int, int]] = []
        for pos in range(len(nodes) - 1):
            self._push(queue, nodes, pos)
        while queue:
            rule, pos1 = heapq.heappop(queue)
            x, y, z = self.model.rules[rule]
            pos2 = nodes[pos1][2]
            if nodes[pos1][0] != x or pos2 == -1 or nodes[pos2][0] != y:
                continue  # stale: one side was merged since this pair was queued
            pos0, pos3 = nodes[pos1][1], nodes[pos2][2]
            nodes[pos2] = list(DEAD)
            nodes[pos1] = [z, pos0, pos3]
            if pos3 != -1:
                nodes[pos3][1] = pos1
            if pos0 != -1:
                self._push(queue, nodes, pos0)
            if pos3 != -1:
                self._push(queue, nodes, pos1)
        out, pos = [], next(i for i, node in enumerate(nodes) if node[0] != 0)
        while pos != -1:
            token = nodes[pos][0]
            out.append(self.model.unk_id if token < 0 else token)
            pos = nodes[pos][2]
        return out

    def _push(self, queue: list[tuple[int, int]], nodes: list[list[int]], pos: int) -> None:
        rule = self.rule_of.get((nodes[pos][0], nodes[nodes[pos][2]][0]))
        if rule is not None:
            heapq.heappush(queue, (rule, pos))

    def decode(self, ids: list[int], ignore: set[int]) -> str:
        """Text of ``ids`` (those in ``ignore`` skipped); a word's meta space reads as a space, the first one dropped."""
        m = self.model
        specials = {m.unk_id: "<UNK>", m.pad_id: "<PAD>", m.bos_id: "<BOS>", m.eos_id: "<EOS>"}
        text = ""
        first = True
        for token in ids:
            if token in ignore:
                continue
            if not 0 <= token < m.vocab_size:
                raise UsageError(f"token id {token} is outside the vocabulary [0, {m.vocab_size})")
            if token in specials and token != -1:
                piece = specials[token]
            else:
                spelled = self.recipe[token]
                piece = (" " + _chars(spelled[1:])) if spelled[0] == META_SPACE else _chars(spelled)
            text += piece
            if first and text.startswith(" "):
                text = text[1:]
            first = False
        return text


def _chars(codepoints: list[int]) -> str:
    return "".join(map(chr, codepoints))
