"""What the commands that need no model cost to start: wall time and peak memory of fresh processes.

    .venv/bin/python benchmarks/cli_startup.py [--repeats 5] [--out FILE]

Each command runs ``--repeats`` times as a new process (``python -m dalle_framework ...``);
printed as one JSON object with the median and the worst wall time, the largest peak RSS
of the process, and whether it imported torch (``python -X importtime`` lists it).
Beside them, in the same run: Python doing nothing, and Python importing torch (what any
command paid before model code was kept out of them). Targets: under 0.5 s and 150 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "dalle --help": ["--help"],
    "dalle train --help": ["train", "--help"],
    "dalle recipes ls": ["recipes", "ls"],
    "dalle recipes validate shapes-demo": ["recipes", "validate", "shapes-demo"],
    "dalle recipes show shapes-demo --resolved": ["recipes", "show", "shapes-demo", "--resolved"],
    "dalle plugins --json": ["plugins", "--json"],
    "dalle components": ["components"],
    "dalle components codec vq-vae": ["components", "codec", "vq-vae"],
}
BASELINES = {"python -c pass": ["-c", "pass"], "python -c 'import torch'": ["-c", "import torch"]}
TARGET_SECONDS, TARGET_MIB = 0.5, 150


def run(args: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit code) of one fresh process (``wait4`` gives that child's own usage)."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    return seconds, usage.ru_maxrss / 1024, child.returncode


def imports_torch(args: list[str]) -> bool:
    done = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=ROOT, capture_output=True, text=True)
    return any(re.search(r"\|\s+torch$", line.rstrip()) for line in done.stderr.splitlines())


def measure(args: list[str], repeats: int) -> dict:
    runs = [run(args) for _ in range(repeats)]
    times = [t for t, _, _ in runs]
    return {"median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3),
            "peak_rss_mib": round(max(m for _, m, _ in runs), 1), "exit_codes": sorted({c for _, _, c in runs})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    report: dict = {"targets": {"seconds": TARGET_SECONDS, "peak_rss_mib": TARGET_MIB}, "cpus": os.cpu_count(), "commands": {}}
    for name, argv in COMMANDS.items():
        entry = measure(["-m", "dalle_framework", *argv], args.repeats)
        entry["imports_torch"] = imports_torch(["-m", "dalle_framework", *argv])
        entry["meets_targets"] = entry["median_s"] < TARGET_SECONDS and entry["peak_rss_mib"] < TARGET_MIB
        report["commands"][name] = entry
    report["baselines"] = {name: measure(argv, args.repeats) for name, argv in BASELINES.items()}
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
