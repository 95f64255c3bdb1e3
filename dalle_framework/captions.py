"""How a recipe's tokenizer reads its captions: unknown words, lengths against ``text_len``, learned vocabulary.

Reported when a run is prepared (``dalle train`` / ``dalle run``) and by ``dalle tokenizer
train``. A tokenizer that reads more than ``tokenizer.max_unknown`` of a split's caption
words as unknown would train a model on ``<unk>``s without a word said: that run is refused,
naming the words and the fix.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from .errors import UsageError
from .interfaces import Tokenizer

SAMPLE = 10_000  # captions read per split: enough for shares and percentiles, quick on any data set


def percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] if ordered else 0


def read_split(tokenizer: Tokenizer, captions: list[str]) -> dict[str, Any]:
    readings = tokenizer.read(captions)
    units = sum(r.units for r in readings)
    unknown = Counter(w for r in readings for w in r.unknown_words)
    lengths = [r.tokens for r in readings]
    return {
        "captions": len(captions),
        "unknown_share": round(sum(unknown.values()) / max(units, 1), 4),
        "unknown_words": [[word, count] for word, count in unknown.most_common(8)],
        "truncated_share": round(sum(n > tokenizer.text_len for n in lengths) / max(len(lengths), 1), 4),
        "tokens": {"p50": percentile(lengths, 0.5), "p99": percentile(lengths, 0.99), "max": max(lengths, default=0)},
    }


def caption_report(tokenizer: Tokenizer, captions: dict[str, list[str]]) -> dict[str, Any]:
    """Per split (``captions[split]``): unknown share and the commonest unknown words, the share cut at
    ``text_len``, token-count percentiles; then the vocabulary learned against the one asked for,
    and what to set where the two disagree."""
    report: dict[str, Any] = {"text_len": tokenizer.text_len, "splits": {s: read_split(tokenizer, c) for s, c in captions.items()}}
    advice = []
    learned = tokenizer.learned_vocab_size
    if learned is not None:
        report["vocab"] = {"asked": tokenizer.vocab_size, "learned": learned}
        if learned < 0.9 * tokenizer.vocab_size:
            advice.append(f"the tokenizer learned {learned} ids of the {tokenizer.vocab_size} asked for: set tokenizer.params.vocab_size "
                          f"to {learned} (the prior's text embedding and logits are sized by it)")
    longest = max((s["tokens"]["max"] for s in report["splits"].values()), default=0)
    p99 = max((s["tokens"]["p99"] for s in report["splits"].values()), default=0)
    cut = max((s["truncated_share"] for s in report["splits"].values()), default=0.0)
    if cut > 0.01:
        advice.append(f"{cut:.0%} of captions need more than text_len {tokenizer.text_len} tokens and are cut: "
                      f"set tokenizer.params.text_len to {p99} or more (99% need at most {p99})")
    elif longest and tokenizer.text_len > 2 * longest + 8:
        advice.append(f"captions need at most {longest} tokens, so text_len {tokenizer.text_len} pads every caption with at least "
                      f"{tokenizer.text_len - longest} positions the prior attends over each step: set tokenizer.params.text_len to {longest}")
    report["advice"] = advice
    return report


def check_coverage(report: dict[str, Any], max_unknown: float, tokenizer_name: str) -> None:
    """Refuse a run whose tokenizer reads more than ``max_unknown`` of a split's words as unknown."""
    for split, figures in report["splits"].items():
        if figures["unknown_share"] > max_unknown:
            words = ", ".join(f"{w!r} ({n}x)" for w, n in figures["unknown_words"])
            raise UsageError(
                f"tokenizer {tokenizer_name!r} reads {figures['unknown_share']:.1%} of the {split} caption words as unknown "
                f"(more than tokenizer.max_unknown = {max_unknown:.1%}), e.g. {words}: the model would learn from <unk>s. "
                "Add the words to tokenizer.params.vocab, use a tokenizer that learns from the captions (name: bpe), "
                "or raise tokenizer.max_unknown"
            )


def format_report(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    lines = []
    for split, s in report["splits"].items():
        unknown = f", {s['unknown_share']:.1%} of words unknown" if s["unknown_share"] else ""
        lines.append(f"text {split}: {s['captions']} captions, tokens p50 {s['tokens']['p50']} / p99 {s['tokens']['p99']} / max "
                     f"{s['tokens']['max']} of text_len {report['text_len']}{unknown}")
    if "vocab" in report:
        lines.append(f"text vocabulary: {report['vocab']['learned']} ids learned of {report['vocab']['asked']} asked for")
    lines += [f"note: {line}" for line in report["advice"]]
    return "\n".join(lines)


def reading_notes(tokenizer: Tokenizer, captions: list[str]) -> list[str]:
    """A line for each caption the model reads otherwise than written: unknown words, or cut at ``text_len``."""
    notes = []
    for caption, reading, read_as in zip(captions, tokenizer.read(captions), tokenizer.decode(tokenizer.encode(captions))):
        why = []
        if reading.unknown:
            why.append(f"unknown: {', '.join(dict.fromkeys(reading.unknown_words))}")
        if reading.tokens > tokenizer.text_len:
            why.append(f"{reading.tokens} tokens cut to text_len {tokenizer.text_len}")
        if why:
            notes.append(f"the model reads {caption!r} as {read_as!r} ({'; '.join(why)})")
    return notes
