"""Progress bars (tqdm) that show no ETA until it means something.

The first update of a conversion comes after seconds of setup and covers a few bytes, so tqdm's first
estimate reads like "4878:25:03"; the bar shows the remaining time (and the rate) only from
`ETA_AFTER` of the total on.
"""

from __future__ import annotations

from functools import cache

ETA_AFTER = 0.05  # fraction of the total done before the rate and remaining time are shown


@cache
def _bar_class():
    from tqdm.auto import tqdm

    class Bar(tqdm):
        @property
        def format_dict(self):
            d = super().format_dict
            if d.get("total") and d["n"] < ETA_AFTER * d["total"]:
                d["bar_format"] = ("{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, ETA after "
                                   + f"{100 * ETA_AFTER:.0f}%" + "{postfix}]")
            return d

    return Bar


def progress_bar(**kwargs):
    """A tqdm bar (same arguments as `tqdm.auto.tqdm`) that hides its ETA until `ETA_AFTER` is done.

    The rate is the average since the start (smoothing 0) unless `smoothing` is given: one early
    sample of a few bytes would otherwise dominate the estimate for a while."""
    kwargs.setdefault("smoothing", 0)
    return _bar_class()(**kwargs)
