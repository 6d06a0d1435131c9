"""krea-lite command line: parse, call one public function, print. Defaults come from the configs."""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
from pathlib import Path

from .errors import KreaLiteError

MAX_VRAM_GB = 1024  # --vram-gb: a card's memory in GiB (the lower end is plan.card_budget's)
MAX_BATCH = 64  # plan --batch
CARDS_GB = (4, 6, 8, 10, 12, 16, 24)  # the card sizes `info` plans for


def _size(n: float) -> str:
    """Bytes for people: GiB from 1 GiB, MiB from 1 MiB, else KiB (a tiny model is not "0.00 GiB")."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def _no_loading_bars() -> None:
    """Hide transformers' per-model "Loading weights" bars (loading a folder downloads nothing)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def _warn(message: str) -> None:
    print(f"krea-lite: warning: {message}", file=sys.stderr, flush=True)


def _check_vram_gb(vram_gb: float | None) -> None:
    """Finite and at most MAX_VRAM_GB; `plan.card_budget` refuses what leaves nothing after the CUDA context."""
    if vram_gb is not None and not vram_gb <= MAX_VRAM_GB:  # also NaN
        raise KreaLiteError(f"--vram-gb {vram_gb:g} must be the card's memory in GiB, a finite number up to "
                            f"{MAX_VRAM_GB} (e.g. --vram-gb 8)")


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))


def cmd_quantize(args) -> int:
    from .quantize import QuantizeConfig, quantize_pipeline

    config = QuantizeConfig(transformer=args.transformer, text_encoder=args.text_encoder,
                            keep=tuple(args.keep) if args.keep else None, base=args.base,
                            revision=args.revision, device=args.device, t5=args.t5, clip=args.clip, vae=args.vae)
    out = quantize_pipeline(args.source, args.out, config, force=args.force, progress=not args.quiet)
    from .checkpoint import read_manifest

    manifest = read_manifest(out)
    print(f"{'component':<16}{'scheme':<16}{'before':>12}{'after':>12}")
    unquantized = []
    for name, c in manifest["components"].items():
        scheme = c["scheme"]
        if c.get("quantized_modules") == [] and scheme not in ("bf16", "copied", "converted"):
            unquantized.append(name)
            scheme = "bf16 (all kept)"  # the asked-for scheme applies to no module
        if c.get("stored_as") == "native":
            scheme += " (as stored)"
        print(f"{name:<16}{scheme:<16}{_size(c['source_bytes']):>12}{_size(c['bytes']):>12}")
    before = sum(c["source_bytes"] for c in manifest["components"].values())
    after = sum(c["bytes"] for c in manifest["components"].values())
    print(f"{'total':<32}{_size(before):>12}{_size(after):>12}")
    if unquantized:
        _warn(f"--keep {shlex.join(args.keep or [])} matched every Linear of {' and '.join(unquantized)}: "
              "nothing there was quantized, it is stored in bf16")
    print(f"wrote {out} in {manifest['quantize_seconds']} s")
    return 0


def _seed(text: str):
    """argparse type for --seed: an integer or "random"."""
    if text == "random":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer or 'random'") from None


def cmd_generate(args) -> int:
    import secrets

    from .generate import GenerateConfig, OutputConfig, generate, out_folder, read_prompts

    if args.prompt is None and args.prompts is None:
        raise KreaLiteError("give a prompt, e.g. krea-lite generate --model DIR \"a red fox in snow\", or --prompts FILE")
    if args.prompt is not None and args.prompts is not None:
        raise KreaLiteError("give either a prompt or --prompts FILE, not both (put the prompt in the file)")
    # --seed random: a seed that is easy to type back (below 2^32), printed and stored in every image
    seed = secrets.randbelow(2**32) if args.seed == "random" else args.seed
    config = GenerateConfig(steps=args.steps, guidance=args.guidance, width=args.width, height=args.height,
                            seed=seed, num_images=args.num_images, max_sequence_length=args.max_sequence_length)
    output = OutputConfig(name=args.name, format=args.format, overwrite=args.overwrite)
    _check_vram_gb(args.vram_gb)
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    if any(not p.strip() for p in prompts):
        raise KreaLiteError("the prompt is empty; give a text prompt such as \"a red fox in snow\"")
    out_folder(args.out, check_writable=True)  # before the model loads
    if args.seed == "random":
        print(f"seed {seed} (random; pass --seed {seed} to repeat)", flush=True)
    if args.quiet:
        _no_loading_bars()
    # --- LoRA (#12): parse --lora and check the files before the model loads; applied after it ---
    from .lora import active_loras, lora_specs

    loras = lora_specs(args.lora)
    # --- end LoRA ---
    from .pipeline import load_pipeline

    pipe = load_pipeline(args.model, device=args.device, vram_gb=args.vram_gb, width=args.width,
                         height=args.height, verify="full" if args.verify else "quick", compile=args.compile,
                         loras=loras)  # loaded before placement: the plan counts them
    for lora in active_loras(pipe):  # LoRA (#12)
        print(lora.summary())
    info = pipe.krea_lite
    if args.verify:
        print(f"verified {len(info.manifest['files'])} files of {info.path} against the manifest "
              f"(sizes, headers, sha256) in {(info.seconds or {}).get('verify', 0):.1f} s", flush=True)
    if args.verbose:
        weights = sum(c["bytes"] for c in info.manifest["components"].values())
        print(f"device {info.device}; loaded {_size(weights)} in "
              + ", ".join(f"{k} {v:.1f} s" for k, v in (info.seconds or {}).items()))
        print(info.plan.table() if info.plan is not None else
              "CPU: no placement plan (every weight stays in host memory; plans are for CUDA devices)", flush=True)
    pipe.set_progress_bar_config(disable=args.quiet)

    def report(g):  # as soon as each image is written: a later failure does not hide it
        vram = f", peak VRAM {g.peak_vram_gib:.2f} GiB" if g.peak_vram_gib is not None else ""
        speed = (f"{g.seconds_per_step:.3f} s/step after the first" if config.steps > 1
                 else "1 step")
        print(f"{g.path}  ({g.seconds:.1f} s, {speed}{vram})", flush=True)

    generate(pipe, prompts, config, args.out, output=output, on_image=report)
    return 0


def cmd_verify(args) -> int:
    from .checkpoint import CheckpointProblems, verify_checkpoint

    what = "sizes and headers" if args.quick else "sizes, headers and sha256"
    try:
        manifest = verify_checkpoint(args.folder, full=not args.quick)
    except CheckpointProblems as e:
        if args.debug:
            raise
        if args.json:
            _print_json({"folder": str(args.folder), "ok": False, "checked": what, "problems": list(e.problems)})
        else:
            for problem in e.problems:  # every problem, a line each
                print(f"krea-lite: error: {problem}", file=sys.stderr)
        return 2
    except KreaLiteError as e:
        if not args.json:
            raise
        _print_json({"folder": str(args.folder), "ok": False, "checked": what, "error": str(e)})
        return 2
    if args.json:
        _print_json({"folder": str(args.folder), "ok": True, "checked": what, "files": len(manifest["files"]),
                     "bytes": sum(f["size"] for f in manifest["files"].values())})
    else:
        print(f"OK: {args.folder} ({len(manifest['files'])} files; {what} match the manifest)")
    return 0


def cmd_synth(args) -> int:
    from .synthetic import write_synthetic

    if args.size == "full":
        print(f"writing a full-size synthetic FLUX pipeline (random weights, ~34 GB"
              f"{' + 24 GB single file' if not args.no_single_file else ''}) to {args.out}; this takes minutes",
              file=sys.stderr, flush=True)
    out = write_synthetic(Path(args.out), size=args.size, seed=args.seed, single_file=not args.no_single_file,
                          force=args.force, gguf=tuple(args.gguf))
    print(f"wrote synthetic ({args.size}, seed {args.seed}, random weights) FLUX pipeline to {out}")
    if args.comfy is not None:
        from .synthetic_comfy import write_comfy_files

        files = write_comfy_files(out, force=args.force, kinds=tuple(args.comfy) or None)
        print(f"wrote its ComfyUI / Forge single files to {next(iter(files.values())).parent}: "
              + ", ".join(p.name for p in files.values()))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    print(run_demo(Path(args.out)))
    return 0


def _plan_inputs(args):
    """Validated (width, height, batch) of `plan`/`info`, checked like generate's."""
    from .generate import GenerateConfig

    GenerateConfig(width=args.width, height=args.height)
    batch = getattr(args, "batch", 1)
    if not 1 <= batch <= MAX_BATCH:
        raise KreaLiteError(f"--batch {batch} must be an integer from 1 to {MAX_BATCH}")
    return args.width, args.height, batch


def _measure(folder, loras=()):
    from .pipeline import load_pipeline
    from .plan import measure

    _no_loading_bars()  # the table is the output
    return measure(load_pipeline(folder, device="cpu", verify="none", loras=loras))


def _plan_dict(plan, vram_gb) -> dict:
    from dataclasses import asdict

    d = asdict(plan)
    d.pop("sizes")
    return {"vram_gb": vram_gb, **d, "phase_bytes": dict(plan.phase_bytes), "peak_bytes": plan.peak_bytes,
            "peak_phase": plan.peak_phase}


def cmd_plan(args) -> int:
    import torch

    from .plan import card_budget, plan_for_budget

    _check_vram_gb(args.vram_gb)
    width, height, batch = _plan_inputs(args)
    budget = None if args.vram_gb is None else card_budget(args.vram_gb)
    from .lora import lora_specs

    sizes = _measure(args.model, lora_specs(args.lora))
    if budget is None and not torch.cuda.is_available():
        print("note: no CUDA GPU here, so this plan has no memory limit; give --vram-gb N to plan for a card "
              "of N GiB", file=sys.stderr)
    plan = plan_for_budget(sizes, budget, width=width, height=height, batch=batch)
    print(json.dumps(_plan_dict(plan, args.vram_gb), indent=2) if args.json else plan.table())
    if not args.json:
        print(_scheme_line(args.model))
        print(_copy_line(plan))
    return 0


def _copy_line(plan) -> str:
    """What streaming costs per step: the bytes, and on a CUDA machine their copy time at its measured bandwidth
    (the least a step can take: a step whose compute is shorter waits on the copies, copy-bound)."""
    import torch

    n = plan.streamed_bytes
    if not n:
        return "streamed per step: nothing (the transformer stays on the GPU)"
    line = f"streamed per step: {n / 2**30:.2f} GiB"
    if not torch.cuda.is_available():
        return line + " (on a CUDA machine, plan also measures their copy time)"
    from .bench.cells import _h2d_gbps

    gbps = _h2d_gbps()
    return (line + f"; at this machine's {gbps:.1f} GB/s host-to-device, {n / gbps / 1e9:.3f} s per step at least "
            "(copy-bound when the step's compute is shorter)")


def _scheme_line(folder) -> str:
    """What the transformer's scheme is, who chose it, and whether this machine runs its fast path."""
    from .checkpoint import read_manifest

    manifest = read_manifest(Path(folder).expanduser())
    info = manifest["components"]["transformer"]
    line = f"transformer scheme {info['scheme']}" + (f", chosen by {info['chosen_by']}" if info.get("chosen_by") else "")
    if info.get("requires"):
        import torch

        from .w8a8 import check_folder

        why = [w.partition(": ")[2] for w in check_folder(manifest, "cuda" if torch.cuda.is_available() else "cpu")
               if w.startswith("transformer: ")]
        line += ("; here it computes by dequantizing (see above)" if why else
                 "; its 8-bit kernel runs here: generate with --compile (eager 8-bit steps measured 1.27x (fp8mm) and "
                 "2.1x (int8mm) bf16's on an H200, compiled 0.58x and 0.82x)")
    return line


def _smallest_card(sizes, width: int, height: int, ok) -> float | None:
    """The smallest --vram-gb (to 0.1 GiB, up to MAX_VRAM_GB) whose plan satisfies `ok` (None: a plan
    that does not fit); plans only grow more resident with the budget, so a bisection finds it."""
    from .plan import CUDA_CONTEXT_BYTES, GiB, card_budget, plan_for_budget

    def good(tenths: int) -> bool:
        try:
            return ok(plan_for_budget(sizes, card_budget(tenths / 10), width=width, height=height))
        except KreaLiteError:
            return False

    lo, hi = math.floor(CUDA_CONTEXT_BYTES / GiB * 10), MAX_VRAM_GB * 10  # good(lo) is False
    if not good(hi):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if good(mid) else (mid, hi)
    return hi / 10


def _streams(plan) -> str:
    n = len(plan.streamed_double) + len(plan.streamed_single)
    total = len(plan.sizes.transformer_blocks) + len(plan.sizes.single_transformer_blocks)
    parts = [f"{n} of {total} transformer blocks streamed" if n else "transformer resident"]
    parts += ["T5 streamed"] if plan.t5_streamed else []
    parts += ["CLIP/VAE on demand"] if not plan.vae_on_gpu else []
    parts += ["VAE tiled"] if plan.vae_tiled else []
    return ", ".join(parts)


def cmd_info(args) -> int:
    from .checkpoint import read_manifest
    from .plan import card_budget, plan_for_budget

    width, height, _ = _plan_inputs(args)
    folder = Path(args.folder).expanduser()
    manifest = read_manifest(folder)
    components = manifest["components"]
    sizes = _measure(folder)
    cards = []
    for gb in CARDS_GB:
        try:
            plan = plan_for_budget(sizes, card_budget(gb), width=width, height=height)
            cards.append({"vram_gb": gb, "fits": True, "placement": _streams(plan),
                          "predicted_peak_bytes": plan.peak_bytes})
        except KreaLiteError:
            cards.append({"vram_gb": gb, "fits": False, "placement": "does not fit"})
    smallest = _smallest_card(sizes, width, height, lambda p: True)
    resident = _smallest_card(sizes, width, height, lambda p: not (p.streamed_double or p.streamed_single))
    data = {
        "folder": str(folder.resolve()),
        "format_version": manifest["format_version"],
        "written_by": manifest.get("libraries", {}).get("krea-lite"),
        "source": manifest.get("source"),
        "components": {n: {"scheme": c.get("scheme"), "bytes": c.get("bytes"), "source_bytes": c.get("source_bytes"),
                           "quantized_modules": len(c.get("quantized_modules") or []),
                           "kept_modules": len(c.get("kept_modules") or [])} for n, c in components.items()},
        "bytes": sum(c.get("bytes", 0) for c in components.values()),
        "plan_for": {"width": width, "height": height, "batch": 1},
        "smallest_card_gb": smallest,
        "transformer_resident_from_gb": resident,
        "cards": cards,
    }
    if args.json:
        _print_json(data)
        return 0
    src = data["source"] or {}
    origin = src.get("id", "?") + (f" @ {src['revision']}" if src.get("revision") else "")
    if src.get("sha256"):
        origin += f" (sha256 {src['sha256'][:12]}...)"
    if src.get("synthetic"):
        origin += " (synthetic: random weights)"
    print(f"{data['folder']}: krea-lite folder, format {data['format_version']}, written by krea-lite "
          f"{data['written_by'] or '?'}")
    print(f"source: {origin}")
    print(f"{'component':<16}{'scheme':<10}{'quantized / kept':>18}{'size':>12}")
    for name, c in data["components"].items():
        mods = f"{c['quantized_modules']} / {c['kept_modules']}" if c["scheme"] not in ("copied", "converted") else ""
        print(f"{name:<16}{c['scheme']:<10}{mods:>18}{_size(c['bytes'] or 0):>12}")
    print(f"{'total':<44}{_size(data['bytes']):>12}")
    print(f"cards, for {width}x{height} images (plan for a card of N GiB; `krea-lite plan` shows one in full):")
    for c in cards:
        peak = f"  (predicted peak {_size(c['predicted_peak_bytes'])})" if c["fits"] else ""
        print(f"  {c['vram_gb']:>3} GiB  {c['placement']}{peak}")
    print(f"smallest card: {smallest} GiB" if smallest else f"needs more than {MAX_VRAM_GB} GiB",
          end="" if resident else "\n")
    if resident:
        print(f"; the whole transformer stays on the GPU from {resident} GiB")
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
    from . import __version__
    from .generate import (
        FORMATS,
        MAX_IMAGES,
        MAX_PROMPT_FILE_BYTES,
        MAX_PROMPTS,
        MAX_SIDE,
        MAX_STEPS,
        MIN_SIDE,
        NAME_FIELDS,
        GenerateConfig,
        OutputConfig,
    )
    from .plan import CUDA_CONTEXT_BYTES, GiB
    from .quantize import QuantizeConfig
    from .schemes import SCHEMES
    from .synthetic_comfy import FILES as COMFY_FILES

    gen, qc, oc = GenerateConfig(), QuantizeConfig(), OutputConfig()
    context = f"{CUDA_CONTEXT_BYTES / GiB:.2f} GiB of CUDA context"
    side = f"pixels, a multiple of 16 from {MIN_SIDE} to {MAX_SIDE}"
    p = argparse.ArgumentParser(prog="krea-lite", description="Run FLUX.1 Krea [dev] on 8-16 GB GPUs.")
    p.add_argument("--version", action="version", version=f"krea-lite {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    # --debug also after the subcommand (krea-lite generate --debug ...); SUPPRESS keeps the one above
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = {"formatter_class": _Help, "parents": [debug]}

    q = sub.add_parser("quantize", **fmt, help="convert a source once into a small quantized folder")
    q.add_argument("source", help="hub repo id, local diffusers folder, or a transformer single file "
                   "(flux1-krea-dev.safetensors, ComfyUI *_fp8_scaled, Forge bnb-nf4; told apart by its header)")
    q.add_argument("--out", required=True, help="folder to create")
    q.add_argument("--transformer", default=qc.transformer, choices=[*SCHEMES, "auto"],
                   help="scheme for the FLUX transformer (default: what a single file stores, kept as it is; else "
                        "nf4). auto: the 8-bit matmul this GPU runs natively (fp8mm on RTX 40 / 8.9+, int8mm on "
                        "RTX 30 / 8.0+, else nf4); generate it with --compile, eager 8-bit steps are slower than nf4")
    q.add_argument("--text-encoder", default=qc.text_encoder, choices=list(SCHEMES),
                   help="scheme for T5-XXL (default: as for --transformer)")
    q.add_argument("--keep", nargs="+", metavar="PATTERN", help="module patterns left bf16 (replaces defaults)")
    q.add_argument("--base", help="for a single-file source: repo id or folder with the other components")
    q.add_argument("--t5", metavar="FILE", help="T5-XXL from a single file (ComfyUI t5xxl_fp16 / t5xxl_fp8_e4m3fn"
                   "[_scaled].safetensors); its config comes from --base")
    q.add_argument("--clip", metavar="FILE", help="CLIP-L from a single file (clip_l.safetensors)")
    q.add_argument("--vae", metavar="FILE", help="the VAE from a single file (BFL/ComfyUI ae.safetensors)")
    q.add_argument("--revision", help="hub revision (branch, tag or commit)")
    q.add_argument("--device", choices=["cpu", "cuda"], help="where to quantize (default: cuda if available)")
    q.add_argument("--force", action="store_true", help="replace --out if it is an earlier krea-lite folder (or empty)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_quantize)

    fields = " ".join("{" + f + "}" for f in NAME_FIELDS)
    g = sub.add_parser("generate", **fmt, help="generate images from a quantized folder")
    g.add_argument("prompt", nargs="?", help="the prompt (or --prompts FILE, not both)")
    g.add_argument("--model", required=True, help="folder written by `krea-lite quantize`")
    g.add_argument("--prompts", help=f"UTF-8 text file, one prompt per line (at most {MAX_PROMPTS} prompts, "
                   f"{MAX_PROMPT_FILE_BYTES >> 20} MiB)")
    g.add_argument("--seed", type=_seed, default=gen.seed,
                   help="0 to 2^64-1, or random (printed and stored); image k of each prompt uses seed+k")
    g.add_argument("--steps", type=int, default=gen.steps, help=f"denoising steps, 1 to {MAX_STEPS}")
    g.add_argument("--guidance", type=float, default=gen.guidance, help="guidance (FLUX.1 [dev] distilled guidance)")
    g.add_argument("--width", type=int, default=gen.width, help=side)
    g.add_argument("--height", type=int, default=gen.height, help=side)
    g.add_argument("--max-sequence-length", type=int, default=gen.max_sequence_length, help="T5 prompt tokens, 1 to 512")
    g.add_argument("--num-images", type=int, default=gen.num_images,
                   help=f"images per prompt, 1 to {MAX_IMAGES} (seeds seed, seed+1, ...)")
    g.add_argument("--out", default="krea-lite-out", help="output folder")
    g.add_argument("--name", default=oc.name, metavar="TEMPLATE",
                   help=f"file name without extension; fields {fields} (Python format, e.g. {{n:03d}})")
    g.add_argument("--format", default=oc.format, choices=list(FORMATS),
                   help="png (text chunks) or webp/jpg (quality 95, EXIF UserComment): the same settings in each")
    g.add_argument("--overwrite", action="store_true",
                   help="replace existing files of the same name (default: the next free name, NAME-2.png, ...)")
    g.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if available)")
    g.add_argument("--vram-gb", type=float,
                   help=f"the card's memory in GiB, up to {MAX_VRAM_GB}: plan for it (less {context}) and hold "
                        "this process to it (default: what the card has free)")
    g.add_argument("--verify", action="store_true", help="check every file's sha256 before loading, and say so")
    g.add_argument("--verbose", action="store_true", help="print the device, load times and the placement plan")
    g.add_argument("--compile", action="store_true", help="torch.compile the transformer's blocks (first step "
                   "compiles; cached under ~/.cache/krea-lite/compile; not yet measured on a GPU)")
    g.add_argument("--lora", action="append", metavar="FILE[:SCALE]",  # LoRA (#12)
                   help="a LoRA .safetensors file, its scale after the last ':' (default 1.0); repeat to stack LoRAs")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser("verify", **fmt, help="check a quantized folder against its manifest")
    v.add_argument("folder", help="folder written by `krea-lite quantize`")
    v.add_argument("--quick", action="store_true", help="sizes and headers only, no sha256")
    v.add_argument("--json", action="store_true", help="print the result as JSON (ok, checked, and files or problems)")
    v.set_defaults(func=cmd_verify)

    i = sub.add_parser("info", **fmt, help="what a quantized folder holds and which cards it fits (loads it on the CPU)")
    i.add_argument("folder", help="folder written by `krea-lite quantize`")
    i.add_argument("--width", type=int, default=gen.width, help="image width the card plans are for")
    i.add_argument("--height", type=int, default=gen.height, help="image height the card plans are for")
    i.add_argument("--json", action="store_true", help="print it as JSON")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("demo", **fmt, help="offline CPU demo on a tiny synthetic model (no flags needed)")
    d.add_argument("--out", default="krea-lite-demo", help="folder for the demo's models and images")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("synth", **fmt, help="write a synthetic FLUX pipeline (random weights) laid out like the real repo")
    s.add_argument("out", help="folder to create")
    s.add_argument("--size", default="tiny", choices=["tiny", "full"], help="full = the real shapes (33.7 GB)")
    s.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    s.add_argument("--no-single-file", action="store_true", help="skip the BFL single-file transformer")
    s.add_argument("--force", action="store_true", help="replace an earlier synthetic folder")
    s.add_argument("--gguf", nargs="+", metavar="TYPE", default=[],
                   help="also write the transformer as flux1-krea-dev-TYPE.gguf (Q8_0, Q4_K, ..., BF16)")
    s.add_argument("--comfy", nargs="*", metavar="KIND", choices=list(COMFY_FILES),
                   help="also write its ComfyUI / Forge single files to OUT-comfy/: all, or the KINDs named "
                   f"({', '.join(COMFY_FILES)})")
    s.set_defaults(func=cmd_synth)

    pl = sub.add_parser("plan", **fmt, help="show where every weight would live for a VRAM budget")
    pl.add_argument("--model", required=True, help="folder written by `krea-lite quantize`")
    pl.add_argument("--vram-gb", type=float, help=f"the card's memory in GiB, up to {MAX_VRAM_GB} (less {context}; "
                    "default: what the card has free)")
    pl.add_argument("--width", type=int, default=gen.width, help=f"largest image width ({side})")
    pl.add_argument("--height", type=int, default=gen.height, help=f"largest image height ({side})")
    pl.add_argument("--batch", type=int, default=1, help=f"images per call, 1 to {MAX_BATCH}")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON (bytes, block indices)")
    pl.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                    help="plan with these LoRAs loaded (their factors stay on the GPU); repeatable, as for generate")
    pl.set_defaults(func=cmd_plan)

    b = sub.add_parser("bench", **fmt, help="measure memory, speed and fidelity side by side")
    from . import bench  # standard library only at import time

    bench.add_arguments(b)
    b.set_defaults(func=cmd_bench)
    return p


_INTERRUPTED = {"sigint": False}


def main(argv: list[str] | None = None) -> int:
    import signal

    def on_sigint(signum, frame):
        _INTERRUPTED["sigint"] = True
        raise KeyboardInterrupt

    on_sigint.krea_lite = True  # generate's between-steps handler may take over from it
    previous = signal.signal(signal.SIGINT, on_sigint) if _main_thread() else None
    try:
        return _main(argv)
    except KeyboardInterrupt:  # also while the libraries import (the first seconds), before parsing is done
        print("krea-lite: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _main(argv: list[str] | None) -> int:
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
    except Exception as e:
        if _INTERRUPTED["sigint"]:  # a library wrapped the KeyboardInterrupt (diffusers' lazy imports do)
            raise KeyboardInterrupt from e
        if args.debug:
            raise
        print(f"krea-lite: unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        logging.disable(quiet_before)


if __name__ == "__main__":
    sys.exit(main())
