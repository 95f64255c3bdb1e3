#!/usr/bin/env bash
# The main job: train the demo recipe on the embedded shapes data (codec, prior,
# reranker), generate a grid for held-out captions and print the evaluation JSON.
# Running it again reuses what is already trained. Extra arguments are recipe
# overrides, e.g. `scripts/demo.sh prior.train.steps=500`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
# One intra-op thread: these small models gain little from a second one, and two
# threads slow down badly whenever anything else shares the CPU.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec dalle run "${DALLE_RECIPE:-shapes-demo}" "$@"
