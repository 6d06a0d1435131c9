"""krea-lite bench, the parent: run cells in children, record, report.

The parent never touches the GPU: each cell runs in a child `python -m krea_lite.bench --cell JSON`
(see `cells`), and the document is saved with its markdown table after every cell.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from .cells import _child_main
from .matrix import GiB, _error, _models, _settings, plan_cells
from .report import add_fidelity, save_reports, short_table

FORMAT_VERSION = 1
SYNTHETIC_LABEL = "synthetic (random weights)"
REAL_LABEL = "real weights"
COMMIT_ENV = "KREA_LITE_COMMIT"  # the commit, where the benchmark runs from a copy without .git
END_RESERVE_S = 25  # kept free at the end of --time-budget for the plots and the final table
MIN_CELL_S = 30  # a cell is not started with less time left than this


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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
    pkg_root = str(Path(__file__).resolve().parents[2])  # src/, above krea_lite/bench/
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
    if missing := [a for a in s["against"] if a not in models and a not in s["schemes"]]:
        raise _error(f"--against {missing[0]}: no {missing[0]} folder; give it as --models {missing[0]}=DIR")
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
    from ..source import SYNTHETIC_MARKER

    source_synthetic = bool(source) and (Path(source).expanduser() / SYNTHETIC_MARKER).is_file()
    synthetic = bool(args.synthetic) or source_synthetic or any(m["synthetic"] for m in doc["models"].values())
    doc.update(synthetic=synthetic, label=SYNTHETIC_LABEL if synthetic else REAL_LABEL, source=source)
    ref_dir = source or models.get("bf16")
    cells = plan_cells(s, schemes, have_source=bool(ref_dir),
                       have={"bf16": bool(ref_dir), "nf4": "nf4" in models})
    done = {c["id"] for c in doc["cells"] if c.get("status") not in (None, "skipped")}
    for i, cell in enumerate(cells, 1):
        if args.resume and cell["id"] in done:
            continue
        cell = dict(cell, device=device, model=models.get(cell["name"]), source=ref_dir, nf4=models.get("nf4"),
                    against={a: models.get(a) for a in cell.get("against_schemes", [])})
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
