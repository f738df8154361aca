#!/usr/bin/env bash
# Entry point.
#   bash run.sh                      offline demo: the stand-in CLIP adapted to real handwritten digits
#   bash run.sh demo --rebuild       the same, re-pretraining the stand-in first
#   bash run.sh paper DATA_ROOT      the paper's nine datasets (CoOp layout) with ViT-B/16
# Environment: SEED (default 0), OUT (default runs), CLIP_CACHE (checkpoint cache, ~/.cache/clip).
set -euo pipefail
cd "$(dirname "$0")"
mode=${1:-demo}
SEED=${SEED:-0}
OUT=${OUT:-runs}

case "$mode" in
demo)
  start=$(date +%s)
  if [ "${2:-}" = "--rebuild" ]; then python clip_model.py --standin --rebuild; else python clip_model.py --standin; fi
  common=(--dataset digits --clip demo --seed "$SEED" --log-every 0)
  # settings chosen per method on the labelled dev split (README, "Offline demo"); CoFT's are the
  # demo backbone's defaults (clipping at 1.0, Phase-I lr 0.03, Phase-II lr 2e-5)
  python coft.py "${common[@]}" --method probe --out "$OUT/demo/probe-s$SEED"
  python coft.py "${common[@]}" --method topk --clip-grad 0 --fft-lr 2e-5 --out "$OUT/demo/topk-s$SEED"
  python coft.py "${common[@]}" --method coft --out "$OUT/demo/coft-s$SEED"
  python coft.py "${common[@]}" --method coft --plus --out "$OUT/demo/coftplus-s$SEED"
  python coft.py --table "$OUT/demo/"{probe,topk,coft,coftplus}-s"$SEED"
  echo "demo done in $(( $(date +%s) - start ))s"
  ;;
paper)
  DATA=${2:?usage: bash run.sh paper DATA_ROOT}
  runs=()
  for ds in caltech101 dtd eurosat fgvc_aircraft oxford_flowers food101 oxford_pets stanford_cars ucf101; do
    python coft.py --dataset "$ds" --data-root "$DATA" --clip ViT-B/16 --seed "$SEED" --workers 8 \
      --out "$OUT/paper/$ds-s$SEED" --resume
    runs+=("$OUT/paper/$ds-s$SEED")
  done
  python coft.py --table "${runs[@]}"
  ;;
*)
  echo "usage: bash run.sh [demo [--rebuild] | paper DATA_ROOT]" >&2
  exit 2
  ;;
esac
