"""Micro-benchmark: one full-size FLUX transformer forward in bf16, fp8mm and int8mm, eager and compiled.

Built on the GPU with random weights (std 1/sqrt(fan_in), as /work/shared/ANCHORS.md 2026-12-01), one
process, 1024² by default (4096 image + 512 text tokens), batch 1. Each config: warm-ups, then the
median of 5 timed forwards (torch.cuda.synchronize around each). Relative error is against the bf16
eager output of the same weights and inputs. The quantized models quantize what a krea-lite folder
quantizes (every Linear but quantize.TRANSFORMER_KEEP).

Compiling is the slow part (118-188 s per config cold on an H200; a warm cache in --cache-dir is much
faster), so by default only fp8mm is compiled; `--compile bf16 fp8mm int8mm` compiles all three, and a
compiled config that would not fit in --budget-s is skipped (and says so).

    PYTHONPATH=src python benchmarks/w8a8_micro.py --json benchmarks/results/w8a8-micro-h200.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

TORCHAO = "torchao-fp8"
COMPILE_ESTIMATE_S = 200  # a cold compile of the two block classes on an H200 (measured 118-188 s)


def build_bf16(device: str, tiny: bool):
    from diffusers import FluxTransformer2DModel

    from krea_lite.synthetic import FULL, TINY

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: no 48 GB fp32 copy first
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**(TINY if tiny else FULL)["transformer"])
    finally:
        torch.set_default_dtype(default)
    g = torch.Generator(device=device).manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features ** -0.5, generator=g)
    return model.eval().requires_grad_(False)


def quantized_copy(model: nn.Module, scheme: str) -> nn.Module:
    """A copy of `model` with every Linear but the kept ones as Linear8 (quantized on the GPU)."""
    from krea_lite.quantize import keep_patterns, split_linears
    from krea_lite.w8a8 import Linear8

    q = copy.deepcopy(model)
    names, _, _ = split_linears(q, keep_patterns("transformer", "fp8mm" if scheme == TORCHAO else scheme, None))
    if scheme == TORCHAO:  # the compute anchor: torchao's fp8 x fp8 per-row, on the same Linears as fp8mm
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        wanted = set(names)
        quantize_(q, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                  filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in wanted)
        return q
    kind = {"fp8mm": "fp8", "int8mm": "int8"}[scheme]
    for name in names:
        q.set_submodule(name, Linear8.from_linear(q.get_submodule(name), kind))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return q


def inputs(config, device: str, width: int, height: int) -> dict:
    g = torch.Generator(device=device).manual_seed(1)
    tokens = (width // 16) * (height // 16)
    return dict(
        hidden_states=torch.randn(1, tokens, config.in_channels, device=device, generator=g).to(torch.bfloat16),
        encoder_hidden_states=torch.randn(1, 512, config.joint_attention_dim, device=device,
                                          generator=g).to(torch.bfloat16),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, device=device, generator=g).to(torch.bfloat16),
        timestep=torch.tensor([0.5], device=device), guidance=torch.tensor([3.5], device=device),
        img_ids=torch.zeros(tokens, 3, device=device), txt_ids=torch.zeros(512, 3, device=device),
        return_dict=False,
    )


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def forward_s(model, x) -> tuple[float, torch.Tensor]:
    _sync()
    t0 = time.perf_counter()
    out = model(**x)[0]
    _sync()
    return time.perf_counter() - t0, out


def _peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def weights_gib(model: nn.Module) -> float:
    from krea_lite.packing import leaf_tensors, nbytes

    return round(nbytes(leaf_tensors(model)) / 2**30, 2)


def uncompile(model: nn.Module) -> None:
    for m in model.modules():
        vars(m).pop("forward", None)
    torch._dynamo.reset()


def run_config(name: str, model, x, compiled: bool, args, device: str, ref) -> tuple[dict, torch.Tensor | None]:
    from krea_lite.compile import compile_counters, compile_transformer
    from krea_lite.w8a8 import prepare

    row = {"config": name, "compiled": compiled, "weights_gib": weights_gib(model), "routes": prepare(model, device)}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if compiled:
        backend = "inductor" if device == "cuda" else "aot_eager"  # --tiny on the CPU: a smoke test
        result = compile_transformer(model, cache_dir=args.cache_dir, device=device, backend=backend)
        if not result.compiled:
            return {**row, "status": f"not compiled: {result.reason}"}, None
    before = compile_counters()
    first, out = forward_s(model, x)
    row["first_call_s"] = round(first, 2)
    for _ in range(args.warmups - 1):
        forward_s(model, x)
    warm = compile_counters()
    times = [forward_s(model, x)[0] for _ in range(args.timed)]
    after = compile_counters()
    _, out = forward_s(model, x)
    row.update(
        status="ok", s_per_step=round(statistics.median(times), 4), times=[round(t, 4) for t in times],
        peak_alloc_gib=_peak_gib(),
        rel_err_vs_bf16=0.0 if ref is None else round(((out.float() - ref).norm() / ref.norm()).item(), 4),
    )
    if compiled:
        row.update(graphs=warm["graphs"] - before["graphs"], graph_breaks=warm["graph_breaks"] - before["graph_breaks"],
                   recompiles_after_warmup=after["graphs"] - warm["graphs"],
                   fxgraph_cache_hits=warm["fxgraph_cache_hit"] - before["fxgraph_cache_hit"],
                   fxgraph_cache_misses=warm["fxgraph_cache_miss"] - before["fxgraph_cache_miss"])
        uncompile(model)
    return row, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--compile", nargs="*", default=["fp8mm"], choices=["bf16", "fp8mm", "int8mm", TORCHAO],
                    help="which models to also run compiled (default: fp8mm)")
    ap.add_argument("--cache-dir", default=None, help="compile cache (default ~/.cache/krea-lite/compile)")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--warmups", type=int, default=3)
    ap.add_argument("--timed", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=360, help="skip compiled configs that would end past this")
    ap.add_argument("--tiny", action="store_true", help="the tiny synthetic config (a smoke test; runs on the CPU)")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.tiny:
        raise SystemExit("w8a8_micro needs a CUDA GPU (--tiny runs a smoke test on the CPU)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    import diffusers

    cuda = torch.cuda.is_available()
    meta = {"gpu": torch.cuda.get_device_name() if cuda else "cpu",
            "capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
            "tiny": args.tiny,
            "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
            "width": args.width, "height": args.height, "batch": 1, "warmups": args.warmups, "timed": args.timed,
            "date": time.strftime("%Y-%m-%d")}
    print(f"{meta['gpu']} (capability {meta['capability']}), torch {meta['torch']}, {args.width}x{args.height}")
    bf16 = build_bf16(device, args.tiny)
    x = inputs(bf16.config, device, args.width, args.height)
    print(f"built the bf16 transformer in {time.perf_counter() - start:.0f} s")
    rows, ref = [], None
    plan = [("bf16", False), ("bf16", True), ("fp8mm", False), ("fp8mm", True), ("int8mm", False), ("int8mm", True),
            (TORCHAO, True)]  # torchao only compiled, as its fp8 is meant to run
    models = {"bf16": bf16}
    with torch.no_grad():
        for scheme, compiled in plan:
            if compiled and scheme not in args.compile:
                continue
            name = scheme + (" + compile" if compiled else " eager")
            elapsed = time.perf_counter() - start
            if compiled and elapsed + COMPILE_ESTIMATE_S > args.budget_s:
                rows.append({"config": name, "status": f"skipped: {elapsed:.0f} s elapsed, a cold compile takes "
                                                       f"~{COMPILE_ESTIMATE_S} s, budget {args.budget_s:.0f} s"})
                print(f"{name:<20} {rows[-1]['status']}")
                continue
            if scheme not in models:
                t0 = time.perf_counter()
                models[scheme] = quantized_copy(bf16, scheme)
                print(f"quantized to {scheme} on the {device} in {time.perf_counter() - t0:.1f} s")
            try:
                row, out = run_config(name, models[scheme], x, compiled, args, device, ref)
            except Exception as e:  # noqa: BLE001  record the failure and go on with the other configs
                row, out = {"config": name, "status": f"failed: {type(e).__name__}: {str(e)[:300]}"}, None
            if ref is None and out is not None:
                ref = out.float()
            rows.append(row)
            base = rows[0].get("s_per_step")
            if row.get("status") == "ok":
                row["vs_bf16_eager"] = round(row["s_per_step"] / base, 3) if base else None
                extra = (f", first call {row['first_call_s']} s, {row['graphs']} graphs, {row['graph_breaks']} breaks, "
                         f"{row['recompiles_after_warmup']} recompiles after warm-up") if compiled else ""
                print(f"{name:<20} {row['s_per_step']:.4f} s/step ({row['vs_bf16_eager']:.2f}x bf16 eager), "
                      f"rel err {row['rel_err_vs_bf16']:.4f}, peak alloc {row['peak_alloc_gib']} GiB, "
                      f"weights {row['weights_gib']} GiB{extra}  [{time.perf_counter() - start:.0f} s]")
            else:
                print(f"{name:<20} {row['status']}")
    meta["total_s"] = round(time.perf_counter() - start, 1)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.json} ({meta['total_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
