#!/usr/bin/env bash
# Attack variants through the same DiSP pipeline, each in its own run directory, then one table.
# Reuses the clean model of a finished default run (BASE, default runs/default from `bash run.sh`).
#   projector-attack:  the attack trains the projector only (the release's setting)
#   vit-attack:        the attack also trains the ViT at the default lr (a stronger attack: the trigger spreads)
#   vit-attack-lr2e-4: the same at a fifth of the lr (gentler on the clean behaviour)
#   BASE=runs/seed0 bash experiments/variants.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BASE:-runs/default}
runs=$BASE
for variant in projector:projector-attack:default all:vit-attack:default all:vit-attack-lr2e-4:2e-4; do
  IFS=: read -r trainable name lr <<< "$variant"
  run=runs/$name
  lr_flag=(); [ "$lr" != default ] && lr_flag=(--lr "$lr")
  python attack.py --run-dir "$run" --clean-checkpoint "$BASE/clean.pt" --trainable "$trainable" "${lr_flag[@]}"
  python purify.py --run-dir "$run"
  python evaluate.py --run-dir "$run" --skip-ablations
  runs=$runs,$run
done
python experiments/compare_runs.py --compare "$runs"
