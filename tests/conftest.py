"""Shared fixtures: a fresh plugin manager per test where a test registers inline plugins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")


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
