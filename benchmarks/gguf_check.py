"""GGUF on the full-size model: krea-lite's kept GGUF blocks against diffusers' own GGUF loader.

For each GGML type: write the full-size synthetic transformer as a FLUX .gguf (unless it is there), convert
it with `krea-lite quantize FILE.gguf --base FOLDER` in a child process (time, peak RSS), load the same file
with diffusers (`FluxTransformer2DModel.from_single_file(..., GGUFQuantizationConfig(bf16))`) and our folder's
transformer, run one forward at 1024x1024 (4096 image + 512 text tokens) with the same inputs, and print the
relative error between the two outputs (target <= 1e-2) and the s/step of each (median of 3 after a warm-up).
It also runs diffusers' model once with its GGUF blocks dequantized in float32 (`exact_dequantize`): krea-lite
dequantizes in float32, diffusers in float16, and the two extra errors say how much of the gap that rounding is.
diffusers' Flux single-file converter hard-codes the real widths, so this needs `--size full` synthetic folders.

    krea-lite synth /tmp/flux-full --size full --gguf Q8_0 Q4_K
    python benchmarks/gguf_check.py --synthetic /tmp/flux-full --types Q8_0 Q4_K --out-root /tmp/gguf-q \
        --json benchmarks/results/gguf-check.json [--compile]

As a user with ComfyUI files converts them: `--files DIR` holds the .gguf (written there from --synthetic when
missing) and ComfyUI encoders (`--t5/--clip/--vae` names inside DIR); `--base` a folder of configs and tokenizers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from quantize_full import _status_kib  # noqa: E402


def convert(gguf: Path, base: Path, out: Path, extra: tuple = ()) -> dict:
    cmd = [sys.executable, "-m", "krea_lite.cli", "quantize", str(gguf), "--base", str(base), *extra, "--out", str(out),
           "--force", "--quiet"]
    start, peak, anon = time.perf_counter(), 0, 0
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while proc.poll() is None:  # VmRSS counts the memory-mapped .gguf pages; RssAnon what the conversion holds
        peak = max(peak, _status_kib(proc.pid, "VmRSS"))
        anon = max(anon, _status_kib(proc.pid, "RssAnon"))
        time.sleep(0.05)
    row = {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
           "peak_vmrss_gib": round(peak / 2**20, 3), "peak_rss_anon_gib": round(anon / 2**20, 3),
           "output_tail": proc.stdout.read()[-1500:]}
    if proc.returncode == 0:
        t = json.loads((out / "krea_lite.json").read_text())["components"]["transformer"]
        row.update(scheme=t["scheme"], stored_as=t["stored_as"], tensor_types=t["native"]["tensor_types"],
                   bytes=t["bytes"], source_bytes=t["source_bytes"])
    return row


def inputs(device):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.stack(torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij"), -1).reshape(-1, 2)
    x = dict(hidden_states=torch.randn(1, 4096, 64, generator=g), encoder_hidden_states=torch.randn(1, 512, 4096, generator=g),
             pooled_projections=torch.randn(1, 768, generator=g))
    x = {k: v.to(device, torch.bfloat16) for k, v in x.items()}
    return dict(x, timestep=torch.tensor([0.5], device=device), guidance=torch.tensor([3.5], device=device),
                img_ids=torch.cat([torch.zeros(4096, 1), ids], 1).to(device), txt_ids=torch.zeros(512, 3, device=device),
                return_dict=False)


def timed(model, x, repeats: int = 3):
    import torch

    with torch.no_grad():
        out = model(**x)[0]  # warm-up (compiles, with --compile)
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(**x)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return out.float().cpu(), round(statistics.median(times), 4) if times else None


@contextmanager
def exact_dequantize():
    """diffusers' GGUFLinear dequantizing in float32 (gguf-py's reference values) instead of its float16 default.

    Its default rounds each weight to float16 before the bf16 cast (1 bf16 ulp off on 5-15% of the weights of
    a K-type block); krea-lite dequantizes in float32. This tells that rounding apart from any other difference."""
    import torch
    from diffusers.quantizers.gguf import utils

    def float32(tensor):
        if not hasattr(tensor, "quant_type"):
            return tensor
        from krea_lite.gguf_file import dequantize

        raw = tensor.as_tensor().view(torch.uint8)
        return dequantize(raw, tensor.quant_type)

    saved = utils.dequantize_gguf_tensor, utils.ops
    utils.dequantize_gguf_tensor, utils.ops = float32, None  # ops: its optional CUDA kernels, which skip the patch
    try:
        yield
    finally:
        utils.dequantize_gguf_tensor, utils.ops = saved


def check(kind: str, folder: Path, out_root: Path, compile_: bool, files: Path | None = None,
          base: Path | None = None, extra: tuple = ()) -> dict:
    import torch
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    from krea_lite.compat import move
    from krea_lite.pipeline import load_component
    from krea_lite.synthetic_gguf import gguf_name, write_gguf

    base = base or folder
    path = (files or folder) / gguf_name(kind)
    row: dict = {"type": kind, "file": str(path)}
    if not path.exists():
        t0 = time.perf_counter()
        write_gguf(folder, path, kind)
        row["write_seconds"] = round(time.perf_counter() - t0, 1)
    row["file_gib"] = round(path.stat().st_size / 2**30, 3)
    out = out_root / kind
    row["quantize"] = convert(path, base, out, extra)
    if row["quantize"]["returncode"] != 0:
        return row
    x = inputs("cuda")
    ref_model = FluxTransformer2DModel.from_single_file(
        str(path), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16),
        config=str(base / "transformer"), torch_dtype=torch.bfloat16).to("cuda")
    ref, row["diffusers_s_per_step"] = timed(ref_model, x)
    with exact_dequantize():  # the same diffusers model, its blocks dequantized in float32 as gguf-py does
        exact, _ = timed(ref_model, x, repeats=0)
    del ref_model
    torch.cuda.empty_cache()
    info = json.loads((out / "krea_lite.json").read_text())["components"]["transformer"]
    ours = load_component(out / "transformer", "transformer", info)
    move(ours, torch.device("cuda"))
    if compile_:
        from krea_lite.compile import compile_transformer

        compile_transformer(ours, device="cuda")
    got, row["krea_lite_s_per_step"] = timed(ours, x)
    row["compiled"] = compile_
    row["rel_err"] = float((got - ref).norm() / ref.norm())
    row["rel_err_vs_diffusers_float32_dequant"] = float((got - exact).norm() / exact.norm())
    row["diffusers_float16_vs_float32_dequant"] = float((ref - exact).norm() / exact.norm())
    row["ok"] = row["rel_err"] <= 1e-2
    del ours
    torch.cuda.empty_cache()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", required=True, type=Path, help="a full-size `krea-lite synth --size full` folder")
    ap.add_argument("--types", nargs="+", default=["Q8_0", "Q4_K"])
    ap.add_argument("--out-root", required=True, type=Path, help="where the converted folders go")
    ap.add_argument("--compile", action="store_true", help="also torch.compile our transformer's blocks")
    ap.add_argument("--files", type=Path, help="where the .gguf is (default --synthetic) and --t5/--clip/--vae are")
    ap.add_argument("--base", type=Path, help="configs and tokenizers for quantize --base (default --synthetic)")
    for c in ("t5", "clip", "vae"):
        ap.add_argument(f"--{c}", help=f"a ComfyUI {c} file name inside --files, passed to quantize --{c}")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch

    rows = []
    for kind in args.types:
        extra = tuple(x for c in ("t5", "clip", "vae") if getattr(args, c)
                      for x in (f"--{c}", str((args.files or args.synthetic) / getattr(args, c))))
        row = check(kind, args.synthetic, args.out_root, args.compile, args.files, args.base, extra)
        rows.append(row)
        q = row["quantize"]
        print(f"{kind}: file {row['file_gib']} GiB; quantize rc {q['returncode']} in {q['seconds']} s, peak RSS "
              f"{q['peak_vmrss_gib']} GiB (anon {q['peak_rss_anon_gib']}); diffusers {row.get('diffusers_s_per_step')} s/step, krea-lite "
              f"{row.get('krea_lite_s_per_step')} s/step; rel err {row.get('rel_err')} (vs diffusers dequantizing in float32: "
              f"{row.get('rel_err_vs_diffusers_float32_dequant')}; diffusers float16 vs float32 dequantize: "
              f"{row.get('diffusers_float16_vs_float32_dequant')})", flush=True)
    if args.json:
        from krea_lite.checkpoint import library_versions

        args.json.write_text(json.dumps({"card": torch.cuda.get_device_name(), "libraries": library_versions(),
                                         "rows": rows}, indent=2))
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
