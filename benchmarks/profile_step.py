"""Where a streamed step's time goes: a torch.profiler trace of transformer steps at each card, per CUDA stream.

For each card (none = resident): load the folder with `load_pipeline(vram_gb=card)` (and `compile=True` with
--compile), run warm-up steps, then profile `--steps` transformer forwards (1024x1024 unless --width/--height)
and read the trace's GPU events per stream: busy time of the compute stream (kernels) and of the copy stream
(host-to-device memcpy), the time both are idle (the GPU waits on the host: launch or hook overhead), the
time the compute stream is idle while a copy runs (it waits on a copy), and the top kernels.

    python benchmarks/profile_step.py --model /tmp/krea/q/full-fp8mm --cards none 8 6 4 --compile \\
        --json benchmarks/results/profile-fp8mm.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _intersect(x, y) -> float:
    i = j = 0
    total = 0.0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        total += max(0.0, b - a)
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def summarize(trace: dict, steps: int, wall_s: float) -> dict:
    """Per-stream GPU busy time from a chrome trace (µs timestamps), per step, in ms."""
    kernels, copies, names = [], [], {}
    for e in trace.get("traceEvents", []):
        cat = e.get("cat", "")
        if e.get("ph") != "X" or cat not in ("kernel", "gpu_memcpy"):
            continue
        iv = (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        if cat == "kernel":
            kernels.append(iv)
            n = e.get("name", "?")[:90]
            names[n] = names.get(n, 0.0) + float(e["dur"])
        elif "HtoD" in e.get("name", "") or "Pinned -> Device" in e.get("name", ""):
            copies.append(iv)
    if not kernels:
        return {"error": "no kernel events in the trace"}
    k, c = _union(kernels), _union(copies)
    span = max(k[-1][1], c[-1][1] if c else 0) - min(k[0][0], c[0][0] if c else k[0][0])
    either = _union(k + c)
    per = 1e3 * steps  # µs per profile -> ms per step
    return {"wall_ms_per_step": round(wall_s * 1e3 / steps, 2), "gpu_span_ms_per_step": round(span / per, 2),
            "compute_busy_ms_per_step": round(_length(k) / per, 2), "copy_busy_ms_per_step": round(_length(c) / per, 2),
            "overlap_ms_per_step": round(_intersect(k, c) / per, 2),
            "compute_idle_while_copying_ms_per_step": round((_length(c) - _intersect(k, c)) / per, 2),
            "both_idle_ms_per_step": round((span - _length(either)) / per, 2),
            "top_kernels_ms_per_step": {n: round(t / per, 3) for n, t in
                                        sorted(names.items(), key=lambda x: -x[1])[:12]}}


def profile_card(model: str, card: float | None, compile_: bool, width: int, height: int, warmup: int,
                 steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from krea_lite.bench.cells import _step_inputs
    from krea_lite.pipeline import load_pipeline

    pipe = load_pipeline(model, device="cuda", vram_gb=card, width=width, height=height, compile=compile_)
    plan = pipe.krea_lite.plan
    kw = _step_inputs(pipe.transformer, dict(batch=1, width=width, height=height, text_tokens=512), "cuda")
    with torch.inference_mode():
        for _ in range(warmup):
            pipe.transformer(**kw)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):  # the same steps unprofiled: the profiler's own overhead stays out of this one
            pipe.transformer(**kw)
        torch.cuda.synchronize()
        plain = time.perf_counter() - t0
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                pipe.transformer(**kw)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    row = {"card_gib": card, "compile": compile_, "streamed": [len(plan.streamed_double), len(plan.streamed_single)],
           "prefetch": plan.prefetch, "streamed_gib_per_step": round(plan.streamed_bytes / 2**30, 3),
           "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
           "unprofiled_ms_per_step": round(plain * 1e3 / steps, 2), **summarize(trace, steps, wall)}
    pipe.krea_lite.close()
    del pipe
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.reset_peak_memory_stats()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--cards", nargs="+", default=["none", "8", "6", "4"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch

    rows = []
    for c in args.cards:
        row = profile_card(args.model, None if c == "none" else float(c), args.compile, args.width, args.height,
                           args.warmup, args.steps)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "top_kernels_ms_per_step"}), flush=True)
        if args.json:  # after every card: a run cut short keeps what it measured
            from krea_lite.checkpoint import library_versions

            args.json.write_text(json.dumps({"card": torch.cuda.get_device_name(), "model": args.model,
                                             "libraries": library_versions(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
