"""compile_transformer: regional compile of the repeated blocks, hooks outside the compiled code.

Most tests use backend="aot_eager" (Dynamo + AOTAutograd, no code generation): Inductor on this
2-core CPU needs ~25 s for a cold C++ build of even a toy graph. One test runs real Inductor on a toy
model and checks the on-disk cache. The streaming engine's hooks are imitated by hooks that re-point
every block tensor into a shared "slot" before the block runs and back after, wrapped in
torch.compiler.disable as the engine's will be.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from krea_lite.compile import compile_counters, compile_transformer
from krea_lite.errors import KreaLiteError


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x, scale=None):
        return x + self.b(torch.nn.functional.gelu(self.a(x))) * (1.0 if scale is None else scale)


class Toy(nn.Module):
    _repeated_blocks = ["Block"]

    def __init__(self, n: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(n))
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        for block in self.blocks:
            x = block(x, scale=0.5)
        return self.head(x)


def toy():
    torch.manual_seed(0)
    return Toy().eval().requires_grad_(False)


class Slots:
    """Forward pre/post hooks that move each block's tensors into one shared slot and back (like streaming)."""

    def __init__(self):
        self.slot, self.home, self.calls = {}, {}, 0

    @torch.compiler.disable
    def pre(self, module, args, kwargs):
        self.calls += 1
        for name, p in module.named_parameters():
            buf = self.slot.setdefault(name, torch.empty_like(p))
            buf.copy_(p.data)
            self.home[id(p)], p.data = p.data, buf

    @torch.compiler.disable
    def post(self, module, args, kwargs, output):
        for p in module.parameters():
            p.data = self.home.pop(id(p))

    def attach(self, model):
        for b in model.blocks:
            b.register_forward_pre_hook(self.pre, with_kwargs=True)
            b.register_forward_hook(self.post, with_kwargs=True)


def diffusers_slots(model):
    """The same, as a diffusers ModelHook (it wraps `module.forward`)."""
    from diffusers.hooks import HookRegistry, ModelHook

    slots = Slots()

    class Stream(ModelHook):
        @torch.compiler.disable
        def pre_forward(self, module, *args, **kwargs):
            slots.pre(module, args, kwargs)
            return args, kwargs

        @torch.compiler.disable
        def post_forward(self, module, output):
            slots.post(module, None, None, output)
            return output

    for b in model.blocks:
        HookRegistry.check_if_exists_or_initialize(b).register_hook(Stream(), "stream")
    return slots


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    torch._dynamo.reset()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "unused"))  # restored after the test
    yield tmp_path / "cache"
    torch._dynamo.reset()


def diff(before: dict) -> dict:
    now = compile_counters()
    return {k: now[k] - before[k] for k in now}


@pytest.mark.parametrize("hooks", ["module hooks", "diffusers ModelHook"])
def test_compiled_blocks_match_eager_with_hooks_outside_the_graph(hooks, fresh, capsys):
    model = toy()
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    result = compile_transformer(model, cache_dir=fresh, device="cpu", backend="aot_eager")
    assert result.compiled and result.blocks == {"Block": 3} and result.cache_dir == str(fresh.resolve())
    if hooks == "module hooks":
        slots = Slots()
        slots.attach(model)
    else:
        slots = diffusers_slots(model)  # registered after compiling: wraps the compiled forward
    before = compile_counters()
    with torch.no_grad():
        first = model(x)
        warm = diff(before)
        second = model(x)
    after = diff(before)
    assert slots.calls == 6 and not slots.home  # the hooks ran around every block call
    assert torch.allclose(first, ref, atol=1e-6) and torch.equal(first, second)
    assert warm["graphs"] == 1, "one graph for the three blocks"
    assert warm["graph_breaks"] == 0, "the hooks must stay outside the compiled region"
    assert after["graphs"] == warm["graphs"], "no recompile on the second call"
    # the weights are graph inputs, not constants: changing them changes the compiled output
    with torch.no_grad():
        model.blocks[1].b.weight.mul_(2)
        changed = model(x)
        for b in model.blocks:
            b.forward = type(b).forward.__get__(b)  # uncompiled, to compare
        for h in (getattr(b, "_diffusers_hook", None) for b in model.blocks):
            if h is not None:
                h.remove_hook("stream", recurse=False)
        eager = model(x)
    assert torch.allclose(changed, eager, atol=1e-6) and not torch.allclose(changed, first)
    assert diff(before)["graphs"] == warm["graphs"]
    out = capsys.readouterr().out
    assert "torch.compile (aot_eager) of 3 blocks (Block x3)" in out
    assert out.count("first compiled transformer call") == 1


def test_module_compile_would_trace_through_a_diffusers_hook(fresh):
    """Why compile_transformer does not use nn.Module.compile (diffusers' compile_repeated_blocks):
    that compiles `_call_impl`; a hook wrapping `forward` is then traced, and each disabled hook is a
    graph break in every block call."""
    model = toy()
    for b in model.blocks:
        b.compile(backend="aot_eager", dynamic=False)
    diffusers_slots(model)
    before = compile_counters()
    with torch.no_grad():
        model(torch.randn(4, 32))
    assert diff(before)["graph_breaks"] > 0


def test_blocks_with_a_forward_wrapper_are_refused(fresh):
    model = toy()
    diffusers_slots(model)
    with pytest.raises(KreaLiteError, match="before streaming is applied"):
        compile_transformer(model, cache_dir=fresh, device="cpu", backend="aot_eager")
    model = toy()
    compile_transformer(model, cache_dir=fresh, device="cpu", backend="aot_eager")
    with pytest.raises(KreaLiteError, match="compile the transformer once"):
        compile_transformer(model, cache_dir=fresh, device="cpu", backend="aot_eager")


def test_model_without_repeated_blocks_is_refused(fresh):
    with pytest.raises(KreaLiteError, match="no repeated blocks"):
        compile_transformer(nn.Linear(2, 2), cache_dir=fresh, device="cpu", backend="aot_eager")


def test_no_cpp_compiler_continues_uncompiled_in_one_line(fresh, monkeypatch, capsys):
    import krea_lite.compile as compile_mod

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compile_mod.shutil, "which", lambda name: None)
    model = toy()
    result = compile_transformer(model, cache_dir=fresh, device="cpu")
    assert not result.compiled and result.blocks == {}
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["krea-lite: `--compile` needs a C++ compiler on the CPU (g++ or clang++; or set CXX); "
                   "continuing uncompiled"]
    assert not any("forward" in vars(b) for b in model.blocks)
    with torch.no_grad():
        model(torch.randn(2, 32))


def test_a_failing_toolchain_continues_uncompiled_in_one_line(fresh, monkeypatch, capsys):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.\nmore")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    result = compile_transformer(toy(), cache_dir=fresh, device="cpu", backend="aot_eager")
    assert not result.compiled
    assert capsys.readouterr().out.strip() == (
        "krea-lite: `--compile` needs a working aot_eager toolchain (RuntimeError: Failed to find C compiler. "
        "Please specify via CC environment variable.); continuing uncompiled")


def _compiled_tiny_flux(kind: str, cache, device: str, backend: str, tolerance: float):
    from .test_streaming import flux_inputs
    from .test_w8a8 import _w8a8_flux, rel

    model = _w8a8_flux(kind).to(device)
    with torch.no_grad():
        ref = model(**flux_inputs(device))[0]
        compile_transformer(model, cache_dir=cache, device=device, backend=backend)
        before = compile_counters()
        first = model(**flux_inputs(device))[0]
        warm = diff(before)
        second = model(**flux_inputs(device))[0]
    assert rel(first, ref) <= tolerance and torch.equal(first, second)
    # one graph per block class, plus one: the first single block gets a contiguous hidden_states,
    # the others a slice of the previous block's output (a stride guard) - once, not per block or step
    assert warm["graphs"] <= 3 and warm["graph_breaks"] == 0
    assert diff(before)["graphs"] == warm["graphs"], "recompiled after warm-up"


def test_tiny_flux_with_8bit_layers_compiles_without_recompiles(fresh):
    _compiled_tiny_flux("fp8", fresh, "cpu", "aot_eager", 1e-3)  # int8 differs only in its CUDA kernel


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_gpu_inductor_compiles_the_8bit_kernels_without_recompiles(kind, fresh):
    from krea_lite.w8a8 import KINDS

    if torch.cuda.get_device_capability() < KINDS[kind].capability:
        pytest.skip(f"{kind} kernels need capability {KINDS[kind].needs}")
    # Inductor fuses the activation quantization: a few fp8/int8 roundings flip (measured 0.009 on the CPU)
    _compiled_tiny_flux(kind, fresh, "cuda", "inductor", 0.03)


@pytest.mark.slow
def test_inductor_on_the_cpu_matches_eager_and_reuses_its_disk_cache(fresh):
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    outputs, counts = [], []
    for _ in range(2):  # the second compile starts from an empty in-process cache, as a new process would
        torch._dynamo.reset()
        model = toy()
        with torch.no_grad():
            ref = model(x)
            compile_transformer(model, cache_dir=fresh, device="cpu", backend="inductor")
            before = compile_counters()
            outputs.append(model(x))
            model(x)
        counts.append(diff(before))
        assert torch.allclose(outputs[-1], ref, atol=1e-5, rtol=1e-4)
    assert counts[0]["fxgraph_cache_miss"] >= 1 and counts[0]["graphs"] == 1
    assert counts[1]["fxgraph_cache_hit"] >= 1 and counts[1]["fxgraph_cache_miss"] == 0
    assert any(fresh.iterdir())


def test_load_pipeline_compile_then_streaming_on_the_cpu(quantized, monkeypatch):
    """load_pipeline(compile=True) compiles every block before placement; a placed, streamed pipeline then
    gives the same transformer output as the uncompiled one (backend aot_eager: no C compiler needed)."""
    import dataclasses
    import types

    import torch

    import krea_lite.compile as compile_mod
    from krea_lite.pipeline import load_pipeline
    from krea_lite.placement import apply_plan
    from krea_lite.plan import measure, plan_for_budget
    from tests.test_streaming import flux_inputs, same_bits

    real = compile_mod.compile_transformer
    monkeypatch.setattr(compile_mod, "compile_transformer",
                        lambda tr, **kw: real(tr, **{**kw, "backend": "eager"}))
    ref = load_pipeline(quantized("bf16"), device="cpu", verify="none")
    pipe = load_pipeline(quantized("bf16"), device="cpu", verify="none", compile=True)
    assert all("forward" in vars(b) for b in pipe.transformer.single_transformer_blocks)
    base = plan_for_budget(measure(types.SimpleNamespace(transformer=pipe.transformer)), None)
    n = len(pipe.transformer.single_transformer_blocks)
    plan = dataclasses.replace(base, streamed_single=tuple(range(1, n)), prefetch=1)
    cfg = pipe.transformer.config
    inputs = flux_inputs()
    inputs = {**inputs, "hidden_states": torch.randn(1, 16, cfg.in_channels, dtype=torch.bfloat16),
              "encoder_hidden_states": torch.randn(1, 8, cfg.joint_attention_dim, dtype=torch.bfloat16),
              "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, dtype=torch.bfloat16)}
    if not cfg.guidance_embeds:
        inputs.pop("guidance")
    with torch.no_grad():
        want = ref.transformer(**inputs)[0]
    placement = apply_plan(types.SimpleNamespace(transformer=pipe.transformer), plan, "cpu")
    try:
        with torch.no_grad():
            assert same_bits(pipe.transformer(**inputs)[0], want)
    finally:
        placement.close()
