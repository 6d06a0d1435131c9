"""GPU tests of the streaming engine (skipped without CUDA).

    pytest -m gpu tests/test_streaming_gpu.py -s          # tiny models, seconds
    pytest -m budget tests/test_streaming_gpu.py -s       # full-size FLUX transformer, ~2 min on an H100

The budget test builds a full-size FluxTransformer2DModel (guidance_embeds=True) with random weights,
its block linears in bitsandbytes NF4, one block at a time on the GPU (or loads the transformer of a
`krea-lite quantize` folder given as KREA_FULL_DIR), then, for budgets of 8, 6 and 4 GiB, caps the
process with set_per_process_memory_fraction, applies the plan for 1024x1024 and checks that a
transformer forward stays under the cap and equals the resident output bit for bit. It prints one
JSON line per budget (s/step, peaks, bytes copied, GPU time spent waiting on copies).
"""

from __future__ import annotations

import json
import os
import time
import types

import pytest
import torch
from torch import nn

from krea_lite.plan import GiB, measure, plan_for_budget
from krea_lite.streaming import apply_plan
from tests.test_streaming import flux_inputs, quantize_linear, same_bits, streamed_plan, tiny_flux, tiny_t5

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _tiny():  # width 256: quanto qint4 takes its TinyGemm form (group 128), re-packed differently on CUDA
    return tiny_flux(head_dim=64, heads=4)


def _resident_output(model, inputs):
    pipe = types.SimpleNamespace(transformer=model)
    placement = apply_plan(pipe, streamed_plan(pipe), "cuda")
    with torch.no_grad():
        out = model(**inputs)[0]
    placement.remove()
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
        assert stats["transformer_blocks"]["copies"] == 3 * 3 and stats["single_transformer_blocks"]["copies"] == 3 * 5
        assert all(stats[k]["misses"] == 0 and stats[k]["waited_calls"] > 0 for k in placement.streamers)
        print(json.dumps(stats))
    finally:
        placement.remove()
    assert all(t.device.type == "cpu" for t in model.parameters())


def test_host_copy_is_pinned_at_its_exact_size():
    model = _tiny()
    pipe = types.SimpleNamespace(transformer=model)
    placement = apply_plan(pipe, streamed_plan(pipe, single=(1, 2, 3, 4)), "cuda")
    try:
        s = placement.streamers["single_transformer_blocks"]
        assert s.host.is_pinned() and s.host.numel() == s.n * s.stride
        assert all(p.device.type == "cuda" for p in model.single_transformer_blocks[0].parameters())
    finally:
        placement.remove()


def test_t5_runs_on_the_gpu_only_while_encoding():
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0)).cuda()
    ref_t5 = tiny_t5()
    pipe = types.SimpleNamespace(text_encoder_2=ref_t5)
    placement = apply_plan(pipe, streamed_plan(pipe), "cuda")
    with torch.no_grad():
        ref = ref_t5(ids).last_hidden_state
    placement.remove()

    t5, model = tiny_t5(), _tiny()
    pipe = types.SimpleNamespace(text_encoder_2=t5, transformer=model)
    placement = apply_plan(pipe, streamed_plan(pipe, single=(3, 4), t5=True), "cuda")
    try:
        with torch.no_grad():
            out = t5(ids).last_hidden_state
            during = torch.cuda.memory_allocated()
            assert same_bits(out, ref)
            assert placement.streamers["text_encoder_2"].slots
            model(**flux_inputs("cuda"))  # its pre-hook moves T5 off and frees T5's slots
        assert torch.cuda.memory_allocated() < during
        assert not placement.streamers["text_encoder_2"].slots
        assert all(p.device.type == "cpu" for p in t5.parameters())
    finally:
        placement.remove()


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
    total = torch.cuda.get_device_properties(0).total_memory
    ref = None
    try:
        for gib in (8, 6, 4):
            budget = gib * GiB
            plan = plan_for_budget(sizes, budget, width=1024, height=1024)
            print(plan.table())
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(budget / total)
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
                placement.remove()
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
