#!/usr/bin/env bash
# The whole DiSP pipeline: train -> attack -> purify (+ 2 controls) -> evaluate.
#   bash run.sh                              # embedded scenes, cpu preset, runs/default (12-22 min on 2 cores)
#   PRESET=tiny RUN=runs/tiny bash run.sh    # seconds: a smoke test, its models learn nothing
#   PRESET=small RUN=runs/small bash run.sh  # a few minutes: the smallest run where DiSP's result shows
#   SEED=1 RUN=runs/seed1 bash run.sh        # another seed
#   DATA=flickr DATA_ROOT=../shared/data/flickr8k RUN=runs/flickr8k bash run.sh   # Flickr8k (or Flickr30k)
#   VISION_FROM=runs/flickr8k/clean.pt DATA=daquar DATA_ROOT=../shared/data/daquar RUN=runs/daquar bash run.sh
#                                            # DAQUAR VQA, its ViT taken from the Flickr8k run's
# DATA: scenes (default) | coco | karpathy | flickr | vqav2 | daquar (public data: read from DATA_ROOT).
# PRESET: auto (default) picks cpu for the scenes, photo (64 px photos, 64 vision tokens) for public
# data, daquar (photo with a longer attack) for DAQUAR; gpu-photo for a full-size dataset on one GPU.
# The later stages read the run's preset, data, seed and precision from clean.pt.
set -euo pipefail
cd "$(dirname "$0")"
RUN=${RUN:-runs/default}
PRESET=${PRESET:-auto}
DATA=${DATA:-scenes}
DATA_ROOT=${DATA_ROOT:-}
SEED=${SEED:-0}
VISION_FROM=${VISION_FROM:-}  # a clean.pt whose ViT train.py starts from (empty: pretrain one here)
python train.py --preset "$PRESET" --data "$DATA" --data-root "$DATA_ROOT" --run-dir "$RUN" --seed "$SEED" --vision-from "$VISION_FROM"
python attack.py --run-dir "$RUN"
python purify.py --run-dir "$RUN"
python purify.py --run-dir "$RUN" --control self-distill   # DiSP less the masking
python purify.py --run-dir "$RUN" --control as-is          # DiSP less the regeneration
python evaluate.py --run-dir "$RUN"
