#!/usr/bin/env bash
# The whole DiSP pipeline on the embedded scenes: train -> attack -> purify (+ 2 controls) -> evaluate.
#   bash run.sh                              # cpu preset, runs/default (about 10 minutes on 2 cores)
#   PRESET=tiny RUN=runs/tiny bash run.sh    # seconds: a smoke test, its models learn nothing
#   PRESET=small RUN=runs/small bash run.sh  # a few minutes: the smallest run where DiSP's result shows
#   SEED=1 RUN=runs/seed1 bash run.sh        # another seed
# The later stages read the run's preset, seed and precision from clean.pt.
set -euo pipefail
cd "$(dirname "$0")"
RUN=${RUN:-runs/default}
PRESET=${PRESET:-cpu}
SEED=${SEED:-0}
python train.py --preset "$PRESET" --run-dir "$RUN" --seed "$SEED"
python attack.py --run-dir "$RUN"
python purify.py --run-dir "$RUN"
python purify.py --run-dir "$RUN" --control self-distill --figures 0
python purify.py --run-dir "$RUN" --control as-is --figures 0
python evaluate.py --run-dir "$RUN"
