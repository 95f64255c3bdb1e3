#!/usr/bin/env bash
# The whole test suite, slow tests included (what CI runs). For the fast loop
# while developing: `.venv/bin/pytest` (skips tests marked slow).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec python -m pytest -m "slow or not slow" -q "$@"
