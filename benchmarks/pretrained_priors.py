"""What the converted priors cost at their released shapes on a CPU, beside their reference packages.

    .venv/bin/python benchmarks/pretrained_priors.py [--tokens 32] [--models malevich,mega] [--threads 1]

Prints one JSON object: per prior, its parameters, the memory of its fp32 weights and of
the sampler's key/value cache, and process CPU seconds (and wall seconds) per image token
for the first ``--tokens`` image tokens of one image, drawn by

- the framework's cached sampler (``dalle_framework.decoding.sample_image_tokens``: one
  prefill, then fixed-shape steps over preallocated caches), and
- the reference package's own loop in the same process: rudalle 1.1.3's
  ``generate_images`` loop (run call for call: it imports transformers 4.10 for its
  top-k filter, so greedy picks stand in for it), min-dalle 0.4.11's
  ``generate_raw_image_stream`` (its own loop, stopped at its first progressive output).

Weights are random (speed does not depend on them), and each model is built, timed and
freed in turn, so the peak memory is one model: about 5.3 GB for Malevich, 10.4 GB for
Mega, 1.6 GB for Mini. min-dalle always runs its "supercondition" guidance (two rows per
image); the framework's sampler is given the same guidance there.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the reference loaders the equality tests use

from dalle_framework import Sampling  # noqa: E402
from dalle_framework.decoding import sample_image_tokens  # noqa: E402
from dalle_framework.plugins import registry  # noqa: E402

GiB = 2**30
MALEVICH = dict(num_layers=24, hidden_size=2048, num_attention_heads=16, embedding_dropout_prob=0.1, output_dropout_prob=0.1,
                attention_dropout_prob=0.1, image_tokens_per_dim=32, text_seq_length=128, cogview_sandwich_layernorm=True,
                cogview_pb_relax=True, vocab_size=16384 + 128, image_vocab_size=8192)  # rudalle's MODELS["Malevich"]
MIN_DALLE = {  # min-dalle's MinDalle(is_mega=True / False)
    "mega": dict(layers=24, width=2048, heads=32, glu=4096, text_vocab=50272, image_vocab=16415),
    "mini": dict(layers=12, width=1024, heads=16, glu=2730, text_vocab=50264, image_vocab=16384),
}


def timed(fn) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def per_token(seconds: tuple[float, float], tokens: int) -> dict:
    return {"cpu_s_per_token": round(seconds[1] / tokens, 4), "wall_s_per_token": round(seconds[0] / tokens, 4)}


def framework_sampler(prior, text: torch.Tensor, tokens: int, guidance: float) -> dict:
    sampling = Sampling(top_k=1, guidance_scale=guidance)
    wall, cpu, _ = timed(lambda: sample_image_tokens(prior, text, sampling, image_len=tokens, generator=torch.Generator().manual_seed(0)))
    return {**per_token((wall, cpu), tokens), "ran": dict(prior.last_decode)}


def weights_gib(module: torch.nn.Module) -> float:
    return round(sum(p.numel() * p.element_size() for p in module.parameters()) / GiB, 2)


def malevich(tokens: int) -> dict:
    from references import rudalle, rudalle_loop

    dalle_model = rudalle("rudalle.dalle.model")
    text = torch.tensor([[2, *range(100, 110), 3] + [0] * 116])  # a 10-word caption framed as ruDALL-E frames it
    torch.manual_seed(0)
    reference = dalle_model.DalleModel(device="cpu", **MALEVICH).eval()
    wall, cpu, _ = timed(functools.partial(rudalle_loop, reference, text, tokens))
    result = {"reference": {"package": "rudalle 1.1.3", "loop": "generate_images (greedy)", **per_token((wall, cpu), tokens)}}
    del reference
    gc.collect()
    prior = registry("prior").build({"name": "rudalle", "params": {}}, text_vocab_size=16384, text_len=128, image_vocab_size=8192, grid=(32, 32)).eval()
    kv = 2 * prior.params.depth * prior.layout.seq_len * prior.params.dim * 4
    result.update(parameters=sum(p.numel() for p in prior.parameters()), weights_gib=weights_gib(prior), kv_cache_gib_per_row=round(kv / GiB, 3),
                  framework=framework_sampler(prior, text, tokens, 1.0))
    return result


def min_dalle(size: str, tokens: int) -> dict:
    from references import min_dalle_model

    shape = MIN_DALLE[size]
    torch.manual_seed(0)
    reference = min_dalle_model(shape)
    reference.tokenizer = _BartIds()
    stream = reference.generate_raw_image_stream(text="a painting", seed=1, grid_size=1, progressive_outputs=True, top_k=1,
                                                 supercondition_factor=16)
    wall, cpu, _ = timed(functools.partial(next, stream))  # its first progressive output: 32 tokens
    result = {"reference": {"package": "min-dalle 0.4.11", "loop": "generate_raw_image_stream (top_k 1, supercondition 16)",
                            "tokens": 32, **per_token((wall, cpu), 32)}}
    del reference, stream
    gc.collect()
    torch.set_grad_enabled(True)  # importing min_dalle switched it off process-wide; sampling switches it off itself
    params = {"dim": shape["width"], "layers": shape["layers"], "heads": shape["heads"], "glu_dim": shape["glu"],
              "text_vocab": shape["text_vocab"], "image_vocab": shape["image_vocab"]}
    prior = registry("prior").build({"name": "min-dalle", "params": params}, text_vocab_size=shape["text_vocab"] + 1, text_len=64,
                                    image_vocab_size=16384, grid=(16, 16)).eval()
    ids = [i + 1 for i in _BartIds.IDS]  # the min-dalle-bpe tokenizer's ids: BART's plus one, 0 padding
    text = torch.tensor([ids + [0] * (64 - len(ids))])
    kv = 2 * shape["layers"] * (256 + 64) * shape["width"] * 4
    result.update(parameters=sum(p.numel() for p in prior.parameters()), weights_gib=weights_gib(prior), kv_cache_gib_per_row=round(kv / GiB, 3),
                  framework=framework_sampler(prior, text, tokens, 16.0))
    return result


class _BartIds:
    """Stands in for min-dalle's TextTokenizer (its vocab.json is a download): fixed BART ids of a short caption."""

    IDS = [0, 10, 3035, 9, 10, 4758, 2]

    def tokenize(self, text: str, is_verbose: bool = False) -> list[int]:
        return list(self.IDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="image tokens drawn by the framework's sampler (min-dalle: its first 32)")
    parser.add_argument("--models", default="malevich,mega", help="comma-separated: malevich, mega, mini")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for both")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    runs = {"malevich": lambda: malevich(args.tokens), "mega": lambda: min_dalle("mega", args.tokens), "mini": lambda: min_dalle("mini", args.tokens)}
    out = {"tokens": args.tokens, "threads": args.threads, "torch": torch.__version__, "models": {}}
    for name in args.models.split(","):
        out["models"][name] = runs[name]()
        torch.set_num_threads(args.threads)
    out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB, 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
