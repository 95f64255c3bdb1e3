"""Progress bars, with one switch for all of them: ``--quiet`` sets ``TQDM_DISABLE=1``.

tqdm reads that variable only for bars that leave ``disable`` unset, so every bar of the
framework and its plugins is made here, where the switch is honoured whatever the caller asks.
"""

from __future__ import annotations

import os
from typing import Any

QUIET_ENV = "TQDM_DISABLE"


def progress_bar(*, enabled: bool = True, **kwargs: Any):
    """A tqdm bar, shown when ``enabled`` and not silenced by ``--quiet`` (in this process or its parent)."""
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled or os.environ.get(QUIET_ENV, "") not in ("", "0"), **kwargs)
