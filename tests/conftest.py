"""Shared fixtures: a fresh plugin manager per test where a test registers inline plugins."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# One intra-op thread, here and in every subprocess a test starts: the models are
# tiny, and on a 2-core machine two OpenMP threads that share a core with anything
# else spin-wait and run 10-40x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# What plugins remember between commands (CLIP configs that built) goes to a folder of this test
# session, here and in every subprocess, never to the user's ~/.cache.
if "DALLE_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["DALLE_CACHE_DIR"] = tempfile.mkdtemp(prefix="dalle-test-cache-")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def manager():
    """A fresh PluginManager (entry points loaded) installed as the process-wide one."""
    from dalle_framework.plugins import PluginManager, set_plugin_manager

    fresh = PluginManager()
    set_plugin_manager(fresh)
    yield fresh
    set_plugin_manager(None)


@pytest.fixture
def bare_manager():
    """A PluginManager with no entry points: only what the test registers inline."""
    from dalle_framework.plugins import PluginManager, set_plugin_manager

    fresh = PluginManager(load_entry_points=False)
    set_plugin_manager(fresh)
    yield fresh
    set_plugin_manager(None)


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m dalle_framework`` in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "dalle_framework", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or ROOT,
        timeout=timeout,
    )


# Real data from Debian packages (../shared/DATA.md). On a machine without them
# these tests skip with the install command; CI (.ci/run) installs them and sets
# DALLE_REQUIRE_DATA=1 so that a missing package fails instead of skipping.
DEBIAN_DATA = {
    "emoji": ("fonts-noto-color-emoji unicode-data", ["/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf", "/usr/share/unicode/emoji/emoji-test.txt"]),
    "fashion-mnist": ("dataset-fashion-mnist", ["/usr/share/datasets/fashion-mnist"]),
}


def pytest_configure(config):
    config.addinivalue_line("markers", "debian_data(name): needs the Debian package holding data source `name`")


def pytest_runtest_setup(item):
    for marker in item.iter_markers("debian_data"):
        packages, paths = DEBIAN_DATA[marker.args[0]]
        missing = [p for p in paths if not Path(p).exists()]
        if missing:
            message = f"{marker.args[0]} data missing ({missing[0]}); apt-get install {packages}"
            if os.environ.get("DALLE_REQUIRE_DATA") == "1":
                pytest.fail(message)
            pytest.skip(message)


def returns_within(seconds: float, call: Callable[[], Any]) -> Any:
    """``call()``'s result (or its exception, raised here); fails the test instead of hanging it when
    ``call`` blocks (on a FIFO, an endless file, a request the server never answers) for ``seconds``."""
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # handed to the test's thread
            outcome.append((False, exc))

    thread = threading.Thread(target=run, daemon=True)  # daemon: a call that never returns cannot hold up the exit
    thread.start()
    thread.join(seconds)
    assert outcome, f"still running after {seconds} s"
    returned, value = outcome[0]
    if not returned:
        raise value
    return value
