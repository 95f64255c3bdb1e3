"""What the commands that need no model cost to start: wall time and peak memory of fresh processes.

    .venv/bin/python benchmarks/cli_startup.py [--repeats 5] [--out FILE]

Each command runs ``--repeats`` times as a new process (``python -m dalle_framework ...``);
printed as one JSON object with the median and the worst wall time, the largest peak RSS
of the process, and whether it imported torch (``python -X importtime`` lists it).
Beside them, in the same run: Python doing nothing, and Python importing torch (what any
command paid before model code was kept out of them). Targets: under 0.5 s and 150 MiB.
The commands run with this benchmark's own cache, warmed once, as on a machine that has checked
the demo's CLIP config before; ``first_time`` is that first check (the config built on the meta device).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "dalle --help": ["--help"],
    "dalle train --help": ["train", "--help"],
    "dalle recipes ls": ["recipes", "ls"],
    "dalle recipes validate shapes-demo": ["recipes", "validate", "shapes-demo"],
    "dalle recipes validate dalle-paper": ["recipes", "validate", "dalle-paper"],
    "dalle recipes show shapes-demo --resolved": ["recipes", "show", "shapes-demo", "--resolved"],
    "dalle plugins --json": ["plugins", "--json"],
    "dalle components": ["components"],
    "dalle components codec vq-vae": ["components", "codec", "vq-vae"],
}
# The first check of a custom CLIP config on a machine builds it on the meta device (open_clip and torch);
# later checks remember that it built. Measured apart, each run with an empty cache, and not held to the targets.
FIRST_TIME = {"dalle recipes validate shapes-demo, its CLIP config never checked before": ["recipes", "validate", "shapes-demo"]}
BASELINES = {"python -c pass": ["-c", "pass"], "python -c 'import torch'": ["-c", "import torch"]}
TARGET_SECONDS, TARGET_MIB = 0.5, 150


def run(args: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit code) of one fresh process (``wait4`` gives that child's own usage)."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    return seconds, usage.ru_maxrss / 1024, child.returncode


def imports_torch(args: list[str], env: dict[str, str]) -> bool:
    done = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env})
    return any(re.search(r"\|\s+torch$", line.rstrip()) for line in done.stderr.splitlines())


def measure(args: list[str], repeats: int, env: Callable[[], dict[str, str]] = dict) -> dict:
    runs = [run(args, env()) for _ in range(repeats)]
    times = [t for t, _, _ in runs]
    return {"median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3),
            "peak_rss_mib": round(max(m for _, m, _ in runs), 1), "exit_codes": sorted({c for _, _, c in runs})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    report: dict = {"targets": {"seconds": TARGET_SECONDS, "peak_rss_mib": TARGET_MIB}, "cpus": os.cpu_count(), "commands": {}}
    with tempfile.TemporaryDirectory() as scratch:
        warm = {"DALLE_CACHE_DIR": str(Path(scratch) / "warm")}  # this benchmark's own cache, never the user's
        run(["-m", "dalle_framework", "recipes", "validate", "shapes-demo"], warm)  # as after a first check
        for name, argv in COMMANDS.items():
            entry = measure(["-m", "dalle_framework", *argv], args.repeats, lambda: warm)
            entry["imports_torch"] = imports_torch(["-m", "dalle_framework", *argv], warm)
            entry["meets_targets"] = entry["median_s"] < TARGET_SECONDS and entry["peak_rss_mib"] < TARGET_MIB
            report["commands"][name] = entry
        fresh = lambda: {"DALLE_CACHE_DIR": tempfile.mkdtemp(dir=scratch)}  # noqa: E731
        report["first_time"] = {name: {**measure(["-m", "dalle_framework", *argv], args.repeats, fresh),
                                       "imports_torch": imports_torch(["-m", "dalle_framework", *argv], fresh())}
                                for name, argv in FIRST_TIME.items()}
    report["baselines"] = {name: measure(argv, args.repeats) for name, argv in BASELINES.items()}
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
