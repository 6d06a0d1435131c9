"""krea-lite demo: the whole path on a tiny synthetic model, offline, on the CPU, in seconds."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

DEMO_SCHEMES = ("bf16", "nf4", "int8")
PROMPT = "a lighthouse on a cliff at dawn, volumetric light"


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_demo(out: Path) -> str:
    """Build the tiny synthetic pipeline, quantize it (bf16, NF4, int8), load, generate, compare.

    Args:
        out: working folder (models and PNGs land here; reused on a second run).

    Returns:
        A small table: scheme, folder size, quantize/load/generate time, difference from bf16.
    """
    from transformers.utils import logging

    from .generate import GenerateConfig, OutputConfig, generate
    from .pipeline import load_pipeline
    from .quantize import QuantizeConfig, quantize_pipeline
    from .synthetic import write_synthetic

    logging.disable_progress_bar()  # transformers' per-load "Loading weights" bars would bury the table

    out = Path(out)
    source = out / "synthetic-tiny"
    if not source.exists():
        write_synthetic(source, size="tiny", seed=0)
    config = GenerateConfig(steps=4, width=128, height=128, seed=0, max_sequence_length=64)
    rows, ref = [], None
    for scheme in DEMO_SCHEMES:
        folder = out / f"krea-tiny-{scheme}"
        t0 = time.perf_counter()
        quantize_pipeline(source, folder, QuantizeConfig(transformer=scheme, text_encoder=scheme, device="cpu"),
                          force=True, progress=False)
        t1 = time.perf_counter()
        pipe = load_pipeline(folder, device="cpu")
        pipe.set_progress_bar_config(disable=True)
        t2 = time.perf_counter()
        # the demo's own images: a second run replaces them rather than adding NAME-2.png beside them
        (g,) = generate(pipe, [PROMPT], config, out / "images" / scheme, OutputConfig(overwrite=True))
        t3 = time.perf_counter()
        from PIL import Image

        image = np.asarray(Image.open(g.path), dtype=np.float64)
        if ref is None:
            ref = image
        mse = float(np.mean((image - ref) ** 2))
        psnr = "exact" if mse == 0 else f"{10 * np.log10(255.0**2 / mse):.1f} dB"
        rel = float(np.linalg.norm(image - ref) / max(np.linalg.norm(ref), 1e-12))
        rows.append((scheme, _folder_bytes(folder), t1 - t0, t2 - t1, t3 - t2, rel, psnr, g.path))
        del pipe
    lines = [
        "krea-lite demo: tiny synthetic FLUX (random weights), CPU, 128x128, 4 steps, 64 text tokens, seed 0",
        f"{'scheme':<8}{'folder':>10}{'quantize':>10}{'load':>8}{'generate':>10}{'rel err':>9}{'PSNR vs bf16':>14}",
    ]
    for scheme, size, tq, tl, tg, rel, psnr, _ in rows:
        lines.append(f"{scheme:<8}{size / 2**20:>8.2f}MB{tq:>9.1f}s{tl:>7.1f}s{tg:>9.1f}s{rel:>9.4f}{psnr:>14}")
    lines.append(f"images: {out / 'images'} (synthetic weights: the pictures are noise-like; quality on real "
                 "weights is not measured by this demo)")
    return "\n".join(lines)
