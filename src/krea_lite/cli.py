"""krea-lite command line: parse, call one public function, print. Defaults come from the configs."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import KreaLiteError


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _no_loading_bars() -> None:
    """Hide transformers' per-model "Loading weights" bars (loading a folder downloads nothing)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def cmd_quantize(args) -> int:
    from .quantize import QuantizeConfig, quantize_pipeline

    config = QuantizeConfig(transformer=args.transformer, text_encoder=args.text_encoder,
                            keep=tuple(args.keep) if args.keep else None, base=args.base,
                            revision=args.revision, device=args.device)
    out = quantize_pipeline(args.source, args.out, config, force=args.force, progress=not args.quiet)
    from .checkpoint import read_manifest

    manifest = read_manifest(out)
    print(f"{'component':<16}{'scheme':<10}{'before':>12}{'after':>12}")
    for name, c in manifest["components"].items():
        print(f"{name:<16}{c['scheme']:<10}{_gib(c['source_bytes']):>12}{_gib(c['bytes']):>12}")
    before = sum(c["source_bytes"] for c in manifest["components"].values())
    after = sum(c["bytes"] for c in manifest["components"].values())
    print(f"{'total':<26}{_gib(before):>12}{_gib(after):>12}")
    print(f"wrote {out} in {manifest['quantize_seconds']} s")
    return 0


def cmd_generate(args) -> int:
    from .generate import GenerateConfig, generate, out_folder, read_prompts
    from .pipeline import load_pipeline

    if args.prompt is None and args.prompts is None:
        raise KreaLiteError("give a prompt, e.g. krea-lite generate --model DIR \"a red fox in snow\", or --prompts FILE")
    prompts = ([args.prompt] if args.prompt is not None else []) + (read_prompts(args.prompts) if args.prompts else [])
    config = GenerateConfig(steps=args.steps, guidance=args.guidance, width=args.width, height=args.height,
                            seed=args.seed, num_images=args.num_images,
                            max_sequence_length=args.max_sequence_length)
    if any(not p.strip() for p in prompts):
        raise KreaLiteError("the prompt is empty; give a text prompt such as \"a red fox in snow\"")
    if args.quiet:
        _no_loading_bars()
    out_folder(args.out)  # before the model loads
    # --- LoRA (#12): parse --lora and check the files before the model loads; applied after it ---
    from .lora import lora_specs, use_loras

    loras = lora_specs(args.lora)
    # --- end LoRA ---
    if args.vram_gb is not None and args.vram_gb > 0:
        _cap_cuda_memory(args.device, args.vram_gb)
    pipe = load_pipeline(args.model, device=args.device, vram_gb=args.vram_gb, width=args.width,
                         height=args.height, verify="full" if args.verify else "quick")
    for lora in use_loras(pipe, loras):  # LoRA (#12)
        print(lora.summary())
    plan = pipe.krea_lite.plan
    if args.verbose and plan is not None:
        print(plan.table())
    pipe.set_progress_bar_config(disable=args.quiet)
    for g in generate(pipe, prompts, config, args.out):
        vram = f", peak VRAM {g.peak_vram_gib:.2f} GiB" if g.peak_vram_gib is not None else ""
        print(f"{g.path}  ({g.seconds:.1f} s, {g.seconds_per_step:.3f} s/step after the first{vram})")
    return 0


def _cap_cuda_memory(device: str | None, vram_gb: float) -> None:
    """Hold this process to what a card of `vram_gb` GiB would leave torch (`plan.card_budget`), so that
    --vram-gb 8 on a larger card behaves like an 8 GB card (and the out-of-memory fallback can act)."""
    import torch

    from .plan import card_budget

    if not torch.cuda.is_available() or (device or "cuda") == "cpu":
        return  # load_pipeline reports --vram-gb without CUDA
    dev = torch.device(device or "cuda")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, card_budget(vram_gb) / total), index)


def cmd_verify(args) -> int:
    from .checkpoint import verify_checkpoint

    manifest = verify_checkpoint(args.folder, full=not args.quick)
    what = "sizes and headers" if args.quick else "sizes, headers and sha256"
    print(f"OK: {args.folder} ({len(manifest['files'])} files; {what} match the manifest)")
    return 0


def cmd_synth(args) -> int:
    from .synthetic import write_synthetic

    out = write_synthetic(Path(args.out), size=args.size, seed=args.seed, single_file=not args.no_single_file,
                          force=args.force)
    print(f"wrote synthetic ({args.size}, seed {args.seed}, random weights) FLUX pipeline to {out}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    print(run_demo(Path(args.out)))
    return 0


def cmd_plan(args) -> int:
    import torch

    from .pipeline import load_pipeline
    from .plan import card_budget, measure, plan_for_budget

    _no_loading_bars()  # the plan table is the output
    pipe = load_pipeline(args.model, device="cpu", verify="none")
    budget = None if args.vram_gb is None else card_budget(args.vram_gb)
    if budget is None and not torch.cuda.is_available():
        print("note: no CUDA GPU here, so this plan has no memory limit; give --vram-gb N to plan for a card "
              "of N GiB", file=sys.stderr)
    print(plan_for_budget(measure(pipe), budget, width=args.width, height=args.height, batch=args.batch).table())
    return 0


def cmd_bench(args) -> int:
    from . import bench

    return bench.run(args)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows real defaults in --help; not None/False, nor where the help text already says it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from .generate import GenerateConfig
    from .plan import CUDA_CONTEXT_BYTES, GiB
    from .quantize import QuantizeConfig
    from .schemes import SCHEMES

    gen, qc = GenerateConfig(), QuantizeConfig()
    context = f"{CUDA_CONTEXT_BYTES / GiB:.2f} GiB of CUDA context"
    p = argparse.ArgumentParser(prog="krea-lite", description="Run FLUX.1 Krea [dev] on 8-16 GB GPUs.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = {"formatter_class": _Help}

    q = sub.add_parser("quantize", **fmt, help="convert a source once into a small quantized folder")
    q.add_argument("source", help="hub repo id, local diffusers folder, or flux1-krea-dev.safetensors")
    q.add_argument("--out", required=True, help="folder to create")
    q.add_argument("--transformer", default=qc.transformer, choices=list(SCHEMES), help="scheme for the FLUX transformer")
    q.add_argument("--text-encoder", default=qc.text_encoder, choices=list(SCHEMES), help="scheme for T5-XXL")
    q.add_argument("--keep", nargs="+", metavar="PATTERN", help="module patterns left bf16 (replaces defaults)")
    q.add_argument("--base", help="for a single-file source: repo id or folder with the other components")
    q.add_argument("--revision", help="hub revision (branch, tag or commit)")
    q.add_argument("--device", choices=["cpu", "cuda"], help="where to quantize (default: cuda if available)")
    q.add_argument("--force", action="store_true", help="replace --out if it is an earlier krea-lite folder (or empty)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_quantize)

    g = sub.add_parser("generate", **fmt, help="generate images from a quantized folder")
    g.add_argument("prompt", nargs="?", help="the prompt")
    g.add_argument("--model", required=True, help="folder written by `krea-lite quantize`")
    g.add_argument("--prompts", help="UTF-8 text file, one prompt per line")
    g.add_argument("--seed", type=int, default=gen.seed, help="image k of each prompt uses seed+k")
    g.add_argument("--steps", type=int, default=gen.steps, help="denoising steps")
    g.add_argument("--guidance", type=float, default=gen.guidance, help="guidance (FLUX.1 [dev] distilled guidance)")
    g.add_argument("--width", type=int, default=gen.width, help="pixels, a multiple of 16")
    g.add_argument("--height", type=int, default=gen.height, help="pixels, a multiple of 16")
    g.add_argument("--max-sequence-length", type=int, default=gen.max_sequence_length, help="T5 prompt tokens")
    g.add_argument("--num-images", type=int, default=gen.num_images, help="images per prompt (seeds seed, seed+1, ...)")
    g.add_argument("--out", default="krea-lite-out", help="output folder for PNGs")
    g.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if available)")
    g.add_argument("--vram-gb", type=float,
                   help=f"the card's memory in GiB: plan for it (less {context}) and hold this process to it "
                        "(default: what the card has free)")
    g.add_argument("--verify", action="store_true", help="check every file's sha256 before loading")
    g.add_argument("--lora", action="append", metavar="FILE[:SCALE]",  # LoRA (#12)
                   help="a LoRA .safetensors file, its scale after the last ':' (default 1.0); repeat to stack LoRAs")
    g.add_argument("--verbose", action="store_true", help="print the placement plan")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser("verify", **fmt, help="check a quantized folder against its manifest")
    v.add_argument("folder")
    v.add_argument("--quick", action="store_true", help="sizes and headers only, no sha256")
    v.set_defaults(func=cmd_verify)

    d = sub.add_parser("demo", **fmt, help="offline CPU demo on a tiny synthetic model (no flags needed)")
    d.add_argument("--out", default="krea-lite-demo", help="folder for the demo's models and images")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("synth", **fmt, help="write a synthetic FLUX pipeline (random weights) laid out like the real repo")
    s.add_argument("out", help="folder to create")
    s.add_argument("--size", default="tiny", choices=["tiny", "full"], help="full = the real shapes (33.7 GB)")
    s.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    s.add_argument("--no-single-file", action="store_true", help="skip the BFL single-file transformer")
    s.add_argument("--force", action="store_true", help="replace an earlier synthetic folder")
    s.set_defaults(func=cmd_synth)

    pl = sub.add_parser("plan", **fmt, help="show where every weight would live for a VRAM budget")
    pl.add_argument("--model", required=True, help="folder written by `krea-lite quantize`")
    pl.add_argument("--vram-gb", type=float, help=f"the card's memory in GiB (less {context}; "
                    "default: what the card has free)")
    pl.add_argument("--width", type=int, default=gen.width, help="largest image width")
    pl.add_argument("--height", type=int, default=gen.height, help="largest image height")
    pl.add_argument("--batch", type=int, default=1, help="images per call")
    pl.set_defaults(func=cmd_plan)

    b = sub.add_parser("bench", **fmt, help="measure memory, speed and fidelity side by side")
    from . import bench  # standard library only at import time

    bench.add_arguments(b)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    import os

    # Streaming allocates fixed slots and the steps' activations vary in size: expandable segments keep
    # reserved memory close to allocated (read when CUDA first allocates; a user's setting wins).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    args = build_parser().parse_args(argv)
    quiet_before = logging.root.manager.disable
    if not args.debug:  # library log chatter (optional kernels, torchvision, ...) would bury the one error line
        logging.disable(logging.WARNING)
    try:
        return args.func(args)
    except KreaLiteError as e:
        if args.debug:
            raise
        print(f"krea-lite: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("krea-lite: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(f"krea-lite: unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        logging.disable(quiet_before)


if __name__ == "__main__":
    sys.exit(main())
