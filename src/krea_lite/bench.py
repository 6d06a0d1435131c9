"""krea-lite bench: memory, speed and fidelity of every scheme and budget, beside today's tools.

The parent process never touches the GPU: it plans a matrix of cells (scheme x VRAM budget x
resolution x batch, plus the diffusers anchors of /shared/ANCHORS.md and a bf16 reference for
fidelity), runs each cell in a child `python -m krea_lite.bench --cell JSON` so that a segfault,
CUDA illegal access or OOM is recorded as a crash while the rest go on, and writes the JSON and
a markdown table after every cell, the plots at the end.

One step = one transformer forward on the ANCHORS.md inputs (hidden_states (b, tokens, 64),
encoder_hidden_states (b, 512, 4096), pooled (b, 768), timestep 0.5, guidance 3.5, zero ids),
synchronized, median of N after warm-up; for a streamed budget it includes the streaming.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

GiB = 2**30
FORMAT_VERSION = 1
SCHEMES = ("bf16", "nf4", "int8", "qint8", "qfloat8", "qint4")
ANCHORS = ("bf16_resident", "nf4_model_cpu_offload", "nf4_group_block_stream", "nf4_group_leaf_stream",
           "bf16_group_leaf_stream")
SYNTHETIC_LABEL = "synthetic (random weights)"
REAL_LABEL = "real weights"
ABORT_ENV = "KREA_LITE_BENCH_ABORT"  # tests: a child whose cell id contains this value calls os.abort()
COMMIT_ENV = "KREA_LITE_COMMIT"  # the commit, where the benchmark runs from a copy without .git

# The one place for matrix defaults; a flag given on the command line wins over its preset.
PRESETS = {
    "full": dict(schemes=list(SCHEMES), budgets=[None, 16, 12, 8, 6, 4],
                 resolutions=["1024x1024", "512x512", "768x768", "1152x896"], batches=[1, 2],
                 steps=5, warmup=1, e2e_steps=28, anchors=list(ANCHORS), anchor_resolution="1024x1024",
                 anchor_budgets=[None, 8, 4], cell_timeout=900, time_budget=0),
    # One 10-minute H100 command with `--synthetic full` (~2.5 min to write and quantize it): nf4 at
    # four budgets x two resolutions (~20-40 s a cell, mostly import + load), bf16_resident and the four
    # other anchors at 8 GiB, and the bf16 reference at 1024². The 540 s budget leaves ~45 s for
    # installing wheels; what no longer fits (the 512² cells first) is recorded as skipped.
    "quick": dict(schemes=["nf4"], budgets=[None, 8, 6, 4], resolutions=["1024x1024", "512x512"], batches=[1],
                  steps=3, warmup=1, e2e_steps=4, anchors=list(ANCHORS), anchor_resolution="1024x1024",
                  anchor_budgets=[8], cell_timeout=120, time_budget=540),
}
END_RESERVE_S = 25  # kept free at the end of --time-budget for the plots and the final table
MIN_CELL_S = 30  # a cell is not started with less time left than this


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
    m.add_argument("--quick", action="store_true", help="the preset that fits one 10-minute H100 run")
    m.add_argument("--schemes", nargs="+", choices=SCHEMES)
    m.add_argument("--budgets", nargs="+", type=_budget, metavar="GIB|none")
    m.add_argument("--resolutions", nargs="+", type=_resolution, metavar="WxH")
    m.add_argument("--batches", nargs="+", type=int)
    m.add_argument("--steps", type=int, help="timed transformer steps per cell (median reported)")
    m.add_argument("--warmup", type=int, help="untimed steps first")
    m.add_argument("--e2e-steps", type=int, help="denoising steps of the end-to-end image")
    m.add_argument("--anchors", nargs="*", choices=ANCHORS, help="diffusers anchors to re-take (none: no flag values)")
    m.add_argument("--anchor-resolution", type=_resolution, metavar="WxH")
    m.add_argument("--anchor-budgets", nargs="+", type=_budget, metavar="GIB|none",
                   help="caps for the anchors (bf16_resident always runs uncapped, once)")
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
             guidance=args.guidance, text_tokens=args.text_tokens)
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
    from .errors import KreaLiteError

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
    cells = [c for sc in schemes for c in krea(sc, *first)] + anchors + ref(*first)
    for shape in rest:
        cells += [c for sc in schemes for c in krea(sc, *shape)] + ref(*shape)
    return cells


# ---------------------------------------------------------------------------------------------
# the parent: run cells in children, record, report


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def _folder_gib(path: Path) -> float | None:
    if not path.is_dir():
        return None
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / GiB, 3)


def _git_commit() -> str:
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("krea-lite", "torch", "diffusers", "transformers", "bitsandbytes", "optimum-quanto", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _is_synthetic(manifest: dict) -> bool:
    source = manifest.get("source")
    return isinstance(source, dict) and bool(source.get("synthetic"))  # source.describe() reads the marker


def _log_tail(log: Path, n: int = 15) -> list[str]:
    """The last lines of a child's log, progress bars left out (kept in the JSON of failed cells)."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines()]
    except OSError:
        return []
    return [ln[:300] for ln in lines if ln and "it/s]" not in ln and "s/it]" not in ln][-n:]


def _last_error_line(log: Path) -> str:
    """The line of a child's log that says why it died."""
    lines = _log_tail(log, 400)
    fatal = next((i for i, ln in enumerate(lines) if ln.startswith("Fatal Python error")), None)
    if fatal is not None:  # faulthandler: the signal, then each thread's stack, innermost frame first
        cur = next((i for i in range(fatal, len(lines)) if lines[i].startswith("Current thread")), fatal)
        frame = next((ln for ln in lines[cur:] if ln.startswith("File ")), "")
        where = frame.split('"')[1].split("site-packages/")[-1] + frame.split('"')[2] if frame.count('"') >= 2 else ""
        return f"{lines[fatal]} at {where}"[:400] if where else lines[fatal]
    keys = ("Error", "error", "Exception", "Abort", "abort", "Segmentation", "CUDA", "Killed")
    return next((ln for ln in reversed(lines) if any(k in ln for k in keys)), lines[-1] if lines else "")[:400]


def _child_env() -> dict:
    """This environment, with this copy of krea_lite first on the children's path."""
    pkg_root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    # Every cell, anchors included, runs with the allocator setting `krea-lite generate` uses.
    return {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", **os.environ,
            "PYTHONPATH": pkg_root + (os.pathsep + path if path else "")}


class Runner:
    """Runs cells in children under a time budget and records each into the document."""

    def __init__(self, doc: dict, out: Path, scratch: Path, cell_timeout: float, time_budget: float):
        self.doc, self.out, self.scratch = doc, out, scratch
        self.cell_timeout, self.time_budget = cell_timeout, time_budget
        self.started = time.monotonic()
        (scratch / "logs").mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        if not self.time_budget:
            return float("inf")
        return self.time_budget - (time.monotonic() - self.started) - END_RESERVE_S

    def child(self, cell: dict, timeout: float | None = None) -> dict:
        """Run one cell in a child process; returns {status, error, wall_s, metrics, ...}.

        `timeout` defaults to the per-cell timeout; the time budget's remainder caps it.
        """
        key = cell["id"].replace(" ", "_").replace("/", "-")
        left = self.left()
        if left < MIN_CELL_S:
            return {"status": "skipped", "error": f"time budget: {max(left, 0):.0f} s left"}
        cell = dict(cell, scratch=str(self.scratch), key=key, result_path=str(self.scratch / f"{key}.result.json"))
        Path(cell["result_path"]).unlink(missing_ok=True)
        log = self.scratch / "logs" / f"{key}.log"
        timeout = min(self.cell_timeout if timeout is None else timeout, left)
        t0 = time.monotonic()
        with open(log, "w") as f:
            p = subprocess.Popen([sys.executable, "-m", "krea_lite.bench", "--cell", json.dumps(cell)],
                                 stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=_child_env())
            try:
                rc = p.wait(timeout=None if timeout == float("inf") else timeout)
            except subprocess.TimeoutExpired:
                rc = None
            finally:  # on timeout, and when the parent itself is interrupted: never leave a GPU child behind
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)  # the child's own process group, started above
                    p.wait()
        res = {"wall_s": round(time.monotonic() - t0, 1), "log": str(log)}
        try:
            res.update(json.loads(Path(cell["result_path"]).read_text()))
        except (OSError, json.JSONDecodeError):
            res.setdefault("metrics", {})
        if rc is None:
            res.update(status="timeout", error=f"killed after {timeout:.0f} s in phase {res.get('phase')}")
        elif rc == 0 and "skipped" in res:
            res.update(status="skipped", error=res.pop("skipped"))
        elif rc == 0:
            res["status"] = "ok"
        else:
            why = [signal.Signals(-rc).name] if rc < 0 else []
            why += [x for x in [res.get("error") or _last_error_line(log)] if x]
            res.update(status="crash", returncode=rc, error=": ".join(why) or f"exit status {rc}")
        if res["status"] in ("crash", "timeout"):
            res["log_tail"] = _log_tail(log)
        if res.get("error") and "out of memory" in res["error"].lower():
            res["oom"] = True
        return res

    def record(self, cell: dict, res: dict) -> None:
        cells = self.doc["cells"]
        entry = dict(cell, **res)
        idx = next((i for i, c in enumerate(cells) if c["id"] == cell["id"]), None)
        if idx is None:
            cells.append(entry)
        else:
            cells[idx] = entry
        self.doc["updated"] = _now()
        save_reports(self.doc, self.out, plots=False)


def _prepare(runner: Runner, args, s: dict, models: dict[str, str]) -> tuple[str | None, dict[str, str]]:
    """Write the synthetic source and quantize missing schemes, each in a child."""
    doc = runner.doc
    source = args.source
    if args.synthetic:
        target = args.workdir / f"synthetic-{args.synthetic}"
        source = str(target)
        if not (target / "model_index.json").exists():
            _prepare_step(runner, f"synthetic {args.synthetic}", dict(op="synthetic", out=source, size=args.synthetic))
    for scheme in s["schemes"]:
        if scheme in models:
            continue
        folder = args.workdir / scheme if args.workdir else None
        if folder and (folder / "krea_lite.json").exists():
            models[scheme] = str(folder)
        elif folder and source:
            if _prepare_step(runner, f"quantize {scheme}", dict(op="quantize", source=source, out=str(folder),
                                                                scheme=scheme)):
                models[scheme] = str(folder)
        else:
            doc["prepare"][f"find {scheme}"] = {"status": "skipped", "error": "no folder (give --models or --source)"}
    return source, models


def _prepare_step(runner: Runner, name: str, cell: dict) -> bool:
    print(f"[prepare] {name} ...", flush=True)
    res = runner.child(dict(cell, id=f"prepare {name}", kind="prepare"), timeout=float("inf"))  # budget-capped
    res.pop("log", None)
    runner.doc["prepare"][name] = res
    print(f"[prepare] {name}: {res['status']} in {res.get('wall_s', 0)} s {res.get('error') or ''}", flush=True)
    return res["status"] == "ok"


def run(args) -> int:
    """`krea-lite bench`: run the matrix, write JSON + markdown + plots, print a short table."""
    if args.cell:
        return _child_main(json.loads(args.cell))
    # SIGTERM (a job's time limit) ends the run through `finally`, which ends the running child too.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args) -> int:
    s = _settings(args)
    models = _models(args)
    if (args.source or args.synthetic) and not args.workdir:
        raise _error("--source/--synthetic need --workdir (where the quantized folders go)")
    if not models and not (args.source or args.synthetic or args.workdir):
        raise _error("nothing to benchmark: give --models SCHEME=DIR ..., --source SRC --workdir DIR, "
                     "or --synthetic full --workdir DIR")
    out = args.out or Path("benchmarks/results") / f"bench-{datetime.now():%Y%m%d-%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = (args.workdir / "bench-scratch") if args.workdir else out.with_name(out.stem + "-scratch")
    doc = json.loads(out.read_text()) if args.resume and out.exists() else None
    if doc is None:
        doc = {"format_version": FORMAT_VERSION, "tool": "krea-lite bench", "date": _now(), "env": {},
               "settings": {}, "models": {}, "prepare": {}, "cells": []}
    doc["settings"] = {**{k: v for k, v in s.items() if k != "cell_timeout"}, "device": args.device}
    doc["env"].update(_versions(), commit=_git_commit())
    runner = Runner(doc, out, scratch, s["cell_timeout"], s["time_budget"])

    env = runner.child({"id": "env", "kind": "env", "device": args.device})
    doc["env"].update({k: v for k, v in env.get("metrics", {}).items() if k != "host_rss_peak_gib"})
    if env["status"] != "ok":
        doc["env"]["env_error"] = env.get("error")
    device = args.device or ("cuda" if doc["env"].get("cuda") else "cpu")
    source, models = _prepare(runner, args, s, models)
    schemes = [sc for sc in s["schemes"] if sc in models]
    for sc in schemes:
        manifest = _read_manifest(Path(models[sc]))
        doc["models"][sc] = {"path": models[sc], "size_gib": _folder_gib(Path(models[sc])),
                             "transformer_gib": _folder_gib(Path(models[sc]) / "transformer"),
                             "synthetic": _is_synthetic(manifest), "components": {
                                 k: v.get("scheme") for k, v in manifest.get("components", {}).items()}}
    synthetic = bool(args.synthetic) or any(m["synthetic"] for m in doc["models"].values())
    doc.update(synthetic=synthetic, label=SYNTHETIC_LABEL if synthetic else REAL_LABEL, source=source)
    ref_dir = source or models.get("bf16")
    cells = plan_cells(s, schemes, have_source=bool(ref_dir),
                       have={"bf16": bool(ref_dir), "nf4": "nf4" in models})
    done = {c["id"] for c in doc["cells"] if c.get("status") not in (None, "skipped")}
    for i, cell in enumerate(cells, 1):
        if args.resume and cell["id"] in done:
            continue
        cell = dict(cell, device=device, model=models.get(cell["name"]), source=ref_dir, nf4=models.get("nf4"))
        why = _cannot_run(cell, device)
        res = {"status": "skipped", "error": why} if why else runner.child(cell)
        runner.record(cell, res)
        print(f"[{i:>2}/{len(cells)}] {cell['id']}: {_one_line(res)}", flush=True)
    add_fidelity(doc)
    paths = save_reports(doc, out, plots=True)
    print(f"\n{doc['label']} | {doc['env'].get('gpu') or device} | {len(doc['cells'])} cells")
    print(short_table(doc))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _read_manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / "krea_lite.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _cannot_run(cell: dict, device: str) -> str | None:
    """Why a cell is skipped without starting a child, or None."""
    cuda = device.startswith("cuda")
    if cell["budget_gib"] is not None and not cuda:
        return "VRAM budgets need CUDA"
    if cell["kind"] == "anchor" and cell["name"] != "bf16_resident" and not cuda:
        return "needs CUDA (diffusers' bitsandbytes loading and group-offload streams)"
    return None


def _one_line(res: dict) -> str:
    m = res.get("metrics", {})
    bits = [res["status"]]
    if m.get("s_per_step") is not None:
        bits.append(f"{m['s_per_step']:.4f} s/step")
    if m.get("peak_reserved_gib") is not None:
        bits.append(f"{m['peak_reserved_gib']:.2f} GiB reserved")
    if m.get("e2e_s") is not None:
        bits.append(f"e2e {m['e2e_s']:.1f} s")
    if res.get("wall_s") is not None:
        bits.append(f"({res['wall_s']:.0f} s)")
    if res.get("error"):
        bits.append(f"-- {res['error'][:160]}")
    return " ".join(bits)


# ---------------------------------------------------------------------------------------------
# fidelity (numpy + PIL only, in the parent)


def psnr(a, b) -> float | None:
    """PSNR in dB of two uint8 images; None when they are identical."""
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else 10 * np.log10(255.0**2 / mse)


def ssim(a, b) -> float:
    """SSIM (Wang et al. 2004) of two uint8 RGB/gray images on luminance: gaussian window 11, sigma 1.5."""
    import numpy as np
    from numpy.lib.stride_tricks import sliding_window_view

    def luma(x):
        x = x.astype(np.float64)
        return x if x.ndim == 2 else x[..., :3] @ np.array([0.299, 0.587, 0.114])

    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    g /= g.sum()

    def blur(x):  # separable, 'valid' borders
        x = sliding_window_view(x, 11, axis=0) @ g
        return sliding_window_view(x, 11, axis=1) @ g

    x, y = luma(a), luma(b)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def _rel_err(a, b) -> float:
    import numpy as np

    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-30))


def add_fidelity(doc: dict) -> None:
    """Compare each cell's outputs with the bf16 ones of the same shape, prompt and seed.

    Final latent and images: against the `ref` cell (plain diffusers bf16 pipeline). One step's
    output: against the `bf16_resident` anchor (the ANCHORS.md "rel err vs bf16 output").
    """
    import numpy as np
    from PIL import Image

    ok = [c for c in doc["cells"] if c.get("status") == "ok" or c.get("metrics", {}).get("s_per_step")]
    refs = {(c["width"], c["height"], c["batch"]): c["metrics"] for c in ok if c["kind"] == "ref"}
    steps = {(c["width"], c["height"], c["batch"]): c["metrics"] for c in ok
             if c["kind"] == "anchor" and c["name"] == "bf16_resident"}
    for c in doc["cells"]:
        m, shape, fid = c.get("metrics", {}), (c.get("width"), c.get("height"), c.get("batch")), {}
        r, st = refs.get(shape), steps.get(shape)
        if not all(Path(p).exists() for x in (m, r or {}, st or {})
                   for p in [x.get("latent_npy"), x.get("step_npy"), *x.get("images", [])] if p):
            continue  # a resumed run on another machine: keep the fidelity computed where the files were
        try:
            if c["kind"] != "ref" and r and m.get("latent_npy") and r.get("latent_npy"):
                fid["latent_rel_err"] = _rel_err(np.load(m["latent_npy"]), np.load(r["latent_npy"]))
                pairs = [(np.asarray(Image.open(p).convert("RGB")), np.asarray(Image.open(q).convert("RGB")))
                         for p, q in zip(m["images"], r["images"], strict=True)]
                ps = [p for p in (psnr(a, b) for a, b in pairs) if p is not None]
                fid["psnr_db"] = float(np.mean(ps)) if ps else None
                fid["identical_images"] = not ps
                fid["ssim"] = float(np.mean([ssim(a, b) for a, b in pairs]))
            if not (c["kind"] == "anchor" and c["name"] == "bf16_resident") and st and m.get("step_npy") \
                    and st.get("step_npy"):
                fid["step_rel_err"] = _rel_err(np.load(m["step_npy"]), np.load(st["step_npy"]))
            own = _resident(doc, c)  # streaming must not change the result: same bits as the uncapped cell
            if own is not None and own is not c and m.get("step_npy") and own["metrics"].get("step_npy"):
                fid["step_equals_resident"] = bool(np.array_equal(np.load(m["step_npy"]),
                                                                  np.load(own["metrics"]["step_npy"])))
        except (OSError, ValueError) as e:
            fid["error"] = f"{type(e).__name__}: {e}"
        if fid:
            c["fidelity"] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in fid.items()}


# ---------------------------------------------------------------------------------------------
# reports: markdown table, dominance sentences, plots


def _f(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _label(c: dict) -> str:
    return {"krea": f"krea-lite {c['name']}", "anchor": f"diffusers {c['name']}", "ref": "diffusers bf16 (ref)"}[
        c["kind"]]


def _bf16_step(doc: dict, c: dict) -> float | None:
    for a in doc["cells"]:
        if (a["kind"], a["name"], a["width"], a["height"], a["batch"]) == (
                "anchor", "bf16_resident", c["width"], c["height"], c["batch"]):
            return a.get("metrics", {}).get("s_per_step")
    return None


def _resident(doc: dict, c: dict) -> dict | None:
    """The uncapped krea cell of the same scheme and shape as krea cell `c` (its resident baseline)."""
    if c.get("kind") != "krea":
        return None
    return next((a for a in doc["cells"] if a["kind"] == "krea" and a["budget_gib"] is None
                 and (a["name"], a["width"], a["height"], a["batch"]) == (c["name"], c["width"], c["height"],
                                                                           c["batch"])), None)


def _sorted_cells(doc: dict) -> list[dict]:
    order = {"krea": 0, "anchor": 1, "ref": 2}
    return sorted(doc["cells"], key=lambda c: (
        c["width"] * c["height"] * c["batch"], c["width"], c["batch"], order[c["kind"]],
        SCHEMES.index(c["name"]) if c["kind"] == "krea" else 0, -(c["budget_gib"] or 1e9),
        ANCHORS.index(c["name"]) if c["kind"] == "anchor" else 0))


def markdown_table(doc: dict) -> str:
    head = ("| config | budget | size (b) | s/step | vs resident | vs bf16 | e2e s (steps) | e2e vs resident | "
            "peak reserved GiB | peak alloc GiB | host RSS GiB gen / load | load s | disk GiB | latent rel err | "
            "step rel err | PSNR dB | SSIM | status |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in _sorted_cells(doc):
        m, fid = c.get("metrics", {}), c.get("fidelity", {})
        base, sps = _bf16_step(doc, c), m.get("s_per_step")
        ratio = f"{sps / base:.2f}x" if sps and base else ""
        own = (_resident(doc, c) or {}).get("metrics", {})
        vs_own = f"{sps / own['s_per_step']:.2f}x" if sps and own.get("s_per_step") else ""
        if vs_own and fid.get("step_equals_resident") is not None:
            vs_own += "" if fid["step_equals_resident"] else " (output differs!)"
        e2e_own = f"{m['e2e_s'] / own['e2e_s']:.2f}x" if m.get("e2e_s") and own.get("e2e_s") else ""
        rss = " / ".join(_f(m.get(k), ".1f") for k in ("host_rss_gen_peak_gib", "host_rss_load_peak_gib")
                         if m.get(k) is not None) or _f(m.get("host_rss_peak_gib"), ".1f")
        disk = doc["models"].get(c["name"], {}).get("size_gib") if c["kind"] == "krea" else None
        status = c["status"] + (f": {c['error'][:90]}" if c.get("error") else "")
        rows.append(" | ".join([
            f"| {_label(c)}", _budget_name(c["budget_gib"]), f"{c['width']}x{c['height']} ({c['batch']})",
            _f(sps, ".4f"), vs_own, ratio,
            f"{m['e2e_s']:.2f} ({c['e2e_steps']})" if m.get("e2e_s") is not None else "", e2e_own,
            _f(m.get("peak_reserved_gib"), ".2f"), _f(m.get("peak_alloc_gib"), ".2f"),
            rss, _f(m.get("load_s"), ".1f"), _f(disk, ".2f"),
            _f(fid.get("latent_rel_err"), ".4f"), _f(fid.get("step_rel_err"), ".4f"),
            "identical" if fid.get("identical_images") else _f(fid.get("psnr_db"), ".2f"),
            _f(fid.get("ssim"), ".4f"), status.replace("|", "/") + " |"]))
    return "\n".join(rows)


def dominance(doc: dict) -> list[str]:
    """One sentence per budget and shape on which term dominates a streamed step, from measured numbers only.

    A streamed step costs at least max(compute, copy): compute = the resident s/step of the same
    scheme and shape; copy = bytes streamed per step / the measured pinned host->device bandwidth.
    Time above that maximum is overlap the engine did not get; the copy waits are what the GPU itself
    spent idle waiting for weights (CUDA events around each wait).
    """
    bw = doc["env"].get("h2d_gbps")
    s = doc["settings"]
    lines = []
    for (w, h), b in [(r, b) for r in s["resolutions"] for b in s["batches"]]:
        by = {(c["name"], c["budget_gib"]): c for c in doc["cells"]
              if c["kind"] == "krea" and (c["width"], c["height"], c["batch"]) == (w, h, b)}
        for budget in [x for x in s["budgets"] if x is not None]:
            parts = []
            for scheme in [sc for sc in SCHEMES if (sc, budget) in by]:
                c, m = by[(scheme, budget)], by[(scheme, budget)].get("metrics", {})
                t, gib = m.get("s_per_step"), m.get("copied_gib_per_step", m.get("streamed_gib"))
                t0 = by.get((scheme, None), {}).get("metrics", {}).get("s_per_step")
                if t is None or t0 is None:
                    parts.append(f"{scheme}: {c['status']}" + (f" ({c['error'][:80]})" if c.get("error") else ""))
                    continue
                text = f"{scheme} {t:.3f} s/step = {t / t0:.2f}x resident"
                if gib and bw:
                    copy = gib * GiB / (bw * 1e9)
                    term = "weight traffic" if copy > t0 else "compute"
                    text += (f"; {term} dominates: compute {t0:.3f} s vs copy {gib:.2f} GiB / {bw:.1f} GB/s = "
                             f"{copy:.3f} s")
                    wait = m.get("copy_wait_ms_per_step")
                    if wait is not None:
                        text += f"; the GPU waited {wait:.1f} ms/step for copies"
                    extra = t - max(t0, copy)
                    if extra > 0.15 * t:
                        text += f", and {extra:.3f} s more than either: " + (
                            "not copy waits, so run-to-run variance of the step itself" if wait is not None
                            and wait / 1e3 < 0.25 * extra else "copy and compute overlap poorly")
                elif gib == 0:
                    text += "; nothing streamed (compute only)"
                parts.append(text)
            if parts:
                lines.append(f"- **{budget:g} GiB** ({w}x{h}, batch {b}): " + "; ".join(parts) + ".")
    return lines


def _header(doc: dict) -> str:
    e = doc["env"]
    lib = ", ".join(f"{k} {e.get(k)}" for k in ("torch", "diffusers", "transformers", "bitsandbytes",
                                                "optimum-quanto") if e.get(k))
    card = e.get("gpu") or "CPU"
    drv = f", driver {e['driver']}, CUDA {e.get('cuda_version')}" if e.get("driver") else ""
    bw = f"; pinned host->device copy {e['h2d_gbps']:.1f} GB/s" if e.get("h2d_gbps") else ""
    return (f"**{doc['label']}** — {card}{drv}{bw}. {lib}; krea-lite {e.get('commit', 'unknown')[:12]}; "
            f"{doc['date'][:10]}; preset {doc['settings'].get('preset')}.")


def render_section(doc: dict, plot_prefix: str) -> str:
    """The markdown block shared by the run's .md file and the README (deterministic for a doc)."""
    plots = "\n".join(f"![{title}]({plot_prefix}-{name}.png)" for name, title in PLOTS.items())
    dom = dominance(doc)
    setup = "; ".join(f"{k} {r['status']}" + (f" in {r['wall_s']:.0f} s" if r.get("wall_s") else "")
                      + (f" ({r['error'][:120]})" if r.get("error") else "")
                      for k, r in sorted(doc.get("prepare", {}).items()))
    return "\n\n".join(x for x in [
        _header(doc), f"Setup: {setup}." if setup else "", markdown_table(doc),
        "What dominates a streamed step:\n" + "\n".join(dom) if dom else "", plots] if x) + "\n"


def short_table(doc: dict) -> str:
    lines = [f"{'cell':<46}{'status':<9}{'s/step':>8}{'resGiB':>8}{'e2e s':>7}{'relerr':>8}"]
    for c in _sorted_cells(doc):
        m, fid = c.get("metrics", {}), c.get("fidelity", {})
        err = fid.get("latent_rel_err", fid.get("step_rel_err"))
        lines.append(f"{c['id'][:45]:<46}{c['status']:<9}{_f(m.get('s_per_step'), '8.4f'):>8}"
                     f"{_f(m.get('peak_reserved_gib'), '8.2f'):>8}{_f(m.get('e2e_s'), '7.1f'):>7}"
                     f"{_f(err, '8.4f'):>8}")
        if c.get("error") and c["status"] != "ok":
            lines.append(f"    {c['error'][:110]}")
    return "\n".join(lines)


PLOTS = {"vram": "peak reserved VRAM vs s/step", "budget": "s/step vs VRAM budget",
         "tokens": "s/step and VRAM vs tokens"}


def save_reports(doc: dict, out: Path, plots: bool) -> list[Path]:
    """Write the JSON and the markdown (and, with plots=True, the PNGs) beside `out`."""
    _write_json(out, doc)
    md = out.with_suffix(".md")
    md.write_text(f"# krea-lite bench — {doc.get('label', '')}\n\n" + render_section(doc, out.stem))
    paths = [out, md]
    if plots and doc["cells"]:
        paths += make_plots(doc, out)
    return paths


def make_plots(doc: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = doc["settings"]
    title = f"{doc['label']} — {doc['env'].get('gpu') or 'CPU'}"
    measured = [c for c in doc["cells"] if c.get("metrics", {}).get("s_per_step") is not None]
    w0, h0 = s["resolutions"][0]
    paths = []

    def save(fig, name):
        fig.suptitle(f"{PLOTS[name]}\n{title}", fontsize=10)
        fig.tight_layout()
        path = out.with_name(f"{out.stem}-{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    # 1. VRAM vs speed at the first shape: every scheme's budgets, the anchors as crosses.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    at = [c for c in measured if (c["width"], c["height"], c["batch"]) == (w0, h0, s["batches"][0])]
    for scheme in SCHEMES:
        pts = [c for c in at if c["kind"] == "krea" and c["name"] == scheme and "peak_reserved_gib" in c["metrics"]]
        if pts:
            ax.plot([c["metrics"]["peak_reserved_gib"] for c in pts], [c["metrics"]["s_per_step"] for c in pts],
                    "o-", label=f"krea-lite {scheme}")
            for c in pts:
                ax.annotate(_budget_name(c["budget_gib"]), (c["metrics"]["peak_reserved_gib"],
                            c["metrics"]["s_per_step"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for c in at:
        if c["kind"] == "anchor" and c["metrics"].get("peak_reserved_gib") is not None:
            ax.plot(c["metrics"]["peak_reserved_gib"], c["metrics"]["s_per_step"], "x", ms=9,
                    label=f"diffusers {c['name']}")
    ax.set(xlabel="peak reserved VRAM (GiB)", ylabel="s / step", title=f"{w0}x{h0}, batch {s['batches'][0]}")
    _finish_axes(ax)
    save(fig, "vram")

    # 2. s/step vs budget, one line per scheme and resolution (batch 1).
    fig, ax = plt.subplots(figsize=(7, 4.5))
    budgets = s["budgets"]
    xs = {bg: i for i, bg in enumerate(budgets)}
    for scheme in SCHEMES:
        for w, h in s["resolutions"]:
            pts = [c for c in measured if c["kind"] == "krea" and c["name"] == scheme
                   and (c["width"], c["height"], c["batch"]) == (w, h, s["batches"][0]) and c["budget_gib"] in xs]
            if pts:
                ax.plot([xs[c["budget_gib"]] for c in pts], [c["metrics"]["s_per_step"] for c in pts], "o-",
                        label=f"{scheme} {w}x{h}")
    for c in measured:
        if c["kind"] == "anchor" and c["name"] == "bf16_resident":
            ax.axhline(c["metrics"]["s_per_step"], ls="--", c="gray", lw=1)
            ax.text(0, c["metrics"]["s_per_step"], f" diffusers bf16 resident {c['width']}x{c['height']}",
                    fontsize=7, va="bottom")
    ax.set_xticks(range(len(budgets)), [_budget_name(b) for b in budgets])
    ax.set(xlabel="VRAM budget (per-process cap)", ylabel="s / step")
    _finish_axes(ax)
    save(fig, "budget")

    # 3. Scale: s/step and peak VRAM vs image tokens x batch, unconstrained and at the smallest budget.
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
    capped = [b for b in budgets if b is not None]
    for scheme in SCHEMES:
        for bg in [None] + ([min(capped)] if capped else []):
            for b in s["batches"]:  # batch 1 solid, batch 2 dashed
                pts = sorted((c for c in measured if c["kind"] == "krea" and c["name"] == scheme
                              and c["budget_gib"] == bg and c["batch"] == b), key=_tokens)
                if pts:
                    style, lbl = "o-" if b == 1 else "s--", f"{scheme} {_budget_name(bg)} batch {b}"
                    a1.plot([_tokens(c) for c in pts], [c["metrics"]["s_per_step"] for c in pts], style, label=lbl)
                    a2.plot([_tokens(c) for c in pts], [c["metrics"].get("peak_reserved_gib") for c in pts], style,
                            label=lbl)
    a1.set(xlabel="image tokens x batch", ylabel="s / step")
    a2.set(xlabel="image tokens x batch", ylabel="peak reserved VRAM (GiB)")
    for a in (a1, a2):
        _finish_axes(a)
    save(fig, "tokens")
    return paths


def _finish_axes(ax) -> None:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _tokens(c: dict) -> int:
    return (c["width"] // 16) * (c["height"] // 16) * c["batch"]


# ---------------------------------------------------------------------------------------------
# the child: one cell, one process (torch and diffusers are imported here only)


class _RssPoller:
    """Peak resident set size of this process, polled every 20 ms in a daemon thread.

    `mark()` ends the load phase: the peak so far is the load peak, and polling starts over for the
    generation phase (steps and the end-to-end image), where RssAnon (memory not backed by a file, i.e.
    not page cache that safetensors maps) is tracked too.
    """

    def __init__(self):
        import psutil

        self.proc, self.peak, self.anon, self.load_peak = psutil.Process(), 0, 0, None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.02)

    def _sample(self):
        self.peak = max(self.peak, self.proc.memory_info().rss)
        if self.load_peak is not None:
            self.anon = max(self.anon, _rss_anon())

    def mark(self) -> None:
        self._sample()
        self.load_peak, self.peak, self.anon = self.peak, 0, 0

    def stop(self) -> dict:
        self._stop.set()
        self.thread.join()
        self._sample()
        if self.load_peak is None:
            return {"host_rss_peak_gib": round(self.peak / GiB, 3)}
        return {"host_rss_load_peak_gib": round(self.load_peak / GiB, 3),
                "host_rss_gen_peak_gib": round(self.peak / GiB, 3),
                "host_rss_anon_gen_peak_gib": round(self.anon / GiB, 3),
                "host_rss_peak_gib": round(max(self.load_peak, self.peak) / GiB, 3)}


def _rss_anon() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


_RSS: _RssPoller | None = None  # the child's poller, for `_loaded` to mark


def _loaded() -> None:
    if _RSS is not None:
        _RSS.mark()


def _child_main(cell: dict) -> int:
    result: dict = {"metrics": {}, "phase": "start"}

    def save():
        path = Path(cell["result_path"])
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, path)

    faulthandler.enable()  # a segfault prints its Python stack into the cell's log
    if os.environ.get(ABORT_ENV) and os.environ[ABORT_ENV] in cell["id"]:
        os.abort()
    global _RSS
    rss = _RSS = _RssPoller()
    try:
        CELL_KINDS[cell["kind"]](cell, result, save)
        return 0
    except _Skip as e:
        result["skipped"] = str(e)
        return 0
    except BaseException as e:
        msg = str(e).strip().splitlines()
        result["error"] = f"{type(e).__name__}: {msg[0] if msg else ''}"[:400]
        raise
    finally:
        result["metrics"].update(rss.stop())
        _finish(result["metrics"])
        save()


class _Skip(Exception):
    """Raised in a child for a cell that does not apply (recorded as skipped, not as a crash)."""


def _device(cell):
    import torch

    dev = cell.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise _Skip("needs CUDA")
    return torch.device(dev)


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peaks(dev, m: dict, prefix: str) -> None:
    import torch

    if dev.type == "cuda":
        m[f"{prefix}peak_alloc_gib"] = round(torch.cuda.max_memory_allocated(dev) / GiB, 3)
        m[f"{prefix}peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(dev) / GiB, 3)


def _reset_peaks(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def _step_inputs(transformer, cell: dict, dev) -> dict:
    """ANCHORS.md inputs: seeded random latents and text states, timestep 0.5, guidance 3.5, zero ids."""
    import torch

    cfg = transformer.config
    b, tokens, text = cell["batch"], (cell["width"] // 16) * (cell["height"] // 16), cell["text_tokens"]
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev, torch.bfloat16)

    kw = dict(hidden_states=rnd(b, tokens, cfg.in_channels),
              encoder_hidden_states=rnd(b, text, cfg.joint_attention_dim),
              pooled_projections=rnd(b, cfg.pooled_projection_dim),
              timestep=torch.full((b,), 0.5, device=dev, dtype=torch.bfloat16),
              img_ids=torch.zeros(tokens, 3, device=dev, dtype=torch.bfloat16),
              txt_ids=torch.zeros(text, 3, device=dev, dtype=torch.bfloat16), return_dict=False)
    if cfg.guidance_embeds:
        kw["guidance"] = torch.full((b,), 3.5, device=dev, dtype=torch.float32)  # as FluxPipeline passes it
    return kw


def _time_steps(transformer, cell: dict, dev, result: dict, save, placement=None) -> None:
    """Median of `steps` synchronized forwards after `warmup`; peaks over warm-up and timed steps.

    With the streaming engine's `placement`, also the bytes it actually copied per timed step.
    """
    import numpy as np
    import torch

    result["phase"] = "step"
    save()
    m = result["metrics"]
    kw = _step_inputs(transformer, cell, dev)
    streamers = list(getattr(placement, "streamers", {}).values())
    for st in streamers:  # CUDA events around each wait for a copy: how long the GPU sat idle on PCIe
        st.profile = True
    _reset_peaks(dev)
    times = []
    with torch.inference_mode():
        for i in range(cell["warmup"] + cell["steps"]):
            _sync(dev)
            t0 = time.perf_counter()
            out = transformer(**kw)[0]
            _sync(dev)
            if i >= cell["warmup"]:
                times.append(time.perf_counter() - t0)
            if i == cell["warmup"] - 1 and placement is not None:
                placement.stats(reset=True)
            if i == cell["warmup"]:
                path = Path(cell["scratch"]) / f"{cell['key']}.step.npy"
                np.save(path, out.float().cpu().numpy())
                m["step_npy"] = str(path)
    if placement is not None:
        st = {k: v for k, v in placement.stats().items() if k != "on_demand"}
        m["copied_gib_per_step"] = round(sum(v["bytes_copied"] for v in st.values()) / len(times) / GiB, 4)
        m["stream_misses"] = sum(v["misses"] for v in st.values())
        m["copy_wait_ms_per_step"] = round(sum(v.get("wait_ms", 0.0) for v in st.values()) / len(times), 3)
    for st in streamers:
        st.profile = False
    m["step_times_s"] = [round(t, 5) for t in times]
    m["s_per_step"] = round(float(np.median(times)), 5)
    _peaks(dev, m, "step_")
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        m["device_used_gib"] = round((total - free) / GiB, 3)  # includes the CUDA context, outside the cap
    save()


def _e2e(pipe, cell: dict, dev, result: dict, save) -> None:
    """One image (batch) end to end: text encode, all steps, VAE decode to PIL; the final latent kept."""
    import numpy as np
    import torch

    result["phase"] = "e2e"
    save()
    m = result["metrics"]
    final = {}

    def keep(_pipe, i, _t, kw):  # per-phase peaks: text encoding + step 1, the other steps, the VAE decode
        final["latents"] = kw["latents"]
        if i in (0, cell["e2e_steps"] - 1):
            _peaks(dev, m, f"e2e_{'encode' if i == 0 else 'denoise'}_")
            _reset_peaks(dev)
        return {}

    pipe.set_progress_bar_config(disable=True)
    _reset_peaks(dev)
    _sync(dev)
    t0 = time.perf_counter()
    with torch.inference_mode():
        images = pipe(prompt=cell["prompt"], num_images_per_prompt=cell["batch"],
                      num_inference_steps=cell["e2e_steps"], guidance_scale=cell["guidance"],
                      width=cell["width"], height=cell["height"],
                      generator=torch.Generator().manual_seed(cell["seed"]), output_type="pil",
                      callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"]).images
    _sync(dev)
    m["e2e_s"] = round(time.perf_counter() - t0, 3)
    _peaks(dev, m, "e2e_decode_")
    for kind in ("alloc", "reserved"):
        phases = [m[k] for p in ("encode", "denoise", "decode") if (k := f"e2e_{p}_peak_{kind}_gib") in m]
        if phases:
            m[f"e2e_peak_{kind}_gib"] = max(phases)
    base = Path(cell["scratch"]) / cell["key"]
    np.save(f"{base}.latent.npy", final["latents"].float().cpu().numpy())
    m["latent_npy"] = f"{base}.latent.npy"
    m["images"] = []
    for i, im in enumerate(images):
        im.save(f"{base}.e2e{i}.png")
        m["images"].append(f"{base}.e2e{i}.png")
    save()


def _finish(m: dict) -> None:
    """Overall peaks (load, steps and e2e) as the headline numbers."""
    for kind in ("alloc", "reserved"):
        vals = [m.get(f"{p}peak_{kind}_gib") for p in ("load_", "step_", "e2e_")]
        vals = [v for v in vals if v is not None]
        if vals:
            m[f"peak_{kind}_gib"] = max(vals)


def _cap(dev, budget_gib: float | None, m: dict) -> None:
    """Cap this process's caching allocator at the budget, before anything allocates on the GPU."""
    import torch

    if budget_gib is None or dev.type != "cuda":
        return
    total = torch.cuda.get_device_properties(dev).total_memory
    if budget_gib * GiB > total:
        raise _Skip(f"budget {budget_gib:g} GiB exceeds the card's {total / GiB:.1f} GiB")
    # set_per_process_memory_fraction wants an index: torch.device("cuda") has none.
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(budget_gib * GiB / total, index)
    m["cap_fraction"] = round(budget_gib * GiB / total, 5)


def _cell_env(cell: dict, result: dict, save) -> None:
    """Card, driver, CUDA, and the pinned host->device copy bandwidth (ANCHORS.md's first row)."""
    import torch

    m = result["metrics"]
    m.update(torch=torch.__version__, cuda=torch.cuda.is_available(), cuda_version=torch.version.cuda,
             cpu_count=os.cpu_count())
    try:
        import psutil

        m["host_ram_gib"] = round(psutil.virtual_memory().total / GiB, 1)
    except ImportError:
        pass
    if not torch.cuda.is_available():
        return
    props = torch.cuda.get_device_properties(0)
    m.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GiB, 2),
             capability=f"{props.major}.{props.minor}")
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        m["driver"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        m["driver"] = None
    n = 512 << 20  # 512 MiB, five copies after one warm-up
    src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    m["h2d_gbps"] = round(5 * n / (time.perf_counter() - t0) / 1e9, 2)


def _cell_prepare(cell: dict, result: dict, save) -> None:
    if cell["op"] == "synthetic":
        from .synthetic import write_synthetic

        # no BFL single file: the bench reads the diffusers folders, and it would cost 24 GB of disk
        write_synthetic(Path(cell["out"]), size=cell["size"], seed=0, single_file=False)
        return
    from .errors import KreaLiteError
    from .quantize import QuantizeConfig, quantize_pipeline

    try:  # the same scheme for T5 where it has one, else the default
        config = QuantizeConfig(transformer=cell["scheme"], text_encoder=cell["scheme"])
    except (KreaLiteError, ValueError):
        config = QuantizeConfig(transformer=cell["scheme"])
    quantize_pipeline(cell["source"], Path(cell["out"]), config, progress=False)


def _cell_krea(cell: dict, result: dict, save) -> None:
    """A krea-lite folder through load_pipeline at a budget: load, steps, one image."""
    import diffusers  # noqa: F401  imported before the clock starts, as in the anchor cells
    import torch

    from .pipeline import load_pipeline

    m = result["metrics"]
    dev = _device(cell)
    _cap(dev, cell["budget_gib"], m)
    result["phase"] = "load"
    save()  # a crash from here on is reported in this phase
    _reset_peaks(dev)
    t0 = time.perf_counter()
    pipe = load_pipeline(cell["model"], device=str(dev), vram_gb=cell["budget_gib"], width=cell["width"],
                         height=cell["height"], batch=cell["batch"])
    _sync(dev)
    m["load_s"] = round(time.perf_counter() - t0, 2)
    _loaded()
    _peaks(dev, m, "load_")
    if dev.type == "cuda":
        m["loaded_alloc_gib"] = round(torch.cuda.memory_allocated(dev) / GiB, 3)  # weights (+ slots) at rest
    m["load_seconds"] = pipe.krea_lite.seconds
    plan = getattr(pipe.krea_lite, "plan", None)
    m["plan"] = _plan_summary(plan) if plan is not None else None
    m["streamed_gib"] = (m["plan"] or {}).get("streamed_gib", 0.0)
    save()
    _time_steps(pipe.transformer, cell, dev, result, save, getattr(pipe.krea_lite, "placement", None))
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    _e2e(pipe, cell, dev, result, save)


def _plan_summary(plan) -> dict:
    """The plan's scalars, predicted peaks and streamed bytes per step, to set beside the measured ones."""
    import dataclasses

    raw = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)} if dataclasses.is_dataclass(plan) \
        else dict(vars(plan))
    out = {k: v for k, v in raw.items() if isinstance(v, (int, float, str, bool)) or v is None}
    try:  # plan.Plan: each streamed block is copied once per step
        sizes = plan.sizes
        out.update(n_streamed_double=len(plan.streamed_double), n_streamed_single=len(plan.streamed_single),
                   streamed_gib=round((sum(sizes.transformer_blocks[i] for i in plan.streamed_double)
                                       + sum(sizes.single_transformer_blocks[i] for i in plan.streamed_single))
                                      / GiB, 4),
                   predicted_gib={name: round(n / GiB, 3) for name, n in plan.phase_bytes},
                   predicted_peak_phase=plan.peak_phase)
    except (AttributeError, TypeError, IndexError, ValueError):
        pass
    return out


def _cell_anchor(cell: dict, result: dict, save) -> None:
    """What diffusers gives today, taken the way ANCHORS.md took it (under the cell's cap, if any)."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel

    m, name = result["metrics"], cell["name"]
    dev = _device(cell)
    _cap(dev, cell.get("budget_gib"), m)
    bf16 = torch.bfloat16
    result["phase"] = "load"
    save()  # a crash from here on is reported in this phase
    _reset_peaks(dev)
    t0 = time.perf_counter()
    pipe = None
    if name.startswith("bf16"):
        tr = FluxTransformer2DModel.from_pretrained(cell["source"], subfolder="transformer", torch_dtype=bf16)
    else:  # our bnb folders are in diffusers' format: its BitsAndBytesConfig loads them (onto the GPU)
        tr = FluxTransformer2DModel.from_pretrained(cell["nf4"], subfolder="transformer", torch_dtype=bf16)
    if name == "bf16_resident":
        tr.to(dev)
    elif name.endswith("group_leaf_stream"):
        tr.enable_group_offload(onload_device=dev, offload_device=torch.device("cpu"), offload_type="leaf_level",
                                use_stream=True)
    elif name == "nf4_group_block_stream":
        tr.enable_group_offload(onload_device=dev, offload_device=torch.device("cpu"), offload_type="block_level",
                                num_blocks_per_group=1, use_stream=True)
    elif name == "nf4_model_cpu_offload":
        pipe = FluxPipeline.from_pretrained(cell["nf4"], transformer=tr, torch_dtype=bf16)
        pipe.enable_model_cpu_offload(device=dev)
    _sync(dev)
    m["load_s"] = round(time.perf_counter() - t0, 2)
    _loaded()
    _peaks(dev, m, "load_")
    save()
    _time_steps(tr, cell, dev, result, save)
    if pipe is not None:
        _e2e(pipe, cell, dev, result, save)


def _cell_ref(cell: dict, result: dict, save) -> None:
    """The fidelity reference: the plain diffusers bf16 pipeline of the source, one image."""
    import torch
    from diffusers import FluxPipeline

    m = result["metrics"]
    dev = _device(cell)
    result["phase"] = "load"
    save()  # a crash from here on is reported in this phase
    t0 = time.perf_counter()
    pipe = FluxPipeline.from_pretrained(cell["source"], torch_dtype=torch.bfloat16)
    # FLUX bf16 needs ~34 GB of weights: resident where the card has room, else diffusers' model offload.
    if dev.type == "cuda" and torch.cuda.get_device_properties(dev).total_memory < 48 * GiB:
        pipe.enable_model_cpu_offload(device=dev)
        m["offload"] = "model_cpu_offload"
    else:
        pipe.to(dev)
    m["load_s"] = round(time.perf_counter() - t0, 2)
    _loaded()
    save()
    _e2e(pipe, cell, dev, result, save)


CELL_KINDS = {"env": _cell_env, "prepare": _cell_prepare, "krea": _cell_krea, "anchor": _cell_anchor,
              "ref": _cell_ref}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m krea_lite.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    from .errors import KreaLiteError

    try:
        return run(args)
    except KreaLiteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
