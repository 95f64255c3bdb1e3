#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv.
# Sourced by the other scripts; safe to run again: it reinstalls only when
# pyproject.toml or this script changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DALLE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.installed-$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/env.sh" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  echo "setting up $VENV (first run installs torch, DeepSpeed, open_clip...; a few minutes)" >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  # torch 2.14.1 + torchvision 0.29.1 is the pair that imports together on these machines.
  "$VENV/bin/python" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" >&2 \
    || "$VENV/bin/python" -m pip install --quiet torch torchvision >&2
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]" >&2
  # Test-only: the reference dVAE / VQGAN code the pretrained-codec tests compare against.
  # Their pins are old (lightning, blobfile...) and the tests need only their modules, so
  # no dependencies beyond the two small ones they import.
  "$VENV/bin/python" -m pip install --quiet attrs requests >&2
  "$VENV/bin/python" -m pip install --quiet --no-deps "dall-e==0.1" "taming-transformers-rom1504==0.0.6" >&2
  # Test-only: the FID references the Inception-v3 tests compare against (they need scipy,
  # not their download helpers; the tests give them random weights on disk).
  "$VENV/bin/python" -m pip install --quiet scipy >&2
  "$VENV/bin/python" -m pip install --quiet --no-deps "pytorch-fid==0.3.0" "torch-fidelity==0.4.0" >&2
  # Test-only: the reference ruDALL-E and min-dalle code the pretrained-prior tests compare
  # against, again without their (old, large) dependencies: only the small modules their
  # model code imports. youtokentome's setup imports Cython without declaring it.
  "$VENV/bin/python" -m pip install --quiet Cython PyWavelets omegaconf >&2
  "$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation "youtokentome==1.0.6" >&2
  "$VENV/bin/python" -m pip install --quiet --no-deps "rudalle==1.1.3" "min-dalle==0.4.11" >&2
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export DS_ACCELERATOR="${DS_ACCELERATOR:-$("$VENV/bin/python" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
