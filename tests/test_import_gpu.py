"""GPU tier for the kept formats (#13): GGUF blocks, ComfyUI fp8_scaled and Forge NF4 folders on CUDA,
resident and streamed, eager and compiled, against the same folder computed on the CPU. Skipped without CUDA."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from krea_lite.pipeline import load_pipeline, place
from krea_lite.quantize import QuantizeConfig, quantize_pipeline

from .conftest import requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]


@pytest.fixture(scope="module")
def folders(tiny_source, tmp_path_factory):
    """name -> a tiny folder converted from that single file, kept as stored."""
    from krea_lite.synthetic_comfy import write_comfy_files
    from krea_lite.synthetic_gguf import gguf_name, write_gguf

    root = tmp_path_factory.mktemp("import-gpu")
    files = {k: write_gguf(tiny_source, root / gguf_name(k), k) for k in ("Q4_K", "Q8_0")}
    comfy = write_comfy_files(tiny_source, root / "comfy")
    files.update(fp8_scaled=comfy["fp8_scaled"], nf4=comfy["nf4"])
    return {k: quantize_pipeline(p, root / f"out-{k}", QuantizeConfig(text_encoder="bf16", base=str(tiny_source),
                                                                      device="cpu"), progress=False)
            for k, p in files.items()}


def _inputs(config, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_img, n_txt = 16, 8
    x = dict(hidden_states=torch.randn(1, n_img, config.in_channels, generator=g).to(torch.bfloat16),
             encoder_hidden_states=torch.randn(1, n_txt, config.joint_attention_dim, generator=g).to(torch.bfloat16),
             pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g).to(torch.bfloat16),
             timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
             img_ids=torch.zeros(n_img, 3), txt_ids=torch.zeros(n_txt, 3))
    return {k: v.to(device) for k, v in x.items()} | {"return_dict": False}


# CUDA against the same folder on the CPU, whole tiny transformer: GGUF and NF4 dequantize alike and differ
# in bf16 matmul accumulation only; fp8mm runs torch._scaled_mm (fast accumulation) on CUDA and dequantizes
# on the CPU: 0.01 per layer (test_w8a8.KERNEL_TOLERANCE), 0.024 through the tiny model (H200, 2026-12-02).
CPU_TOLERANCE = {"Q4_K": 0.02, "Q8_0": 0.02, "fp8_scaled": 0.05, "nf4": 0.02}


def _rel(a, b) -> float:
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


@pytest.mark.parametrize("name", ["Q4_K", "Q8_0", "fp8_scaled", "nf4"])
def test_kept_format_on_cuda_matches_cpu_and_streams_bit_for_bit(folders, name):
    cpu = load_pipeline(folders[name], device="cpu")
    with torch.no_grad():
        ref = cpu.transformer(**_inputs(cpu.transformer.config, "cpu"))[0]
    pipe = load_pipeline(folders[name], device="cuda")
    try:
        x = _inputs(pipe.transformer.config, "cuda")
        with torch.no_grad():
            resident = pipe.transformer(**x)[0]
            assert _rel(resident, ref) < CPU_TOLERANCE[name], name
            plan = pipe.krea_lite.plan
            n, m = len(plan.sizes.transformer_blocks), len(plan.sizes.single_transformer_blocks)
            place(pipe, dataclasses.replace(plan, streamed_double=tuple(range(1, n)),
                                            streamed_single=tuple(range(m)), prefetch=1))
            for _ in range(2):
                assert torch.equal(pipe.transformer(**x)[0], resident), name
    finally:
        pipe.krea_lite.close()


def test_gguf_blocks_compile_with_inductor_on_cuda_without_breaks(folders, tmp_path):
    from krea_lite.compile import compile_counters

    pipe = load_pipeline(folders["Q4_K"], device="cuda")
    try:
        x = _inputs(pipe.transformer.config, "cuda")
        with torch.no_grad():
            eager = pipe.transformer(**x)[0]
        pipe.krea_lite.close()
        torch._dynamo.reset()
        pipe = load_pipeline(folders["Q4_K"], device="cuda", compile=True)
        before = compile_counters()
        with torch.no_grad():
            got = pipe.transformer(**x)[0]
            warm = compile_counters()
            again = pipe.transformer(**x)[0]
        assert warm["graph_breaks"] == before["graph_breaks"]
        assert compile_counters()["graphs"] == warm["graphs"]  # no recompile on the second call
        assert _rel(got, eager) < 2e-2 and torch.equal(got, again)
    finally:
        pipe.krea_lite.close()
        torch._dynamo.reset()
