"""``dalle plugins new NAME --kind KIND``: an installable plugin package to start from.

It writes ``NAME/`` with a ``pyproject.toml`` naming the entry point, a package
``dalle_<name>`` holding one component of the kind that follows the contract's shapes
(small, but a real implementation: it trains), the hook that registers it and the hook
that ships its recipe, a test that passes, and a recipe that uses it::

    pip install -e NAME && pytest NAME/tests && dalle train NAME-demo
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path
from typing import Any

from .errors import UsageError

NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")

PYPROJECT = '''[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "dalle-{name}"
version = "0.1.0"
description = "A dalle-framework plugin: {summary}"
dependencies = ["dalle-framework"]

[project.entry-points.dalle_framework]
{name} = "{package}"

[tool.setuptools]
packages = ["{package}"]

[tool.setuptools.package-data]
"{package}" = ["recipes/*.yaml"]
'''

HEADER = '''"""dalle-{name}: {summary}.

Registered through the ``dalle_framework`` entry point in pyproject.toml; the recipe in
``recipes/{name}-demo.yaml`` uses it (``dalle train {name}-demo``).
"""

{imports}
'''


def imports(*lines: str, framework: str) -> str:
    """The generated module's imports: standard library, third party, then dalle_framework."""
    std = [line for line in lines if line.split()[1] in {"pathlib", "zlib"}]
    rest = [line for line in lines if line not in std]
    return "\n".join(["from pathlib import Path", *std]) + "\n\n" + "\n".join(rest) + f"\n\nfrom dalle_framework import {framework}"


TORCH, NN, FIELD = "import torch", "from torch import nn", "from pydantic import Field"

FOOTER = '''

@hookimpl
def {hook}(registry):
    registry.register({cls}, name="{name}")


@hookimpl
def dalle_register_recipe_dirs(register):
    register(Path(__file__).parent / "recipes")
'''

# One entry per kind: the module's imports, its hook, the component, the recipe lines and the test.
KINDS: dict[str, dict[str, str]] = {}

KINDS["codec"] = dict(
    imports=imports(TORCH, FIELD, NN, framework="ImageCodec, Params, hookimpl"),
    hook="dalle_register_codecs", summary="an image codec: each cell of a grid becomes the nearest learned colour",
    body='''

class {cls}(ImageCodec):
    """Each cell of a ``cells x cells`` grid becomes the nearest of ``codes`` learned colours."""

    class Params(Params):
        image_size: int = Field(32, ge=4, le=1024, description="square input size")
        cells: int = Field(8, ge=1, le=256, description="token grid side")
        codes: int = Field(16, ge=2, le=65536, description="vocabulary: the learned colours")

    def __init__(self, params):
        super().__init__()
        self.params = params
        self.image_size, self.grid, self.vocab_size = params.image_size, (params.cells, params.cells), params.codes
        self.palette = nn.Parameter(torch.rand(params.codes, 3))

    def cells(self, images):
        """[B, 3, H, W] in [0, 1] -> the mean colour of each cell [B, cells*cells, 3]."""
        return nn.functional.adaptive_avg_pool2d(images, self.grid).flatten(2).transpose(1, 2)

    def encode(self, images):
        """[B, 3, H, W] in [0, 1] -> LongTensor [B, cells*cells]."""
        cells = self.cells(images)
        return torch.cdist(cells, self.palette.expand(len(images), -1, -1)).argmin(-1)

    def decode(self, tokens):
        """LongTensor [B, cells*cells] -> [B, 3, H, W] in [0, 1]."""
        colours = self.palette[tokens].clamp(0, 1).transpose(1, 2).reshape(len(tokens), 3, *self.grid)
        return nn.functional.interpolate(colours, size=self.image_size, mode="nearest")

    def loss(self, images, step=0):
        # each colour moves toward the cells that chose it (the gradient flows through the lookup)
        mse = (self.palette[self.encode(images)] - self.cells(images)).pow(2).mean()
        return {{"loss": mse}}
''',
    recipe='''codec:
  name: {name}
  params: {{image_size: 32, cells: 8, codes: 64}}
  train: {{steps: 200, batch_size: 32, lr: 1.0e-2}}
''',
    test='''

def test_the_codec_follows_the_contract():
    codec = build("codec")
    images = torch.rand(2, 3, codec.image_size, codec.image_size)
    tokens = codec.encode(images)
    assert tokens.shape == (2, codec.grid[0] * codec.grid[1]) and tokens.dtype == torch.long
    assert 0 <= int(tokens.min()) and int(tokens.max()) < codec.vocab_size
    decoded = codec.decode(tokens).detach()
    assert decoded.shape == images.shape and 0 <= float(decoded.min()) and float(decoded.max()) <= 1
    codec.loss(images)["loss"].backward()
    assert codec.palette.grad is not None
''',
)

KINDS["prior"] = dict(
    imports=imports(TORCH, FIELD, NN, framework="Params, Prior, hookimpl"),
    hook="dalle_register_priors", summary="an image-token prior: a learned distribution per image position",
    body='''

class {cls}(Prior):
    """Ignores the caption; each image position draws from a distribution it learns."""

    class Params(Params):
        smoothing: float = Field(0.0, ge=0, le=1, description="label smoothing of its loss")

    def __init__(self, params, *, text_vocab_size, text_len, image_vocab_size, grid):
        super().__init__()
        self.params, self.positions = params, grid[0] * grid[1]
        self.logits = nn.Parameter(torch.zeros(self.positions, image_vocab_size))

    def loss(self, text, image_tokens):
        """text [B, T], image_tokens [B, h*w] -> loss, image_loss, text_loss (nats per token)."""
        logits = self.logits.expand(len(image_tokens), -1, -1).flatten(0, 1)
        nll = nn.functional.cross_entropy(logits, image_tokens.flatten(), label_smoothing=self.params.smoothing)
        return {{"loss": nll, "image_loss": nll.detach(), "text_loss": torch.zeros(())}}

    def generate(self, text, sampling, prime=None, generator=None, on_step=None):
        """text [B, T] -> LongTensor [B, h*w]; ``prime [B, n]`` keeps the first n tokens."""
        probs = (self.logits / sampling.temperature).softmax(-1).cpu()
        out = torch.stack([torch.multinomial(probs, 1, generator=generator).squeeze(1) for _ in range(len(text))])
        if prime is not None:
            out[:, : prime.shape[1]] = prime.cpu()
        if on_step is not None:
            on_step(self.positions, self.positions)  # every position is drawn at once
        return out.to(text.device)
''',
    recipe='''prior:
  name: {name}
  params: {{}}
  train: {{steps: 100, batch_size: 32, lr: 1.0e-1}}
''',
    test='''

def test_the_prior_follows_the_contract():
    from dalle_framework import Sampling

    prior = build("prior", text_vocab_size=20, text_len=8, image_vocab_size=16, grid=(4, 4))
    text, tokens = torch.randint(0, 20, (3, 8)), torch.randint(0, 16, (3, 16))
    out = prior.loss(text, tokens)
    assert {{"loss", "image_loss", "text_loss"}} <= set(out)
    out["loss"].backward()
    drawn = prior.generate(text, Sampling(), generator=torch.Generator().manual_seed(0))
    assert drawn.shape == (3, 16) and int(drawn.max()) < 16
''',
)

KINDS["reranker"] = dict(
    imports=imports("import zlib", TORCH, FIELD, NN, framework="Params, Reranker, hookimpl"),
    hook="dalle_register_rerankers", summary="a reranker: how well a caption's words predict an image's mean colour",
    body='''

class {cls}(Reranker):
    """Scores a caption by how well its words predict the image's mean colour."""

    class Params(Params):
        buckets: int = Field(256, ge=1, le=65536, description="hashed word buckets")

    def __init__(self, params):
        super().__init__()
        self.buckets = params.buckets
        self.colour_of_word = nn.EmbeddingBag(params.buckets, 3, mode="mean")

    def predict(self, texts):
        """The mean colour [B, 3] the words of each caption suggest."""
        ids = [[zlib.crc32(w.encode()) % self.buckets for w in t.lower().split()] or [0] for t in texts]
        flat = torch.tensor([i for row in ids for i in row])
        offsets = torch.tensor([0, *torch.tensor([len(r) for r in ids]).cumsum(0)[:-1].tolist()])
        device = self.colour_of_word.weight.device
        return self.colour_of_word(flat.to(device), offsets.to(device))

    def score(self, images, texts):
        """images [B, 3, H, W] in [0, 1], B captions -> FloatTensor [B] (higher: a better match)."""
        return -(self.predict(texts) - images.mean(dim=(2, 3))).pow(2).sum(-1)

    def loss(self, images, texts):
        return {{"loss": (self.predict(texts) - images.mean(dim=(2, 3))).pow(2).mean()}}
''',
    recipe='''reranker:
  name: {name}
  params: {{buckets: 256}}
  train: {{steps: 100, batch_size: 64, lr: 1.0e-1}}
''',
    test='''

def test_the_reranker_follows_the_contract():
    reranker = build("reranker")
    images, texts = torch.rand(3, 3, 16, 16), ["a red circle", "a blue square", "a green triangle"]
    scores = reranker.score(images, texts)
    assert scores.shape == (3,)
    reranker.loss(images, texts)["loss"].backward()
    assert reranker.similarity(images, texts).shape == (3, 3)
''',
)

KINDS["data"] = dict(
    imports=imports("import numpy as np", TORCH, FIELD, framework="DataSource, Params, Sample, hookimpl"),
    hook="dalle_register_datasources", summary="a data source: solid-colour images captioned with their colour",
    body='''

COLOURS = {{"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40), "white": (245, 245, 245)}}


class {cls}(DataSource):
    """Images of one colour, captioned "a <colour> square". Split: every tenth sample is held out."""

    class Params(Params):
        image_size: int = Field(32, ge=4, le=1024, description="square side")
        samples: int = Field(500, ge=10, le=10**7, description="images in both splits together")

    def __init__(self, params, **runtime):
        self.params, self.image_size, self.skipped = params, params.image_size, 0

    def size(self, split):
        return sum(1 for i in range(self.params.samples) if (i % 10 == 0) == (split == "heldout"))

    def samples(self, split):
        """uint8 [H, W, 3] images with their captions, in a fixed order."""
        names = list(COLOURS)
        for i in range(self.params.samples):
            if (i % 10 == 0) != (split == "heldout"):
                continue
            name = names[i % len(names)]
            image = np.full((self.image_size, self.image_size, 3), COLOURS[name], np.uint8)
            yield Sample(image=image, caption=f"a {{name}} square", key=str(i))

    def judge(self, images, captions):
        """An oracle: is each image (float [B, 3, H, W] in [0, 1]) nearest in colour to the one its caption names?"""
        palette = torch.tensor(list(COLOURS.values()), dtype=torch.float) / 255
        nearest = torch.cdist(images.float().mean(dim=(2, 3)).cpu(), palette).argmin(-1)
        names = list(COLOURS)
        return {{"colour": [names[int(n)] in c for n, c in zip(nearest, captions)], "all": [names[int(n)] in c for n, c in zip(nearest, captions)]}}
''',
    recipe='''data:
  name: {name}
  params: {{image_size: 32, samples: 500}}
tokenizer:
  name: words
  params: {{vocab: [a, square, red, green, blue, yellow, white], text_len: 4}}
''',
    test='''

def test_the_data_source_follows_the_contract():
    source = build("data")
    train, heldout = list(source.samples("train")), list(source.samples("heldout"))
    assert len(train) == source.size("train") and len(heldout) == source.size("heldout") > 0
    assert train[0].image.dtype.name == "uint8" and train[0].image.shape == (32, 32, 3)
    assert isinstance(train[0].caption, str) and train[0].caption
    images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 for s in heldout[:5]])
    assert all(source.judge(images, [s.caption for s in heldout[:5]])["all"])
''',
)

KINDS["tokenizer"] = dict(
    imports=imports(TORCH, FIELD, framework="PAD_ID, Params, Tokenizer, hookimpl"),
    hook="dalle_register_tokenizers", summary="a tokenizer: one id per letter",
    body='''

LETTERS = "abcdefghijklmnopqrstuvwxyz "
UNKNOWN = 1


class {cls}(Tokenizer):
    """One id per lower-case letter or space (ids 2..28); anything else is id 1; 0 is padding."""

    class Params(Params):
        text_len: int = Field(48, ge=1, le=4096, description="letters per caption")

    def __init__(self, params, **runtime):
        self.params, self.text_len, self.vocab_size = params, params.text_len, len(LETTERS) + 2

    def encode(self, texts):
        """list[str] of B -> LongTensor [B, text_len], padded with 0."""
        out = torch.full((len(texts), self.text_len), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [LETTERS.find(c) + 2 if c in LETTERS else UNKNOWN for c in text.lower()][: self.text_len]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids):
        return ["".join(LETTERS[i - 2] if i >= 2 else "?" for i in row.tolist() if i != PAD_ID) for row in ids]
''',
    recipe='''tokenizer:
  name: {name}
  params: {{text_len: 32}}
''',
    test='''

def test_the_tokenizer_follows_the_contract():
    tokenizer = build("tokenizer")
    ids = tokenizer.encode(["a red circle", "b"])
    assert ids.shape == (2, tokenizer.text_len) and int(ids.max()) < tokenizer.vocab_size and int(ids[1, 1]) == 0
    assert tokenizer.decode(ids) == ["a red circle", "b"]
''',
)

KINDS["stage"] = dict(
    imports=imports(TORCH, framework="Stage, hookimpl"),
    hook="dalle_register_stages", summary="a stage: a reranker trained on images as the codec reconstructs them",
    body='''

class {cls}(Stage):
    """Trains a reranker on the codec's reconstructions of the data: images as generated ones will look."""

    kind = "reranker"  # the registry its block's component comes from
    after = ("codec",)  # trained after the codec, and again when the codec changes

    def columns(self, split):
        images, captions = self.pipe.split(split)
        return [images, captions]

    @torch.no_grad()
    def reconstruct(self, images, device):
        codec = self.pipe.component("codec")
        return codec.decode(codec.encode(images.to(device).float() / 255)).clamp(0, 1)

    def step_args(self, batch, step, device):
        return (self.reconstruct(batch[0], device), list(batch[1]))
''',
    recipe='''{name}:
  name: clip
  params:
    config:
      embed_dim: 64
      vision_cfg: {{image_size: 32, patch_size: 8, width: 64, layers: 2, head_width: 32}}
      text_cfg: {{context_length: 16, width: 64, heads: 2, layers: 2}}
  train: {{steps: 100, batch_size: 64, lr: 1.0e-3}}
''',
    test='''

def test_the_stage_is_registered_and_its_block_validates():
    assert manager().stages()["{name}"].after == ("codec",)
''',
)

TEST = '''"""dalle-{name}'s own test: the component follows its contract and the shipped recipe validates."""

from pathlib import Path
{torch_import}
import {package}
from dalle_framework.plugins import PluginManager, set_plugin_manager
from dalle_framework.recipe import load_recipe

RECIPE = Path({package}.__file__).parent / "recipes" / "{name}-demo.yaml"


def manager():
    """The plugins installed here, this one too (added by hand when run from a checkout not yet installed)."""
    pm = PluginManager()
    if "{name}" not in pm.plugins:
        pm.add_plugin({package}, name="{name}")
    return pm


def build(kind, **runtime):
    return manager().registry(kind).build({{"name": "{name}", "params": {{}}}}, **runtime)


def test_the_recipe_validates():
    set_plugin_manager(manager())
    try:
        recipe = load_recipe(RECIPE)
    finally:
        set_plugin_manager(None)
    assert recipe.name == "{name}-demo"
'''

RECIPE = '''# Trains the shapes demo with {name} in place of its {kind}: `dalle train {name}-demo`, then `dalle run {name}-demo`.
extends: shapes-demo
name: {name}-demo
description: "the shapes demo with {summary}"
{recipe}'''

README = '''# dalle-{name}

{summary_cap}, as a dalle-framework plugin.

```bash
pip install -e .              # registers the `{name}` {kind} through the dalle_framework entry point
pytest tests                  # the component follows its contract; the recipe validates
dalle plugins                 # lists it
dalle train {name}-demo       # the shapes demo with it
```
'''


def package_name(name: str) -> str:
    return "dalle_" + name.replace("-", "_")


def class_name(name: str, kind: str) -> str:
    suffix = {"data": "Source", "stage": "Stage"}.get(kind, kind.capitalize())
    return "".join(part.capitalize() for part in name.split("-")) + suffix


def new_plugin(name: str, kind: str, where: Path) -> dict[str, Any]:
    """Write the package ``where/name``; returns what was written. Refuses a folder that exists and is not empty."""
    if not NAME.match(name) or keyword.iskeyword(name.replace("-", "_")):
        raise UsageError(f"plugin name {name!r}: use lower-case letters, digits and single hyphens, starting with a letter (e.g. my-codec)")
    if kind not in KINDS:
        raise UsageError(f"--kind {kind!r}: choose one of {', '.join(KINDS)}")
    root = Path(where) / name
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UsageError(f"{root}: already exists and is not an empty folder; choose another name or --dir")
    spec = KINDS[kind]
    package, cls = package_name(name), class_name(name, kind)
    values = dict(name=name, kind=kind, package=package, cls=cls, hook=spec["hook"], summary=spec["summary"], imports=spec["imports"],
                  summary_cap=spec["summary"][0].upper() + spec["summary"][1:], recipe=spec["recipe"].format(name=name))
    files = {
        "pyproject.toml": PYPROJECT.format(**values),
        "README.md": README.format(**values),
        f"{package}/__init__.py": (HEADER + spec["body"] + FOOTER).format(**values),
        f"{package}/recipes/{name}-demo.yaml": RECIPE.format(**values),
        f"tests/test_{package}.py": (TEST + spec["test"]).format(**values, torch_import="\nimport torch\n" if "torch." in spec["test"] else ""),
    }
    from .rundir import write_text

    for relative, text in files.items():
        write_text(root / relative, text)
    return {"plugin": name, "kind": kind, "folder": str(root), "files": sorted(files),
            "next": f"pip install -e {root} && pytest {root / 'tests'} && dalle train {name}-demo"}
