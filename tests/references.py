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


def run_min_dalle(script: str, **inputs) -> dict:
    """Run ``script`` (Python using ``min_dalle``) in a subprocess with ``inputs`` as JSON in ``INPUTS``;
    it prints one JSON object, returned here."""
    if importlib.util.find_spec("min_dalle") is None:
        reference("min_dalle")
    env = {**os.environ, "INPUTS": json.dumps(inputs)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
