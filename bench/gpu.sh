#!/usr/bin/env bash
# One GPU, one prepared script: the GEMM peak and training MFU, then the scenes pipeline on the gpu
# preset and the Flickr8k pipeline on gpu-photo, every stage timed (bench/pipeline.py), then each
# run's results table. Everything it measures lands under $OUT (JSON, results.md, pictures).
#   bash bench/gpu.sh                                                         # on a GPU machine
#   SCENES_PRESET=tiny PHOTO_PRESET=tiny OUT=/tmp/gpu-check bash bench/gpu.sh # a check of the script on a CPU
# FLICKR: the Flickr8k folder (default ../shared/data/flickr8k); a Flickr30k folder works the same.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
FLICKR=${FLICKR:-../shared/data/flickr8k}
SCENES_PRESET=${SCENES_PRESET:-gpu}
PHOTO_PRESET=${PHOTO_PRESET:-gpu-photo}
mkdir -p "$OUT"
python -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU, running on the CPU')"
python bench/mfu.py --preset "$SCENES_PRESET" --device auto --steps 10 --out "$OUT/mfu.json"
python bench/pipeline.py --preset "$SCENES_PRESET" --run-dir "$OUT/scenes" --out "$OUT/scenes_pipeline.json" --overwrite
python bench/pipeline.py --preset "$PHOTO_PRESET" --data flickr --data-root "$FLICKR" --run-dir "$OUT/flickr8k" \
    --out "$OUT/flickr8k_pipeline.json" --overwrite
for run in scenes flickr8k; do
    echo "=== $OUT/$run/results.md"
    head -n 30 "$OUT/$run/results.md"
done
