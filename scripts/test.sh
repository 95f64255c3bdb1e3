#!/usr/bin/env bash
# The whole test suite, slow tests included (what CI runs). For the fast loop
# while developing: `.venv/bin/pytest` (skips tests marked slow).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
source "$ROOT/scripts/system-packages.sh"
cd "$ROOT"
dalle_system_packages
exec python -m pytest -m "slow or not slow" -q "$@"
