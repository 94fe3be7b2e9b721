#!/usr/bin/env bash
# Attack variants through the same DiSP pipeline, each in its own run directory, then one table.
# Needs runs/default from `bash run.sh` (its clean model is reused).
#   projector-attack: the attack trains the projector only (the release's setting)
#   vit-attack:       the attack also trains the ViT (a stronger attack: the trigger spreads)
set -euo pipefail
cd "$(dirname "$0")/.."
for variant in projector:projector-attack all:vit-attack; do
  trainable=${variant%%:*}; run=runs/${variant##*:}
  python attack.py --run-dir "$run" --clean-checkpoint runs/default/clean.pt --trainable "$trainable"
  python purify.py --run-dir "$run" --figures 0
  python evaluate.py --run-dir "$run" --skip-ablations
done
python evaluate.py --compare runs/default,runs/projector-attack,runs/vit-attack
