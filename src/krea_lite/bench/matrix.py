"""krea-lite bench, the matrix: the command line, its presets and settings, and the cells of a run."""

from __future__ import annotations

import argparse
from pathlib import Path

GiB = 2**30
SCHEMES = ("bf16", "nf4", "int8", "qint8", "qfloat8", "qint4", "fp8mm", "int8mm", "gguf")  # gguf: --models only
ANCHORS = ("bf16_resident", "nf4_model_cpu_offload", "nf4_group_block_stream", "nf4_group_leaf_stream",
           "bf16_group_leaf_stream")

# The one place for matrix defaults; a flag given on the command line wins over its preset.
PRESETS = {
    "full": dict(schemes=[s for s in SCHEMES if s != "gguf"], budgets=[None, 16, 12, 8, 6, 4],
                 resolutions=["1024x1024", "512x512", "768x768", "1152x896"], batches=[1, 2],
                 steps=5, warmup=1, e2e_steps=28, anchors=list(ANCHORS), anchor_resolution="1024x1024",
                 anchor_budgets=[None, 8, 4], cell_timeout=900, time_budget=0),
    # One 10-minute H200 command with `--synthetic full` (~2.5 min to write and quantize it): nf4 at
    # four budgets x two resolutions (~20-40 s a cell, mostly import + load), bf16_resident and the four
    # other anchors at 8 GiB, and the bf16 reference at 1024². The 540 s budget leaves ~45 s for
    # installing wheels; what no longer fits (the 512² cells first) is recorded as skipped.
    "quick": dict(schemes=["nf4"], budgets=[None, 8, 6, 4], resolutions=["1024x1024", "512x512"], batches=[1],
                  steps=3, warmup=1, e2e_steps=4, anchors=list(ANCHORS), anchor_resolution="1024x1024",
                  anchor_budgets=[8], cell_timeout=120, time_budget=540),
}


# ---------------------------------------------------------------------------------------------
# command line


def _budget(text: str) -> float | None:
    return None if text.lower() in ("none", "0", "unlimited") else float(text)


def _resolution(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    if not (w.isdigit() and h.isdigit()) or int(w) % 16 or int(h) % 16:
        raise argparse.ArgumentTypeError(f"{text!r}: give WIDTHxHEIGHT, multiples of 16, e.g. 1024x1024")
    return int(w), int(h)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `krea-lite bench` flags. Matrix flags left out take their value from the preset."""
    src = parser.add_argument_group("what to benchmark")
    src.add_argument("--models", nargs="+", default=[], metavar="SCHEME=DIR",
                     help="existing krea-lite folders, e.g. nf4=out/nf4 int8=out/int8")
    src.add_argument("--source", help="repo id or FLUX folder: quantize each missing scheme into --workdir; "
                     "also the bf16 reference and anchors")
    src.add_argument("--synthetic", choices=("tiny", "full"),
                     help="write a synthetic (random weights) FLUX into --workdir and use it as --source")
    src.add_argument("--workdir", type=Path, help="where quantized folders (WORKDIR/SCHEME) and scratch files live")
    m = parser.add_argument_group("matrix (defaults from --quick or the full preset)")
    m.add_argument("--quick", action="store_true", help="the preset that fits one 10-minute H200 run")
    m.add_argument("--schemes", nargs="+", choices=SCHEMES)
    m.add_argument("--budgets", nargs="+", type=_budget, metavar="GIB|none",
                   help="VRAM caps: each cell's allocator is held to N GiB and krea-lite plans for a card of N GiB "
                        "(less its CUDA context, see plan.CUDA_CONTEXT_BYTES); none = uncapped")
    m.add_argument("--resolutions", nargs="+", type=_resolution, metavar="WxH")
    m.add_argument("--batches", nargs="+", type=int)
    m.add_argument("--steps", type=int, help="timed transformer steps per cell (median reported)")
    m.add_argument("--warmup", type=int, help="untimed steps first")
    m.add_argument("--e2e-steps", type=int, help="denoising steps of the end-to-end image")
    m.add_argument("--anchors", nargs="*", choices=ANCHORS, help="diffusers anchors to re-take (none: no flag values)")
    m.add_argument("--anchor-resolution", type=_resolution, metavar="WxH")
    m.add_argument("--anchor-budgets", nargs="+", type=_budget, metavar="GIB|none",
                   help="caps for the anchors (bf16_resident always runs uncapped, once)")
    m.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                   help="also measure streamed/resident step ratios interleaved in one process: ROUNDS rounds "
                        "of resident and every capped --budgets card taking turns (3 or more; 0: off)")
    m.add_argument("--compile", action="store_true", help="--interleave cells: load_pipeline(compile=True)")
    m.add_argument("--interleave-only", action="store_true", help="run only the --interleave cells")
    m.add_argument("--loras", type=int, default=0, metavar="N",
                   help="--interleave cells: N synthetic LoRAs loaded; every card also runs with the first and "
                        "with all N active (ratios to the same card without LoRA)")
    m.add_argument("--lora-rank", type=int, default=64, help="rank of the --loras LoRAs (default 64)")
    m.add_argument("--spread", action="store_true",
                   help="--interleave cells: plan_for_budget(spread=True), streamed blocks spread through each list")
    m.add_argument("--against", nargs="+", default=[], choices=SCHEMES, metavar="SCHEME",
                   help="--interleave cells: these schemes' folders (--models, eager, no LoRA) take turns at every "
                        "card too; each card's step is also reported over theirs at the same card")
    m.add_argument("--lora-fused", action="store_true",
                   help="--loras cells: also run each LoRA variant with lora.fused_side_branch (opt-in fused path)")
    m.add_argument("--cell-timeout", type=float, help="seconds before a cell is killed")
    m.add_argument("--time-budget", type=float, help="seconds for the whole run; cells that no longer fit are "
                   "recorded as skipped (0: no limit)")
    r = parser.add_argument_group("run")
    r.add_argument("--prompt", default="a red fox in fresh snow at golden hour, 35mm photo")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--guidance", type=float, default=4.5)
    r.add_argument("--text-tokens", type=int, default=512, help="T5 tokens of the per-step inputs")
    r.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    r.add_argument("--out", type=Path, help="result JSON; .md and -*.png beside it "
                   "(default benchmarks/results/bench-DATE.json)")
    r.add_argument("--resume", action="store_true", help="keep the cells already in --out, run the rest")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell (the child process)


def _settings(args) -> dict:
    preset = PRESETS["quick" if args.quick else "full"]
    s = {k: (getattr(args, k) if getattr(args, k, None) is not None else v) for k, v in preset.items()}
    s["resolutions"] = [r if isinstance(r, tuple) else _resolution(r) for r in s["resolutions"]]
    s["anchor_resolution"] = (s["anchor_resolution"] if isinstance(s["anchor_resolution"], tuple)
                              else _resolution(s["anchor_resolution"]))
    s.update(preset="quick" if args.quick else "full", prompt=args.prompt, seed=args.seed,
             guidance=args.guidance, text_tokens=args.text_tokens, interleave=getattr(args, "interleave", 0) or 0,
             compile=bool(getattr(args, "compile", False)), loras=getattr(args, "loras", 0) or 0,
             lora_rank=getattr(args, "lora_rank", 64), lora_fused=bool(getattr(args, "lora_fused", False)),
             spread=bool(getattr(args, "spread", False)), interleave_only=bool(getattr(args, "interleave_only", False)),
             against=list(getattr(args, "against", None) or []))
    if s["interleave"] and s["interleave"] < 3:
        raise _error(f"--interleave {s['interleave']}: give at least 3 rounds (a spread needs them), or 0 for none")
    if s["e2e_steps"] is not None and s["e2e_steps"] < 0:
        raise _error(f"--e2e-steps {s['e2e_steps']} must be 0 (no end-to-end image) or more")
    return s


def _models(args) -> dict[str, str]:
    models = {}
    for item in args.models:
        scheme, sep, path = item.partition("=")
        if not sep or scheme not in SCHEMES:
            raise _error(f"--models {item!r}: give SCHEME=DIR with SCHEME one of {', '.join(SCHEMES)}")
        models[scheme] = path
    return models


def _error(msg: str):
    from ..errors import KreaLiteError

    return KreaLiteError(msg)


# ---------------------------------------------------------------------------------------------
# the matrix


def _rid(w: int, h: int, b: int) -> str:
    return f"{w}x{h} b{b}"


def _budget_name(budget: float | None) -> str:
    return "none" if budget is None else f"{budget:g}GiB"


def plan_cells(s: dict, schemes: list[str], have_source: bool, have: dict[str, bool]) -> list[dict]:
    """Every cell of the run, most telling first so a --time-budget cut drops the least.

    Order: every scheme at every budget at the first resolution, the anchors (at each anchor budget),
    the bf16 reference, then the other resolutions and batches.
    `have` says which anchor inputs exist ({"bf16": ..., "nf4": ...}).
    """
    common = {k: s[k] for k in ("steps", "warmup", "e2e_steps", "prompt", "seed", "guidance", "text_tokens")}
    shapes = [(w, h, b) for (w, h) in s["resolutions"] for b in s["batches"]]

    def krea(scheme, w, h, b):
        return [dict(common, id=f"krea {scheme} {_budget_name(bg)} {_rid(w, h, b)}", kind="krea", name=scheme,
                     budget_gib=bg, width=w, height=h, batch=b, image_tokens=(w // 16) * (h // 16))
                for bg in s["budgets"]]

    def ref(w, h, b):
        return [dict(common, id=f"ref bf16 {_rid(w, h, b)}", kind="ref", name="bf16", budget_gib=None,
                     width=w, height=h, batch=b, image_tokens=(w // 16) * (h // 16))] if have_source else []

    first, rest = shapes[0], shapes[1:]
    aw, ah = s["anchor_resolution"]
    # bf16_resident is the card that fits everything: uncapped, once. The others run at each anchor budget.
    anchors = [dict(common, id=f"anchor {a} {'' if bg is None else _budget_name(bg) + ' '}{_rid(aw, ah, 1)}",
                    kind="anchor", name=a, budget_gib=bg, width=aw, height=ah, batch=1,
                    image_tokens=(aw // 16) * (ah // 16))
               for a in s["anchors"] if have.get(a.split("_")[0])
               for bg in ([None] if a == "bf16_resident" else s["anchor_budgets"])]
    capped = [b for b in s["budgets"] if b is not None]
    extra = (" compile" if s.get("compile") else "") + (" spread" if s.get("spread") else "") + (f" lora{s['loras']}r{s['lora_rank']}" if s.get("loras") else "")

    def against(sc):
        return [a for a in s.get("against", []) if a != sc]

    ratios = [dict(common, id=f"ratio {sc}{extra}{''.join(' vs ' + a for a in against(sc))} {_rid(*first)} "
                              f"x{s['interleave']}", kind="ratio", name=sc, against_schemes=against(sc),
                   compile=s.get("compile", False), loras=s.get("loras", 0), lora_rank=s.get("lora_rank", 64),
                   lora_fused=s.get("lora_fused", False), spread=s.get("spread", False),
                   budget_gib=None, budgets=capped, rounds=s["interleave"], width=first[0], height=first[1],
                   batch=first[2], image_tokens=(first[0] // 16) * (first[1] // 16))
              for sc in schemes] if s.get("interleave") and capped else []
    if s.get("interleave_only"):
        return ratios
    cells = ratios + [c for sc in schemes for c in krea(sc, *first)] + anchors + ref(*first)
    for shape in rest:
        cells += [c for sc in schemes for c in krea(sc, *shape)] + ref(*shape)
    return cells
