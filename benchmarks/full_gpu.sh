#!/usr/bin/env bash
# The whole matrix: every scheme x budgets none/16/12/8/6/4 GiB x 512²/768²/1024²/1152x896 x batch 1, 2,
# with 28-step images. Several hours on one card: run it with --resume until it completes.
#   SOURCE=black-forest-labs/FLUX.1-Krea-dev bash benchmarks/full_gpu.sh       # real weights
#   bash benchmarks/full_gpu.sh                                                # synthetic full-size
set -uo pipefail
OUT=${OUT:-benchmarks/results}
WORK=${WORK:-$HOME/.cache/krea-bench}
mkdir -p "$OUT" "$WORK"
[ -f .whl/install.sh ] && bash .whl/install.sh
export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
if [ -n "${SOURCE:-}" ]; then input=(--source "$SOURCE"); name=real; else input=(--synthetic full); name=synthetic; fi
python3 -m krea_lite.bench "${input[@]}" --workdir "$WORK" --out "$OUT/bench-full-$name.json" --resume "$@" \
  2>&1 | tee -a "$OUT/bench-full-$name.log"
