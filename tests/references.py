"""The reference packages the pretrained-prior tests compare against, imported as they can be offline.

scripts/env.sh installs them for tests only, without their dependencies:
``youtokentome`` 1.0.6, ``rudalle`` 1.1.3 and ``min-dalle`` 0.4.11 (plus PyWavelets,
omegaconf and emoji, which their model code imports).

ruDALL-E's package ``__init__`` files import download helpers that no longer exist
(``huggingface_hub.cached_download``) and ``transformers`` 4.10; its model code does not.
:func:`rudalle` therefore imports the model modules under their real package names
without running those ``__init__`` files: the code compared against is the package's,
unchanged. min-dalle's package switches gradients off and sets the thread count for the
whole process when imported, so it is only imported in subprocesses (:func:`run_min_dalle`).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

RUDALLE_PACKAGES = ("rudalle", "rudalle.dalle", "rudalle.vae")


def torch_no_grad(fn):
    """``torch.no_grad`` applied at call time (this module imports torch lazily)."""

    def wrapped(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    wrapped.__doc__, wrapped.__name__ = fn.__doc__, fn.__name__
    return wrapped


def reference(module: str):
    """Import a reference package; CI (DALLE_REQUIRE_DATA=1, scripts/env.sh) must have it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        message = f"reference package missing ({exc}); scripts/env.sh installs youtokentome, rudalle and min-dalle for the tests"
        if os.environ.get("DALLE_REQUIRE_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)


def rudalle(module: str):
    """A module of rudalle 1.1.3 (``rudalle.dalle.model``), its package ``__init__`` files skipped."""
    if "rudalle" not in sys.modules:
        spec = importlib.util.find_spec("rudalle")
        if spec is None or spec.submodule_search_locations is None:
            return reference("rudalle")  # skips (or fails in CI) with the install hint
        root = Path(next(iter(spec.submodule_search_locations)))
        for name in RUDALLE_PACKAGES:
            location = root.joinpath(*name.split(".")[1:])
            package = types.ModuleType(name)
            package.__path__ = [str(location)]
            package.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            package.__spec__.submodule_search_locations = [str(location)]
            sys.modules[name] = package
    return importlib.import_module(module)


@torch_no_grad
def rudalle_loop(ref, text, steps: int, pick=None):
    """rudalle's ``generate_images`` loop: a cached forward over the growing sequence per image token.

    ``generate_images`` itself imports transformers 4.10 for ``top_k_top_p_filtering``, so the
    loop runs here call for call with ``pick(logits[B, image_vocab]) -> [B, 1]`` in place of
    the filter and multinomial (default: greedy). Returns the ``steps`` image tokens drawn.
    """
    import torch

    pick = pick or (lambda logits: logits.argmax(-1, keepdim=True))
    total = ref.total_seq_length
    mask = torch.tril(torch.ones(len(text), 1, total, total, device=text.device))
    out, cache = text.clone(), None
    for _ in range(steps):
        logits, cache = ref(out, mask, use_cache=True, cache=cache, return_loss=False)
        out = torch.cat([out, pick(logits[:, -1, ref.vocab_size :])], dim=-1)
    return out[:, ref.text_seq_length :]


def min_dalle_model(shape: dict, tokenizer=None, encoder=None, decoder=None):
    """A ``min_dalle.MinDalle`` built offline (its ``__init__`` would download) whose own sampling loop
    returns the finished tokens instead of decoding them to pixels. Imports min_dalle, which turns
    gradients off and asks for every core process-wide: call it in a subprocess or a benchmark."""
    import torch
    from min_dalle import MinDalle
    from min_dalle.models import DalleBartDecoder, DalleBartEncoder

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    class TokenTap(MinDalle):
        def image_grid_from_tokens(self, image_tokens, is_seamless, is_verbose=False):
            return image_tokens

    s = shape
    model = TokenTap.__new__(TokenTap)
    model.device, model.is_mega, model.is_reusable, model.dtype, model.is_verbose = "cpu", True, True, torch.float32, False
    model.text_token_count, model.layer_count, model.attention_head_count = 64, s["layers"], s["heads"]
    model.embed_count, model.glu_embed_count = s["width"], s["glu"]
    model.text_vocab_count, model.image_vocab_count = s["text_vocab"], s["image_vocab"]
    model.tokenizer = tokenizer
    model.encoder = encoder or DalleBartEncoder(layer_count=s["layers"], embed_count=s["width"], attention_head_count=s["heads"],
                                                text_vocab_count=s["text_vocab"], text_token_count=64, glu_embed_count=s["glu"], device="cpu").eval()
    model.decoder = decoder or DalleBartDecoder(image_vocab_count=s["image_vocab"], embed_count=s["width"], attention_head_count=s["heads"],
                                                glu_embed_count=s["glu"], layer_count=s["layers"], device="cpu").eval()
    return model


def run_min_dalle(script: str, **inputs) -> dict:
    """Run ``script`` (Python using ``min_dalle``) in a subprocess with ``inputs`` as JSON in ``INPUTS``;
    it prints one JSON object, returned here."""
    if importlib.util.find_spec("min_dalle") is None:
        reference("min_dalle")
    tests = str(Path(__file__).resolve().parent)
    env = {**os.environ, "INPUTS": json.dumps(inputs), "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


MIN_DALLE_RELEASE = '''
import json, os, torch
inputs = json.loads(os.environ["INPUTS"])
from min_dalle.models import DalleBartEncoder, DalleBartDecoder
s = inputs["shape"]
torch.manual_seed(inputs["seed"])
encoder = DalleBartEncoder(layer_count=s["layers"], embed_count=s["width"], attention_head_count=s["heads"],
                           text_vocab_count=s["text_vocab"], text_token_count=64, glu_embed_count=s["glu"], device="cpu")
decoder = DalleBartDecoder(image_vocab_count=s["image_vocab"], embed_count=s["width"], attention_head_count=s["heads"],
                           glu_embed_count=s["glu"], layer_count=s["layers"], device="cpu")
with torch.no_grad():  # released weights are trained: spread the norms so outputs vary
    for name, param in [*encoder.named_parameters(), *decoder.named_parameters()]:
        if "ln" in name or "layer_norm" in name or "layernorm" in name:
            param.add_(torch.randn_like(param) * s["spread"])
        elif param.dim() > 1:
            param.normal_(0, s["std"])
torch.save(encoder.state_dict(), inputs["out"] + "/encoder.pt")
torch.save(decoder.state_dict(), inputs["out"] + "/decoder.pt")
print(json.dumps({"saved": True}))
'''

MIN_DALLE_SAMPLE = '''
import json, os, torch
from references import min_dalle_model
inputs = json.loads(os.environ["INPUTS"])
from min_dalle.text_tokenizer import TextTokenizer
vocab = json.load(open(inputs["vocab"], encoding="utf8"))
merges = open(inputs["merges"], encoding="utf8").read().split("\\n")[1:-1]
model = min_dalle_model(inputs["shape"], tokenizer=TextTokenizer(vocab, merges))
model.encoder.load_state_dict(torch.load(inputs["dir"] + "/encoder.pt"))
model.decoder.load_state_dict(torch.load(inputs["dir"] + "/decoder.pt"))
out = {"tokens": {}, "samples": {}}
for text in inputs["captions"]:
    out["tokens"][text] = model.tokenizer.tokenize(text)
for text in inputs["sample"]:
    stream = model.generate_raw_image_stream(text=text, seed=1, grid_size=1, top_k=1, supercondition_factor=inputs["factor"])
    out["samples"][text] = next(stream).tolist()
# logits of a fixed image sequence, without the cache (the decoder's multi-token path)
s = inputs["shape"]
ids = model.tokenizer.tokenize(inputs["sample"][0])[:64]
text = torch.ones(2, 64, dtype=torch.long)
text[0, :2] = torch.tensor([ids[0], ids[-1]])
text[1, :len(ids)] = torch.tensor(ids)
with torch.no_grad():
    state = model.encoder(text)
    prev = torch.tensor([[2 ** 14 - 1] + inputs["image"][:255]])
    logits, _ = model.decoder(attention_mask=text.not_equal(1)[:, None, None, :], encoder_state=state,
                              attention_state=torch.zeros(s["layers"], 4, 256, s["width"]), prev_tokens=prev,
                              token_index=torch.arange(256))
out["logits"] = logits[:, :, :2 ** 14].clone()
torch.save(out, inputs["result"])  # logits are millions of numbers: a tensor file, not JSON
print(json.dumps({"saved": inputs["result"]}))
'''
