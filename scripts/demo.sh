#!/usr/bin/env bash
# The main job: train the demo recipe on the embedded shapes data (codec, prior,
# reranker), generate a grid for held-out captions and print the evaluation JSON.
# Running it again reuses what is already trained. Extra arguments are recipe
# overrides, e.g. `scripts/demo.sh prior.train.steps=500`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
# One intra-op thread: on a 2-core machine that anything else shares, two
# threads ran these small models 10-40x slower (measured while developing).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec dalle run "${DALLE_RECIPE:-shapes-demo}" "$@"
