"""krea-lite bench: memory, speed and fidelity of every scheme and budget, beside today's tools.

The parent process never touches the GPU: it plans a matrix of cells (scheme x VRAM budget x
resolution x batch, plus the diffusers anchors of /shared/ANCHORS.md and a bf16 reference for
fidelity), runs each cell in a child `python -m krea_lite.bench --cell JSON` so that a segfault,
CUDA illegal access or OOM is recorded as a crash while the rest go on, and writes the JSON and
a markdown table after every cell, the plots at the end.

One step = one transformer forward on the ANCHORS.md inputs (hidden_states (b, tokens, 64),
encoder_hidden_states (b, 512, 4096), pooled (b, 768), timestep 0.5, guidance 3.5, zero ids),
synchronized, median of N after warm-up; for a streamed budget it includes the streaming.

The package follows the data path: `matrix` (the command line, the presets, the cells of a run),
`runner` (the parent: children, records, resume), `cells` (what runs inside each child) and `report`
(fidelity, the markdown table, the plots). This module re-exports their public names and holds `main`.
"""

from __future__ import annotations

import argparse
import sys

from .cells import ABORT_ENV, CELL_KINDS
from .matrix import ANCHORS, PRESETS, SCHEMES, GiB, _budget_name, _settings, add_arguments, plan_cells
from .report import (
    PLOTS,
    add_fidelity,
    dominance,
    make_plots,
    markdown_table,
    psnr,
    render_section,
    save_reports,
    short_table,
    ssim,
)
from .runner import (
    COMMIT_ENV,
    END_RESERVE_S,
    FORMAT_VERSION,
    MIN_CELL_S,
    REAL_LABEL,
    SYNTHETIC_LABEL,
    Runner,
    run,
)

__all__ = [
    "ABORT_ENV", "ANCHORS", "CELL_KINDS", "COMMIT_ENV", "END_RESERVE_S", "FORMAT_VERSION", "GiB", "MIN_CELL_S",
    "PLOTS", "PRESETS", "REAL_LABEL", "SCHEMES", "SYNTHETIC_LABEL", "Runner", "_budget_name", "_settings",
    "add_arguments", "add_fidelity", "dominance", "main", "make_plots", "markdown_table", "plan_cells", "psnr",
    "render_section", "run", "save_reports", "short_table", "ssim",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m krea_lite.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    from ..errors import KreaLiteError

    try:
        return run(args)
    except KreaLiteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
