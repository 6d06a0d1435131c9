#!/usr/bin/env bash
# One command on the H100 (<= 10 minutes, loading included): a full-size synthetic FLUX (random weights),
# NF4 at budgets none/8/6/4 GiB x 1024² and 512², the five diffusers anchors and the bf16 reference at 1024².
# Results land in $OUT (default benchmarks/results): bench-quick.json/.md/-vram.png/-budget.png/-tokens.png/.log
#   KREA_LITE_COMMIT=<sha> bash benchmarks/quick_gpu.sh [extra bench flags, e.g. --schemes nf4 int8]
set -uo pipefail
OUT=${OUT:-benchmarks/results}
WORK=${WORK:-/tmp/krea-bench}
mkdir -p "$OUT" "$WORK"
[ -f .whl/install.sh ] && bash .whl/install.sh
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
df -h "$WORK" | tail -1; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m krea_lite.bench --quick --synthetic full --workdir "$WORK" --out "$OUT/bench-quick.json" "$@" \
  2>&1 | tee "$OUT/bench-quick.log"
