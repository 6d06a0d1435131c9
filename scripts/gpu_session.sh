#!/usr/bin/env bash
# One GPU-machine session: full-size synthetic pipeline -> quantize (time, RssAnon) -> GPU tests -> bench.
# Run from the repo root on the device machine with .whl carried:  bash scripts/gpu_session.sh [stage...]
# Stages: synth quantize tests generate bench (default: all). Re-running skips what /tmp/krea already holds.
set -uo pipefail
OUT=${OUT:-/tmp/krea-out}; W=/tmp/krea; mkdir -p "$OUT" "$W"
bash .whl/install.sh || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
stages=${*:-synth quantize tests generate bench}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for s in $stages; do
  echo "=== $s $(date +%T)"
  case $s in
    synth) [ -f $W/full/model_index.json ] || /usr/bin/time -v python3 -m krea_lite.cli synth $W/full --size full \
             --no-single-file 2>&1 | grep -E "wrote|Elapsed|Maximum resident" ;;
    quantize) python3 benchmarks/quantize_full.py --source $W/full --out-root $W/q --schemes ${SCHEMES:-nf4} \
             --json "$OUT/quantize-full.json" ;;
    tests) KREA_FULL_DIR=$W/q/full-nf4 python3 -m pytest -q -s -p no:cacheprovider -m "gpu or budget" tests \
             > "$OUT/gpu-tests.log" 2>&1; grep -E "passed|failed|FAILED|Error|budget|s/step|\{" "$OUT/gpu-tests.log" | tail -40 ;;
    generate) python3 -m krea_lite.cli --debug generate --model $W/q/full-nf4 --vram-gb ${VRAM:-8} --verbose --quiet \
             --steps ${STEPS:-28} --out $W/png "a lighthouse on a cliff at dawn" 2>&1 | grep -v "^    " | tail -40 ;;
    bench) python3 -m krea_lite.bench ${BENCH_ARGS:---quick} --source $W/full --workdir $W/q-bench \
             --models nf4=$W/q/full-nf4 --out "$OUT/bench/bench-quick.json" 2>&1 | tee "$OUT/bench.log" | tail -60 ;;
  esac
done
echo "=== done $(date +%T)"
