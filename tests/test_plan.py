"""Planner decisions for given budgets and sizes (pure arithmetic; no model, no GPU)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from krea_lite.errors import KreaLiteError
from krea_lite.plan import (
    CUDA_CONTEXT_BYTES,
    MARGIN_BYTES,
    GiB,
    Plan,
    Sizes,
    card_budget,
    plan_for_budget,
)

# FLUX.1 [dev] in NF4 (double quant), T5-XXL NF4 with `wo` bf16, CLIP-L and the VAE in bf16 (bytes).
FULL = Sizes(
    transformer_blocks=(175_000_000,) * 19, single_transformer_blocks=(73_000_000,) * 38,
    t5_blocks=(170_000_000,) + (162_000_000,) * 23, transformer_rest=130_000_000, t5_rest=263_000_000,
    text_encoder=246_000_000, vae=168_000_000,
)
BUDGETS = [int(g * GiB) for g in (64, 24, 16, 12, 10, 9, 8, 7.5, 7, 6.5, 6, 5.5, 5, 4.5, 4, 3.5, 3, 2.75)]


def placement(p: Plan):
    return (len(p.streamed_double), len(p.streamed_single), p.t5_streamed, p.vae_tiled, not p.clip_on_gpu)


def test_everything_resident_when_it_fits():
    p = plan_for_budget(FULL, 64 * GiB)
    assert p.streamed_double == p.streamed_single == ()
    assert p.resident_double == tuple(range(19)) and p.resident_single == tuple(range(38))
    assert not p.t5_streamed and p.clip_on_gpu and p.vae_on_gpu and not p.vae_tiled
    assert p.peak_bytes + p.margin_bytes <= 64 * GiB


def test_no_budget_without_cuda_means_no_limit(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    p = plan_for_budget(FULL, None)
    assert p.budget_bytes is None and placement(p) == (0, 0, False, False, False)


def test_no_budget_with_cuda_plans_for_what_is_free(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (6 * GiB, 8 * GiB))
    p = plan_for_budget(FULL, None)
    assert p.budget_bytes == 6 * GiB and p.streamed_single


def test_more_streams_as_the_budget_shrinks():
    plans = [plan_for_budget(FULL, b) for b in BUDGETS]
    for bigger, smaller in zip(plans, plans[1:], strict=False):
        for a, b in zip(placement(bigger), placement(smaller), strict=True):
            assert b >= a, (placement(bigger), placement(smaller))
    for b, p in zip(BUDGETS, plans, strict=True):
        assert p.peak_bytes + p.margin_bytes <= b
    assert placement(plans[0]) == (0, 0, False, False, False) and plans[-1].streamed_double


def test_streams_a_contiguous_tail_singles_first():
    p = plan_for_budget(FULL, 6 * GiB)
    assert p.streamed_double == () and p.streamed_single
    assert p.streamed_single == tuple(range(38 - len(p.streamed_single), 38))
    q = plan_for_budget(FULL, 4 * GiB)
    assert q.streamed_single == tuple(range(38)) and q.streamed_double == tuple(range(19 - len(q.streamed_double), 19))


def test_eight_gib_keeps_the_transformer_resident_and_streams_t5():
    p = plan_for_budget(FULL, 8 * GiB)
    assert p.streamed_double == p.streamed_single == ()
    assert p.t5_streamed and p.vae_tiled


def test_an_eight_gib_card_leaves_the_cuda_context_and_streams_only_a_few_single_blocks():
    assert card_budget(8) == 8 * GiB - CUDA_CONTEXT_BYTES
    p = plan_for_budget(FULL, card_budget(8))
    assert p.streamed_double == () and 0 < len(p.streamed_single) <= 8
    assert p.peak_bytes + p.margin_bytes <= card_budget(8)
    with pytest.raises(KreaLiteError, match="card of 0.5 GiB .* leaves nothing"):
        card_budget(0.5)


def test_tiles_the_vae_at_small_budgets_only():
    assert not plan_for_budget(FULL, 24 * GiB).vae_tiled
    assert plan_for_budget(FULL, 8 * GiB).vae_tiled
    assert not plan_for_budget(FULL, 8 * GiB, width=512, height=512).vae_tiled  # a 512^2 decode fits untiled
    p = plan_for_budget(FULL, 12 * GiB, width=2048, height=2048)  # 4x the pixels: 14 GiB untiled decode
    assert p.vae_tiled


def test_larger_images_and_batches_stream_more():
    base = plan_for_budget(FULL, 7 * GiB)
    big = plan_for_budget(FULL, 7 * GiB, width=1536, height=1536)
    batch = plan_for_budget(FULL, 7 * GiB, batch=2)
    assert big.step_activation_bytes > base.step_activation_bytes
    assert len(big.streamed_single) > len(base.streamed_single) and len(batch.streamed_single) > len(base.streamed_single)
    # the calibration points, with ~10% headroom: measured 0.50 GiB at 4096 + 512 tokens, 0.25 at 1024 + 512
    assert 0.50 * GiB < base.step_activation_bytes < 0.56 * GiB
    assert 0.25 * GiB < plan_for_budget(FULL, 7 * GiB, width=512, height=512).step_activation_bytes < 0.30 * GiB


def test_raises_with_the_budget_it_needs():
    with pytest.raises(KreaLiteError, match=r"needs (\d+\.\d+) GiB") as info:
        plan_for_budget(FULL, int(1.5 * GiB))
    need = float(re.search(r"needs (\d+\.\d+) GiB", str(info.value)).group(1))
    assert 1.5 < need < 2.5  # every block streamed: embedders + 2 slots per list + activations + margin
    plan_for_budget(FULL, int((need + 0.01) * GiB))  # that much is enough
    with pytest.raises(KreaLiteError):
        plan_for_budget(FULL, int((need - 0.05) * GiB))


def test_shrink_streams_more_with_more_margin():
    p = plan_for_budget(FULL, 7 * GiB)
    q = p.shrink()
    assert q.conservative == 1 and q.margin_bytes == 2 * MARGIN_BYTES and q.vae_tiled
    assert len(q.streamed_single) + len(q.streamed_double) >= len(p.streamed_single) + len(p.streamed_double) + 4
    assert q.peak_bytes + q.margin_bytes <= 7 * GiB
    with pytest.raises(KreaLiteError):
        for _ in range(20):
            q = q.shrink()


def test_table_mentions_every_component():
    for b in (64 * GiB, 6 * GiB, 3 * GiB):
        text = plan_for_budget(FULL, b).table()
        for word in ("transformer (", "transformer_blocks", "single_transformer_blocks", "T5", "CLIP", "vae",
                     "activations", "margin", "predicted peak"):
            assert word in text, (word, text)
    assert "streamed" in plan_for_budget(FULL, 5 * GiB).table()
    assert "tiled" in plan_for_budget(FULL, 8 * GiB).table()


def test_absent_components_cost_nothing():
    only = dataclasses.replace(FULL, t5_blocks=(), t5_rest=0, text_encoder=0, vae=0)
    p = plan_for_budget(only, 8 * GiB)
    assert not p.t5_streamed and not p.vae_tiled and p.streamed_single == ()
    assert p.peak_bytes == only.transformer + p.step_activation_bytes
    assert "T5" not in p.table()


@pytest.mark.parametrize("kwargs, match", [
    (dict(width=1000), "multiple of 16"),
    (dict(batch=0), "batch"),
    (dict(budget_bytes=-1), "positive"),
])
def test_bad_arguments(kwargs, match):
    args = dict(sizes=FULL, budget_bytes=8 * GiB) | kwargs
    with pytest.raises(KreaLiteError, match=match):
        plan_for_budget(**args)


def test_plan_and_sizes_check_themselves():
    p = plan_for_budget(FULL, 8 * GiB)
    with pytest.raises(KreaLiteError, match="streamed_single"):
        dataclasses.replace(p, streamed_single=(40,))
    with pytest.raises(KreaLiteError, match="prefetch"):
        dataclasses.replace(p, prefetch=0)
    with pytest.raises(KreaLiteError, match="transformer_blocks"):
        dataclasses.replace(FULL, transformer_blocks=[1, 2])


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1e9, "8", True])
def test_a_budget_that_is_not_a_card_is_refused(bad):
    from krea_lite.plan import Budget

    with pytest.raises(KreaLiteError, match="not a card size"):
        Budget(bad)


def test_one_budget_for_cli_python_and_bench():
    from krea_lite.plan import Budget

    b = Budget(8)
    assert b.allocator_bytes == card_budget(8) == 8 * GiB - CUDA_CONTEXT_BYTES


def test_plan_says_what_streams_per_step(quantized, capsys):
    from krea_lite.cli import main

    assert main(["plan", "--model", str(quantized("nf4")), "--vram-gb", "8"]) == 0
    assert "streamed per step: nothing (the transformer stays on the GPU)" in capsys.readouterr().out


def test_streamed_bytes_are_the_streamed_blocks_once():
    from krea_lite.cli import _copy_line

    plan = plan_for_budget(FULL, card_budget(8))
    want = (sum(FULL.transformer_blocks[i] for i in plan.streamed_double)
            + sum(FULL.single_transformer_blocks[i] for i in plan.streamed_single))
    assert plan.streamed_bytes == want > 0
    assert _copy_line(plan) == (f"streamed per step: {want / 2**30:.2f} GiB (on a CUDA machine, plan also measures "
                                "their copy time)")


def test_spread_streams_as_many_blocks_evenly_and_keeps_the_bytes():
    for budget in (card_budget(6), card_budget(4), 4 * GiB):
        tail, spread = plan_for_budget(FULL, budget), plan_for_budget(FULL, budget, spread=True)
        assert placement(spread) == placement(tail) and spread.phase_bytes == tail.phase_bytes
        assert spread.streamed_bytes == tail.streamed_bytes and spread.spread and not tail.spread
        for idx, n in ((spread.streamed_double, 19), (spread.streamed_single, 38)):
            if 0 < len(idx) < n:
                gaps = [b - a for a, b in zip(idx, idx[1:], strict=False)]
                assert max(gaps) - min(gaps) <= 1 and idx[0] <= n // len(idx)  # evenly, from the start
        assert spread.shrink().spread
    uneven = dataclasses.replace(FULL, single_transformer_blocks=(73_000_000,) * 37 + (74_000_000,))
    p = plan_for_budget(uneven, card_budget(4), spread=True)  # blocks of other sizes: the tail, as planned
    assert p.streamed_single == tuple(range(38 - len(p.streamed_single), 38))
