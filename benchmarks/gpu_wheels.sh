#!/usr/bin/env bash
# Wheels that benchmarks/gpu_check.py needs on a GPU machine whose Python image has torch,
# triton, pluggy, einops, safetensors and pyyaml but not pydantic or DeepSpeed, and that
# cannot reach a package index. Run here (with pip access); carry .whl/ there and run:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && python3 benchmarks/gpu_check.py
#
# Versions are the ones this project's environment resolves to; the target is CPython 3.12
# on x86-64 Linux (override with PYTHON_VERSION=3.11 etc.).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/.whl"
PYTHON="${PYTHON:-python3}"
rm -rf "$OUT" && mkdir -p "$OUT"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$OUT" \
  --python-version "${PYTHON_VERSION:-3.12}" --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 hjson==3.1.0
# DeepSpeed ships as a source distribution that builds as pure Python (its ops compile on first use)
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$OUT" deepspeed==0.19.8
ls -l "$OUT"
