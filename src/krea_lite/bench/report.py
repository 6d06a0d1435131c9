"""krea-lite bench, the reports: fidelity against bf16, the markdown table, dominance sentences, plots.

Parent side only: numpy, PIL and matplotlib are imported where used and nothing here needs torch, so
the README generator (scripts/render_readme.py) renders a committed JSON without a GPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .matrix import ANCHORS, SCHEMES, GiB, _budget_name

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
            if own is not None and own is not c and m.get("step_npy") and own.get("metrics", {}).get("step_npy"):
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
    return sorted((c for c in doc["cells"] if c["kind"] in order), key=lambda c: (
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
                            "unexplained (not copy waits)" if wait is not None
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


def _ratio_label(c: dict) -> str:
    extra = (" + compile" if c.get("compile") else "") + (", spread" if c.get("spread") else "") + (
        f", {c['loras']} LoRAs r{c['lora_rank']} loaded" if c.get("loras") else "")
    return f"{c['name']}{extra} {c['width']}x{c['height']}"


def ratio_table(doc: dict) -> str:
    """The interleaved ratio cells: per card, capped step / resident step of the same round, the physical
    limit max(resident step, streamed bytes / host-to-device bandwidth), and the LoRA overheads."""
    rows, lora_rows, vs_rows = [], [], []
    for c in doc["cells"]:
        if c["kind"] != "ratio" or not (r := c.get("metrics", {}).get("ratios")):
            if c["kind"] == "ratio" and c.get("status") != "ok":
                rows.append(f"| {_ratio_label(c)} | {c['status']}: {(c.get('error') or '')[:80]} | | | | | | | |")
            continue
        for card in c["budgets"]:
            x = r.get(str(card))
            if not x:
                continue
            on = " x limit" if x.get("target_on") == "vs_physical_limit" else ""
            target = f"≤ {x['target']:.2f}{on}" + (" met" if x["met"] else " **missed**") if "target" in x else ""
            flag = " (spread wider than the margin)" if x.get("spread_wider_than_margin") else ""
            limit = (f"{x['physical_limit_s']:.4f} ({x['bound']}-bound), step {x['vs_physical_limit']:.2f}x"
                     if "physical_limit_s" in x else "")
            rows.append(f"| {_ratio_label(c)} | {card:g} GiB | {x['ratio_median']:.3f} "
                        f"({x['ratio_min']:.3f}–{x['ratio_max']:.3f}, {x['rounds']} rounds) | {target}{flag} | "
                        f"{x['s_per_step']:.4f} vs {r['resident_s_per_step']:.4f} | {limit} | {x['peak_reserved_gib']} | "
                        f"{x['copy_wait_ms_per_step']} | {x['alloc_retries']} |")
        for variant, per_card in sorted((k, v) for k, v in r.items() if k.startswith("lora+")):
            for card, x in per_card.items():
                if x:
                    where = "resident" if card == "None" else f"{float(card):g} GiB"
                    lora_rows.append(f"| {c['name']}{' + compile' if c.get('compile') else ''} | {where} | "
                                     f"{variant.removeprefix('lora+lora').replace('fused', ' fused')} of "
                                     f"{c['loras']} (rank {c['lora_rank']}) | "
                                     f"{x['ratio_median']:.3f} ({x['ratio_min']:.3f}–{x['ratio_max']:.3f}, "
                                     f"{x['rounds']} rounds) |")
        for card, x in sorted((k, v) for k, v in c["metrics"].get("lora_switch", {}).items() if k != "files_mb"):
            where = "resident" if card == "None" else f"{float(card):g} GiB"
            lora_rows.append(f"| {c['name']} | {where} | load / switch one LoRA file, seconds | " + ", ".join(
                f"{k.removesuffix('_s').replace('_', ' ')} {v:.2f}" for k, v in sorted(x.items())) + " |")
        for variant, per_card in sorted((k, v) for k, v in r.items() if k.startswith("vs@")):
            target = per_card.get("target")
            for card, x in per_card.items():
                if card != "target" and x:
                    met = "" if target is None else (f"≤ {target:.2f} " + ("met" if x["ratio_median"] <= target
                                                                            else "**missed**"))
                    vs_rows.append(f"| {_ratio_label(c)} | {variant.removeprefix('vs@')} | "
                                   f"{'resident' if card == 'None' else f'{float(card):g} GiB'} | "
                                   f"{x['ratio_median']:.3f} ({x['ratio_min']:.3f}–{x['ratio_max']:.3f}, "
                                   f"{x['rounds']} rounds) | {met} |")
    out = []
    if rows:
        out.append("Interleaved streamed/resident step ratios (one process, resident and each card taking turns; "
                   "median, min–max over rounds; physical limit = max(resident step, streamed bytes / measured "
                   "host-to-device bandwidth)):\n\n"
                   "| model | card | ratio (min–max) | target | s/step vs resident | physical limit s/step | "
                   "peak reserved GiB | copy wait ms/step (max) | allocator retries |\n"
                   "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    if lora_rows:
        out.append("LoRA overhead (same process, interleaved: each card's step with the LoRAs active over the same "
                   "round's step with them loaded but disabled):\n\n"
                   "| base | card | LoRAs active | step ratio (min–max) |\n|---|---|---|---|\n" + "\n".join(lora_rows))
    if vs_rows:
        out.append("Against another scheme (same process, interleaved: this scheme's step over the other's at the "
                   "same card, the other loaded eager without LoRA):\n\n"
                   "| model | against | card | step ratio (min–max) | target |\n|---|---|---|---|---|\n"
                   + "\n".join(vs_rows))
    return "\n\n".join(out)


def render_section(doc: dict, plot_prefix: str) -> str:
    """The markdown block shared by the run's .md file and the README (deterministic for a doc)."""
    plots = "\n".join(f"![{title}]({plot_prefix}-{name}.png)" for name, title in PLOTS.items())
    dom = dominance(doc)
    setup = "; ".join(f"{k} {r['status']}" + (f" in {r['wall_s']:.0f} s" if r.get("wall_s") else "")
                      + (f" ({r['error'][:120]})" if r.get("error") else "")
                      for k, r in sorted(doc.get("prepare", {}).items()))
    return "\n\n".join(x for x in [
        _header(doc), f"Setup: {setup}." if setup else "", ratio_table(doc), markdown_table(doc),
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
    ratios = ratio_table(doc)
    return "\n".join(lines) + ("\n\n" + ratios if ratios else "")


PLOTS = {"vram": "peak reserved VRAM vs s/step", "budget": "s/step vs VRAM budget",
         "tokens": "s/step and VRAM vs tokens"}


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


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
