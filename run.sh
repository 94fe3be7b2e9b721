#!/usr/bin/env bash
# The whole DiSP pipeline on the embedded scenes: train -> attack -> purify (+ 2 controls) -> evaluate.
#   bash run.sh                          # CPU preset, runs/default
#   PRESET=tiny RUN=runs/tiny bash run.sh  # seconds, for a smoke test
#   SEED=1 RUN=runs/seed1 bash run.sh    # another seed
set -euo pipefail
cd "$(dirname "$0")"
RUN=${RUN:-runs/default}
PRESET=${PRESET:-cpu}
SEED=${SEED:-0}
python train.py --preset "$PRESET" --out-dir "$RUN" --seed "$SEED"
python attack.py --run-dir "$RUN" --seed "$SEED"
python purify.py --run-dir "$RUN" --seed "$SEED"
python purify.py --run-dir "$RUN" --seed "$SEED" --control self-distill --figures 0
python purify.py --run-dir "$RUN" --seed "$SEED" --control as-is --figures 0
python evaluate.py --run-dir "$RUN"
