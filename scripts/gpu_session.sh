#!/usr/bin/env bash
# One GPU-machine session: full-size synthetic pipeline -> quantize nf4 + int8 (time, RssAnon) -> GPU tests ->
# `krea-lite generate --vram-gb 8` -> the benchmark. Run from the repo root on the device machine with .whl
# carried; a device command may run 10 minutes, so call it again on the same warm machine to go on:
#   bash scripts/gpu_session.sh [stage...]
# stages: synth quantize tests budget generate ratio mutations bench micro ratio8 lora gen8 gguf ggufq comfy newuser
#   profile cgroup16 loras genlora (default: synth quantize tests generate bench)
#   tests      the GPU tier on tiny models (-m "gpu and not budget")
#   budget     the full-size budget tests (-m budget, KREA_FULL_DIR = the NF4 folder)
#   ratio      interleaved streamed/resident ratios: `krea-lite bench --interleave`, NF4 1024², cards 8 6 4
#   mutations  scripts/mutations.py: each wait/event/sync of the engine removed in turn must fail a GPU test
#   micro      benchmarks/w8a8_micro.py: bf16 / fp8mm / int8mm eager and compiled, torchao fp8 compiled (resident)
#   ratio8     interleaved ratios for fp8mm + --compile, cards 8 6 4 (SCHEMES must have made full-fp8mm);
#              RATIO_ARGS=--spread measures the spread-out streamed blocks (plan_for_budget(spread=True))
#   lora       interleaved LoRA overhead: fp8mm + compile and nf4 eager, resident and 8 GiB, 1 and 3 rank-64 LoRAs,
#              peft's side branch and lora.fused_side_branch (LORA_ONLY=nf4: one scheme only)
#   gguf       benchmarks/gguf_check.py: a Q8_0 (GGUF_TYPES) .gguf written from the synthetic folder, converted (time,
#              RSS), our kept blocks against diffusers' GGUF loader at 1024² (rel. error, s/step).
#              Disk: synth 34 GB + a Q8_0 .gguf 12.7 GB + its folder 12.7 GB: run it on a fresh machine (64 GB).
#   profile    benchmarks/profile_step.py: fp8mm + compile at none 8 6 4 GiB, per-stream GPU busy/idle time per step
#   (GGUF_ROUNDS / LORA_ROUNDS: at least 3, as `bench --interleave` requires)
#   ggufq      the gguf stage's folder without its diffusers check: the .gguf written from the synthetic folder, quantized
#   comfy      a user's ComfyUI files from the synthetic folder: a Q4_K .gguf, t5xxl_fp8_e4m3fn_scaled, clip_l, ae in
#              $W/files and a folder of configs/tokenizers only in $W/base; FREE_SYNTH=1 then deletes the synthetic
#              transformer and T5 weights (disk: later stages need only the folders made from them)
#   newuser    those files -> a folder (gguf_check: time, RSS, our step vs diffusers' GGUF loader), then
#              `krea-lite generate --vram-gb 8` from it, eager and with --compile, 28 steps 1024²
#   gguf       ... or, with the `comfy` files: GGUF_FILES=1 checks them as newuser does, then the interleaved
#              gguf cell against nf4 at none and 8 GiB (GGUF_ARGS=--compile compiles the gguf side)
#   cgroup16   generate --vram-gb 8 (CG_SCHEME, default fp8mm; CG_ARGS, default --compile) inside a cgroup-v2 of
#              memory.max 16G, no swap: host RAM of a 16 GiB machine (memory.peak counts page cache too)
#   loras      the bench's three random rank-64 LoRA files in /tmp/krea-lite-bench-loras (genlora and gen8 use them)
#   genlora    generate --vram-gb 8 on nf4 with two rank-64 LoRAs, 28 steps 1024²
#   gen8       generate --compile --vram-gb 8 on fp8mm twice (the second process finds the compile cache warm),
#              then NF4 at 8 GiB uncompiled, and fp8mm with a LoRA: 28 steps 1024², text encoding and decode included
# Re-running skips what /tmp/krea already holds; the bench resumes /tmp/krea/bench/bench.json and stops
# CALL_S seconds after this script started (default 585). Results are copied to $OUT.
set -uo pipefail
START=$(date +%s)
OUT=${OUT:-/tmp/krea-out}; W=/tmp/krea; mkdir -p "$OUT" "$W/bench" "$W/ratio" "$W/ratio8"
bash .whl/install.sh || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 KREA_LITE_COMMIT=${KREA_LITE_COMMIT:-unknown} PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
stages=${*:-synth quantize tests generate bench}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for s in $stages; do
  echo "=== $s $(date +%T) ($(($(date +%s) - START)) s)"; df -h /tmp | tail -1
  case $s in
    synth) [ -f $W/full/model_index.json ] || /usr/bin/time -v python3 -m krea_lite.cli synth $W/full --size full \
             --no-single-file 2>&1 | grep -E "wrote|Elapsed|Maximum resident" ;;
    quantize) for q in ${SCHEMES:-nf4 int8}; do [ -f $W/q/full-$q/krea_lite.json ] || \
             python3 benchmarks/quantize_full.py --source $W/full --out-root $W/q --schemes $q \
             --json "$OUT/quantize-full-$q.json"; done ;;
    tests) KREA_FULL_DIR=$W/q/full-nf4 timeout 240 python3 -m pytest -q -s -p no:cacheprovider -m "${TESTS:-gpu and not budget}" \
             tests > "$OUT/gpu-tests.log" 2>&1; grep -E "passed|failed|FAILED|Error|budget|s/step|\{" "$OUT/gpu-tests.log" | tail -20 ;;
    budget) KREA_FULL_DIR=$W/q/full-nf4 timeout 400 python3 -m pytest -q -s -p no:cacheprovider -m budget \
             tests/test_streaming_gpu.py > "$OUT/gpu-budget.log" 2>&1; grep -E "passed|failed|FAILED|Error|\{" "$OUT/gpu-budget.log" | tail -12 ;;
    ratio) python3 -m krea_lite.bench --workdir $W/qb --models nf4=$W/q/full-nf4 --schemes nf4 \
             --budgets none 8 6 4 --resolutions 1024x1024 --batches 1 --steps ${RSTEPS:-6} --warmup 1 --e2e-steps 0 \
             --interleave ${ROUNDS:-3} --anchors --cell-timeout 400 --out $W/ratio/ratio.json ${RATIO_ARGS:-} 2>&1 \
             | tee "$OUT/ratio.log" | grep -E "ratio|\|" | tail -30; cp $W/ratio/ratio.json "$OUT/" ;;
    micro) timeout 400 python3 benchmarks/w8a8_micro.py --json "$OUT/w8a8-micro.json" --compile bf16 fp8mm int8mm \
             torchao-fp8 --cache-dir $W/cc --budget-s 380 2>&1 | grep -v Warn | tail -12 ;;
    ratio8) python3 -m krea_lite.bench --workdir $W/qb --models fp8mm=$W/q/full-fp8mm \
             --schemes fp8mm --budgets none 8 6 4 --resolutions 1024x1024 --batches 1 --steps ${RSTEPS:-5} --warmup 2 \
             --e2e-steps 0 --interleave ${ROUNDS:-3} --compile --anchors --cell-timeout 500 --out $W/ratio8/ratio.json \
             ${RATIO_ARGS:-} 2>&1 \
             | tee "$OUT/ratio8.log" | grep -E "ratio|\|" | tail -30; cp $W/ratio8/ratio.json "$OUT/ratio8.json" ;;
    lora) specs=("fp8mm --compile" "nf4"); [ -n "${LORA_ONLY:-}" ] && specs=("$LORA_ONLY")
          for spec in "${specs[@]}"; do set -- $spec; python3 -m krea_lite.bench \
             --workdir $W/qb --models $1=$W/q/full-$1 --schemes $1 --budgets none 8 --resolutions 1024x1024 --batches 1 \
             --steps 4 --warmup 2 --e2e-steps 0 --interleave ${LORA_ROUNDS:-3} --interleave-only ${2:-} --loras 3 --lora-rank 64 --lora-fused --anchors --time-budget 0 \
             --cell-timeout ${LORA_TIMEOUT:-500} --out $W/lora-$1/ratio.json 2>&1 | tee "$OUT/lora-$1.log" | grep -E "ratio|\|" | tail -20
             cp $W/lora-$1/ratio.json "$OUT/lora-$1.json"; done ;;
    gen8) for run in 1 2; do python3 -m krea_lite.cli generate --model $W/q/full-fp8mm \
             --vram-gb 8 --compile --verbose --quiet --steps 28 --seed 1 --out $W/png8 "a lighthouse on a cliff at dawn" \
             2>&1 | tee "$OUT/gen8-fp8mm-$run.log" | tail -12; done
          [ -d $W/q/full-nf4 ] && python3 -m krea_lite.cli generate --model $W/q/full-nf4 --vram-gb 8 --verbose --quiet --steps 28 --seed 1 \
             --out $W/png8 "a lighthouse on a cliff at dawn" 2>&1 | tee "$OUT/gen8-nf4.log" | tail -12
          python3 -m krea_lite.cli generate --model $W/q/full-fp8mm --vram-gb 8 --compile \
             --verbose --quiet --steps 28 --seed 1 --lora /tmp/krea-lite-bench-loras/lora-full-r64-s0.safetensors \
             --out $W/png8 "a lighthouse on a cliff at dawn" 2>&1 | tee "$OUT/gen8-fp8mm-lora.log" | tail -12
          ls -la $W/png8 | tail -5 ;;
    gguf) t=${GGUF_TYPES:-Q8_0}; t=${t%% *}
          [ -f $W/gq/$t/krea_lite.json ] || timeout 400 python3 benchmarks/gguf_check.py --synthetic $W/full \
             --types ${GGUF_TYPES:-Q8_0} --out-root $W/gq --json "$OUT/gguf-check.json" 2>&1 | tail -12
          [ -d $W/gq/$t ] && python3 -m krea_lite.bench --workdir $W/qb --models gguf=$W/gq/$t nf4=$W/q/full-nf4 \
             --schemes gguf --against nf4 --budgets none 8 --resolutions 1024x1024 --batches 1 --steps 4 --warmup 2 \
             --e2e-steps 0 --interleave ${GGUF_ROUNDS:-3} --interleave-only --anchors --cell-timeout 420 ${GGUF_ARGS:-} --out $W/gguf-bench/ratio.json 2>&1 \
             | tee "$OUT/gguf-bench.log" | grep -E "ratio|\|" | tail -14; cp $W/gguf-bench/ratio.json "$OUT/gguf-bench.json" ;;
    ggufq) t=${GGUF_TYPES:-Q8_0}; t=${t%% *}; [ -f $W/gq/$t/krea_lite.json ] || { [ -f $W/full/flux1-krea-dev-$t.gguf ] || python3 -c "
from pathlib import Path; from krea_lite.synthetic_gguf import gguf_name, write_gguf
write_gguf(Path('$W/full'), Path('$W/full') / gguf_name('$t'), '$t')" && /usr/bin/time -v python3 -m krea_lite.cli quantize \
             $W/full/flux1-krea-dev-$t.gguf --base $W/full --out $W/gq/$t --quiet 2>&1 | tee "$OUT/ggufq.log" \
             | grep -E "wrote|Elapsed|Maximum res|error"; } ;;
    comfy) [ -f $W/files/ae.safetensors ] || python3 -c "
import shutil; from pathlib import Path
from krea_lite.synthetic_comfy import write_comfy_files; from krea_lite.synthetic_gguf import gguf_name, write_gguf
W = Path('$W'); write_comfy_files(W / 'full', W / 'files', kinds=('t5_fp8_scaled', 'clip_l', 'ae'))
write_gguf(W / 'full', W / 'files' / gguf_name('Q4_K'), 'Q4_K')
shutil.copytree(W / 'full', W / 'base', ignore=shutil.ignore_patterns('*.safetensors', '*.gguf', '*.index.json'))"
          ls -la $W/files; [ -n "${FREE_SYNTH:-}" ] && rm -f $W/full/transformer/*.safetensors* $W/full/text_encoder_2/*.safetensors* ;;
    newuser) [ -f $W/gq/Q4_K/krea_lite.json ] || timeout 400 python3 benchmarks/gguf_check.py --synthetic $W/full \
             --files $W/files --base $W/base --t5 t5xxl_fp8_e4m3fn_scaled.safetensors --clip clip_l.safetensors \
             --vae ae.safetensors --types Q4_K --out-root $W/gq --json "$OUT/gguf-check.json" 2>&1 | tail -8
          for c in "" --compile; do python3 -m krea_lite.cli generate --model $W/gq/Q4_K --vram-gb 8 $c --verbose --quiet \
             --steps 28 --seed 1 --out $W/png-gguf "a lighthouse on a cliff at dawn" 2>&1 | tee "$OUT/gen8-gguf$c.log" | tail -8; done ;;
    profile) timeout ${PROFILE_TIMEOUT:-420} python3 benchmarks/profile_step.py --model $W/q/full-fp8mm --cards ${PROFILE_CARDS:-none 8 6 4} --compile ${PROFILE_ARGS:-} \
             --json "$OUT/profile-fp8mm.json" 2>&1 | grep "^{" ;;
    loras) python3 -c "from krea_lite.bench.cells import _bench_loras; _bench_loras({'loras': 3, 'lora_rank': 64, 'model': '$W/full'})" ;;
    genlora) python3 -m krea_lite.cli generate --model $W/q/full-nf4 --vram-gb 8 --verbose --quiet --steps 28 --seed 1 \
             --lora /tmp/krea-lite-bench-loras/lora-full-r64-s0.safetensors \
             --lora /tmp/krea-lite-bench-loras/lora-full-r64-s1.safetensors:0.5 --out $W/png-lora \
             "a lighthouse on a cliff at dawn" 2>&1 | tee "$OUT/gen8-nf4-lora.log" | tail -12 ;;
    cgroup16) g=/sys/fs/cgroup/krea16-$$; mkdir -p $g 2>/dev/null; grep -qw memory /sys/fs/cgroup/cgroup.subtree_control \
             || echo +memory > /sys/fs/cgroup/cgroup.subtree_control
          sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null  # earlier stages' page cache stays outside the cgroup
          if echo 16G > $g/memory.max 2>/dev/null; then echo 0 > $g/memory.swap.max 2>/dev/null
             (echo $BASHPID > $g/cgroup.procs && exec /usr/bin/time -v python3 -m krea_lite.cli generate \
               --model $W/q/full-${CG_SCHEME:-fp8mm} --vram-gb 8 ${CG_ARGS---compile} --verbose --quiet --steps 28 --seed 1 \
               --out $W/png-cg "a lighthouse on a cliff at dawn") > "$OUT/cgroup16.log" 2>&1
             echo "rc $?" >> "$OUT/cgroup16.log"; for f in memory.max memory.swap.max memory.peak memory.events memory.stat; do
               echo "== $f"; head -12 $g/$f 2>&1; done >> "$OUT/cgroup16.log"; swapon --show >> "$OUT/cgroup16.log" 2>&1
             grep -E "rc |s/step|peak|Maximum resident|oom|== memory.(max|peak)" -A1 "$OUT/cgroup16.log" | head -24; rmdir $g
          else echo "cannot make a memory-limited cgroup-v2 here: controllers '$(cat /sys/fs/cgroup/cgroup.controllers 2>&1)'," \
             "subtree '$(cat /sys/fs/cgroup/cgroup.subtree_control 2>&1)'" | tee "$OUT/cgroup16.log"; fi ;;
    mutations) timeout 420 python3 scripts/mutations.py 2>&1 | tee "$OUT/mutations.log" | tail -10 ;;
    generate) python3 -m krea_lite.cli --debug generate --model $W/q/full-nf4 --vram-gb ${VRAM:-8} --verbose --quiet \
             --steps ${STEPS:-28} --out $W/png "a lighthouse on a cliff at dawn" 2>&1 | tee "$OUT/generate.log" | tail -30 ;;
    bench) left=$(( ${CALL_S:-585} - ($(date +%s) - START) ))
           python3 -m krea_lite.bench --source $W/full --workdir $W/qb --models nf4=$W/q/full-nf4 int8=$W/q/full-int8 \
             --schemes nf4 int8 --budgets none 16 12 8 6 4 --resolutions 1024x1024 512x512 --batches 1 --steps 5 \
             --warmup 1 --e2e-steps 28 --anchor-budgets 8 --cell-timeout 150 --time-budget $left --resume \
             --out $W/bench/bench.json ${BENCH_ARGS:-} 2>&1 | tee -a "$W/bench/bench.log" | tail -45
           cp -r $W/bench "$OUT/" ;;
  esac
done
echo "=== done $(date +%T) ($(($(date +%s) - START)) s)"
