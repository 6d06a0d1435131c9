"""GPU tests of the streaming engine (skipped without CUDA).

    pytest -m gpu tests/test_streaming_gpu.py -s          # tiny models, seconds
    pytest -m budget tests/test_streaming_gpu.py -s       # full-size FLUX transformer, ~2 min on an H100

The budget test builds a full-size FluxTransformer2DModel (guidance_embeds=True) with random weights,
its block linears in bitsandbytes NF4, one block at a time on the GPU (or loads the transformer of a
`krea-lite quantize` folder given as KREA_FULL_DIR), then, for budgets of 8, 6 and 4 GiB, caps the
process to that card (`plan.Budget.enforce`: the card less its CUDA context), applies the plan for
1024x1024 and checks that a transformer forward stays under the cap and equals the resident output bit
for bit. It prints one JSON line per budget (s/step, peaks, bytes copied, GPU time spent waiting on
copies). With KREA_FULL_DIR, a second budget test runs `load_pipeline(vram_gb=8)` -> `generate` end to end.

The delay tests put `torch.cuda._sleep` on the side stream (copies late) and on the compute stream
(compute late) in turn: an engine missing any of its waits or events then computes with stale or
half-copied bytes, and the output is no longer bit-identical. `scripts/mutations.py` removes each
wait, event and sync in turn and checks that these tests fail.
"""

from __future__ import annotations

import json
import os
import time
import types

import pytest
import torch
from torch import nn

from krea_lite.packing import leaf_tensors
from krea_lite.placement import apply_plan
from krea_lite.plan import Budget, GiB, measure, plan_for_budget
from krea_lite.streaming import BlockStreamer
from tests.test_streaming import (
    _expected_copies,
    _lora_state_dict,
    flux_inputs,
    quantize_linear,
    same_bits,
    streamed_plan,
    tiny_flux,
    tiny_t5,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _tiny():  # width 256: quanto qint4 takes its TinyGemm form (group 128), re-packed differently on CUDA
    return tiny_flux(head_dim=64, heads=4)


def _resident_output(model, inputs):
    pipe = types.SimpleNamespace(transformer=model)
    placement = apply_plan(pipe, streamed_plan(pipe), "cuda")
    with torch.no_grad():
        out = model(**inputs)[0]
    placement.close()
    return out


def test_streamed_equals_resident_and_allocates_nothing_per_step():
    inputs = flux_inputs("cuda")
    ref = _resident_output(_tiny(), inputs)
    model = _tiny()  # built the same way from the same seed: the same bytes
    pipe = types.SimpleNamespace(transformer=model)
    plan = streamed_plan(pipe, double=(1, 2, 3), single=(0, 1, 2, 3, 4), prefetch=2)
    placement = apply_plan(pipe, plan, "cuda", profile=True)
    try:
        slots = {k: [s.data_ptr() for s in v.slots] for k, v in placement.streamers.items()}
        allocated = []
        with torch.no_grad():
            for _ in range(3):
                out = model(**inputs)[0]
                torch.cuda.synchronize()
                assert same_bits(out, ref)
                allocated.append(torch.cuda.memory_allocated())
                del out
        assert allocated[0] == allocated[1] == allocated[2], allocated
        assert {k: [s.data_ptr() for s in v.slots] for k, v in placement.streamers.items()} == slots
        stats = placement.stats()
        assert stats["transformer.transformer_blocks"]["copies"] == _expected_copies(3, 2, 3)
        assert stats["transformer.single_transformer_blocks"]["copies"] == _expected_copies(5, 2, 3)
        assert all(stats[k]["misses"] == 0 and stats[k]["waited_calls"] > 0 for k in placement.streamers)
        print(json.dumps(stats))
    finally:
        placement.close()
    assert all(t.device.type == "cpu" for t in model.parameters())


def test_host_copy_is_pinned_at_its_exact_size():
    model = _tiny()
    pipe = types.SimpleNamespace(transformer=model)
    placement = apply_plan(pipe, streamed_plan(pipe, single=(1, 2, 3, 4)), "cuda")
    try:
        s = placement.streamers["transformer.single_transformer_blocks"]
        assert s.host.is_pinned() and s.host.numel() == s.n * s.stride
        assert all(p.device.type == "cuda" for p in model.single_transformer_blocks[0].parameters())
        lo, hi = s.host.data_ptr(), s.host.data_ptr() + s.host.numel()  # between calls: home, in the pinned buffer
        assert all(t.device.type == "cpu" and lo <= t.data_ptr() < hi for t in leaf_tensors(model.single_transformer_blocks[1]))
        host = s.host
    finally:
        placement.close()
    assert not host.is_pinned()  # unpinned by close(), not by the garbage collector


def test_t5_runs_on_the_gpu_only_while_encoding():
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0)).cuda()
    ref_t5 = tiny_t5()
    pipe = types.SimpleNamespace(text_encoder_2=ref_t5)
    placement = apply_plan(pipe, streamed_plan(pipe), "cuda")
    with torch.no_grad():
        ref = ref_t5(ids).last_hidden_state
    placement.close()

    t5, model = tiny_t5(), _tiny()
    pipe = types.SimpleNamespace(text_encoder_2=t5, transformer=model)
    placement = apply_plan(pipe, streamed_plan(pipe, single=(3, 4), t5=True), "cuda")
    try:
        with torch.no_grad():
            model(**flux_inputs("cuda"))  # the transformer's slots are made on its call (T5's call frees them)
            before = torch.cuda.memory_allocated()
            out = t5(ids).last_hidden_state
            assert same_bits(out, ref)
            assert placement.streamers["text_encoder_2"].slots
            del out
            model(**flux_inputs("cuda"))  # its pre-hook moves T5 off and frees T5's slots
        assert torch.cuda.memory_allocated() <= before  # T5 left nothing on the GPU
        assert not placement.streamers["text_encoder_2"].slots
        assert [t.shape for t in leaf_tensors(t5) if t.device.type != "cpu"] == []
    finally:
        placement.close()


def _tiny_async():
    """Without bitsandbytes int8, whose outlier detection synchronizes the CPU with the GPU in every forward:
    a forward that syncs hides a missing event (the CPU reaches the next copy only after the compute)."""
    return tiny_flux(schemes=("nf4", "qint8", "bf16"), head_dim=64, heads=4)


CYCLES = 20_000_000  # torch.cuda._sleep: ~10 ms at ~2 GHz, far longer than a tiny block's copy or compute


def _delayed(monkeypatch, where: str) -> None:
    if where == "copies":
        load = BlockStreamer._load

        def slow_load(self, k, pos):
            with torch.cuda.stream(self.stream):
                torch.cuda._sleep(CYCLES)
            load(self, k, pos)

        monkeypatch.setattr(BlockStreamer, "_load", slow_load)
    else:
        enter = BlockStreamer.enter

        def slow_enter(self, pos):
            enter(self, pos)
            torch.cuda._sleep(CYCLES)  # the block's kernels start late; the next copy into its slot must wait

        monkeypatch.setattr(BlockStreamer, "enter", slow_enter)


@pytest.mark.parametrize("where", ["copies", "compute"])
@pytest.mark.parametrize("prefetch", [1, 2])
def test_streamed_stays_exact_when_a_stream_is_delayed(monkeypatch, where, prefetch):
    inputs = flux_inputs("cuda")
    ref = _resident_output(_tiny_async(), inputs)
    model = _tiny_async()
    pipe = types.SimpleNamespace(transformer=model)
    _delayed(monkeypatch, where)
    placement = apply_plan(pipe, streamed_plan(pipe, double=(0, 1, 2, 3), single=(0, 1, 2, 3, 4), prefetch=prefetch),
                           "cuda")
    try:
        with torch.no_grad():
            for step in range(3):
                assert same_bits(model(**inputs)[0], ref), f"step {step}, {where} delayed"
    finally:
        placement.close()


@pytest.mark.parametrize("where", ["copies", "compute"])
def test_streamed_t5_stays_exact_when_a_stream_is_delayed(monkeypatch, where):
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0)).cuda()
    t5 = tiny_t5(schemes=("nf4", "qint8", "bf16"))  # no int8: see _tiny_async
    pipe = types.SimpleNamespace(text_encoder_2=t5)
    placement = apply_plan(pipe, streamed_plan(pipe), "cuda")
    with torch.no_grad():
        ref = t5(ids).last_hidden_state
    placement.close()
    _delayed(monkeypatch, where)
    placement = apply_plan(pipe, streamed_plan(pipe, t5=True), "cuda")
    try:
        with torch.no_grad():
            for _ in range(2):
                assert same_bits(t5(ids).last_hidden_state, ref)
                placement.on_demand.use("transformer")  # frees T5's slots; the next run allocates them again
    finally:
        placement.close()


def test_lora_on_a_streamed_model_on_the_gpu():
    inputs = flux_inputs("cuda")
    plain, placed = (tiny_flux(schemes=("nf4", "int8", "bf16"), head_dim=64, heads=4) for _ in range(2))
    sd = _lora_state_dict(plain)
    ref_pipe = types.SimpleNamespace(transformer=plain)
    resident = apply_plan(ref_pipe, streamed_plan(ref_pipe), "cuda")
    pipe = types.SimpleNamespace(transformer=placed)
    placement = apply_plan(pipe, streamed_plan(pipe, double=(1, 2, 3), single=(0, 1, 2, 3, 4)), "cuda")
    try:
        for m in (plain, placed):
            m.load_lora_adapter(dict(sd), adapter_name="a", prefix=None)
        with torch.no_grad():
            assert same_bits(placed(**inputs)[0], plain(**inputs)[0])
    finally:
        placement.close()
        resident.close()


def test_moving_a_placed_model_is_refused_in_one_line():
    from krea_lite.errors import KreaLiteError

    model = _tiny()
    pipe = types.SimpleNamespace(transformer=model)
    placement = apply_plan(pipe, streamed_plan(pipe, single=(2, 3, 4)), "cuda")
    try:
        torch.nn.Module.to(model.x_embedder, "cpu")  # what reset_device_map / another offloader does
        with pytest.raises(KreaLiteError, match="pipe.krea_lite.close"), torch.no_grad():
            model(**flux_inputs("cuda"))
    finally:
        placement.close()


# --- full size -------------------------------------------------------------------------------------


def _full_transformer() -> nn.Module:
    folder = os.environ.get("KREA_FULL_DIR")
    if folder:
        from pathlib import Path

        from krea_lite.checkpoint import read_manifest
        from krea_lite.pipeline import load_component

        info = read_manifest(Path(folder))["components"]["transformer"]
        return load_component(Path(folder) / "transformer", "transformer", info)
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True).to(torch.bfloat16)
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    parts = [m for name, m in model.named_children() if name not in ("transformer_blocks", "single_transformer_blocks")]
    for part in parts + blocks:  # one part on the GPU at a time: random bf16, block linears to NF4, back to the CPU
        part.to_empty(device="cuda")
        with torch.no_grad():
            for p in part.parameters():
                p.normal_(0, 0.02)
        if any(part is b for b in blocks):
            for name in [n for n, m in part.named_modules() if isinstance(m, nn.Linear)]:
                part.set_submodule(name, quantize_linear(part.get_submodule(name), "nf4", device="cuda"))
        nn.Module.to(part, "cpu")
    torch.cuda.empty_cache()
    return model.eval().requires_grad_(False)


def _full_inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 4096, 64, generator=g).to("cuda", torch.bfloat16),
        encoder_hidden_states=torch.randn(1, 512, 4096, generator=g).to("cuda", torch.bfloat16),
        pooled_projections=torch.randn(1, 768, generator=g).to("cuda", torch.bfloat16),
        timestep=torch.tensor([0.5], device="cuda"), guidance=torch.tensor([3.5], device="cuda"),
        img_ids=torch.zeros(4096, 3, device="cuda"), txt_ids=torch.zeros(512, 3, device="cuda"), return_dict=False,
    )


@pytest.mark.budget
def test_full_size_transformer_stays_under_the_budget():
    model = _full_transformer()
    pipe = types.SimpleNamespace(transformer=model)
    sizes = measure(pipe)
    inputs = _full_inputs()
    ref = None
    try:
        for gib in (8, 6, 4):
            card = Budget(gib)
            budget = card.allocator_bytes
            plan = plan_for_budget(sizes, budget, width=1024, height=1024)
            print(plan.table())
            torch.cuda.empty_cache()
            card.enforce("cuda")
            torch.cuda.reset_peak_memory_stats()
            placement = apply_plan(pipe, plan, "cuda", profile=True)
            apply_reserved = torch.cuda.max_memory_reserved()
            try:
                with torch.no_grad():
                    model(**inputs)  # warm-up
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    placement.stats(reset=True)
                    times = []
                    for _ in range(3):
                        start = time.perf_counter()
                        out = model(**inputs)[0]
                        torch.cuda.synchronize()
                        times.append(time.perf_counter() - start)
                reserved, allocated = torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated()
                lists = [v for k, v in placement.stats().items() if k != "on_demand"]
            finally:
                placement.close()
                torch.cuda.set_per_process_memory_fraction(1.0)
            print(json.dumps({
                "budget_gib": gib, "card": torch.cuda.get_device_name(0), "s_per_step": sorted(times)[1],
                "peak_reserved_gib": round(reserved / GiB, 3), "peak_allocated_gib": round(allocated / GiB, 3),
                "apply_peak_reserved_gib": round(apply_reserved / GiB, 3),
                "predicted_peak_gib": round((plan.peak_bytes) / GiB, 3),
                "streamed": [len(plan.streamed_double), len(plan.streamed_single)], "prefetch": plan.prefetch,
                "copied_gib_per_step": round(sum(v["bytes_copied"] for v in lists) / 3 / GiB, 3),
                "copy_wait_ms_per_step": round(sum(v.get("wait_ms", 0.0) for v in lists) / 3, 3),
                "misses": sum(v["misses"] for v in lists),
            }))
            assert reserved < budget and apply_reserved < budget
            out = out.cpu()
            if ref is None:
                ref = out
            else:
                assert same_bits(out, ref), f"{gib} GiB: streamed output differs from the first budget's"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


@pytest.mark.budget
@pytest.mark.skipif(not os.environ.get("KREA_FULL_DIR"), reason="needs KREA_FULL_DIR (a full-size krea-lite folder)")
def test_full_size_load_and_generate_stay_under_the_card(tmp_path):
    """What a user runs: load_pipeline(vram_gb=8) then generate one 1024^2 image, under the 8 GiB card."""
    from krea_lite.generate import GenerateConfig, generate
    from krea_lite.pipeline import load_pipeline

    card = Budget(8)
    try:
        pipe = load_pipeline(os.environ["KREA_FULL_DIR"], device="cuda", vram_gb=8)
        pipe.set_progress_bar_config(disable=True)
        torch.cuda.reset_peak_memory_stats()
        (g,) = generate(pipe, ["a lighthouse at dawn"], GenerateConfig(steps=4), tmp_path)
        reserved = torch.cuda.max_memory_reserved()
        print(json.dumps({"card_gib": 8, "allocator_gib": round(card.allocator_bytes / GiB, 3),
                          "peak_reserved_gib": round(reserved / GiB, 3), "s_per_step": round(g.seconds_per_step, 4),
                          "seconds": round(g.seconds, 2), "gpu": torch.cuda.get_device_name(0)}))
        assert g.path.exists() and reserved <= card.allocator_bytes
        pipe.krea_lite.close()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
