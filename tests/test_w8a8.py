"""fp8mm / int8mm: 8-bit weights x 8-bit per-token activations (src/krea_lite/w8a8.py).

CPU tier: quantize -> save -> reload reproduces the output exactly; the dequantizing path (what the CPU
and cards without the instructions run) against bf16 within stated tolerances; the kernels' formulas,
run through torch's CPU `_scaled_mm` / `_int_mm`, against the dequantizing path; manifest and hardware
checks; streaming. GPU tier (skipped without CUDA): the CUDA kernels against the dequantized reference.
"""

from __future__ import annotations

import json
import shutil
import types

import pytest
import torch
from torch import nn

import krea_lite.w8a8 as w8a8
from krea_lite.checkpoint import MANIFEST, verify_checkpoint
from krea_lite.errors import KreaLiteError
from krea_lite.pipeline import load_component
from krea_lite.quantize import T5_KEEP_BNB, TRANSFORMER_KEEP
from krea_lite.w8a8 import KINDS, Linear8, quantize_rows, quantize_weight

from .conftest import requires_cuda
from .test_core import bf16_transformer, quantize_in_memory, transformer_inputs

W8A8 = ("fp8mm", "int8mm")
KIND = {"fp8mm": "fp8", "int8mm": "int8"}
# One Linear (256 -> 128, Gaussian weights and inputs) against bf16, weight AND activations quantized:
# fp8 e4m3 keeps 3 mantissa bits, a relative rounding error of up to 2^-4 (RMS ~0.03) on each operand,
# ~0.04 on a dot product (measured 0.037): tolerance 0.06. int8 rounds to steps of absmax/127; a
# Gaussian row's absmax is ~3 sigma, so the RMS error is ~3/(127*sqrt(12)) ~ 0.007 per operand, ~0.01
# together (measured 0.008): tolerance 0.015.
LAYER_TOLERANCE = {"fp8": 0.06, "int8": 0.015}
# The kernels' formulas vs the dequantizing path: the same 8-bit products; they differ only in
# accumulation order and where the result is rounded to bf16 (2^-9), measured 0.003: tolerance 0.01.
KERNEL_TOLERANCE = 0.01
T5_TOLERANCE = {"fp8mm": 0.2, "int8mm": 0.08}  # see test_t5_reloads_exactly_and_keeps_wo


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture
def fresh_routes(monkeypatch):
    """Forget which routes were decided and which lines were printed (they are once per process)."""
    monkeypatch.setattr(w8a8, "_ROUTES", {})
    monkeypatch.setattr(w8a8, "_SAID", set())


def _linear(bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(256, 128, bias=bias).to(torch.bfloat16)


def _x(rows: int = 20) -> torch.Tensor:
    return torch.randn(2, rows, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)


# --- quantization and the dequantizing path --------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_weight_quantization_is_per_output_channel(kind):
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    w[3] *= 100  # one loud row must not coarsen the others
    w[5] = 0  # an all-zero row stays zero
    q, scale = quantize_weight(w.to(torch.bfloat16), kind)
    w32 = w.clone()
    quantize_weight(w32, kind)
    assert torch.equal(w32, w), "an fp32 input was modified in place"
    k = KINDS[kind]
    assert q.dtype == k.dtype and q.shape == w.shape and scale.dtype == torch.float32 and scale.shape == (64,)
    assert torch.allclose(q.float().abs().amax(dim=1)[scale > w8a8.SCALE_MIN], torch.tensor(k.qmax))
    assert (q[5].float() == 0).all()
    back = q.float() * scale[:, None]
    others = torch.ones(64, dtype=torch.bool)
    others[3] = False
    assert rel(back[others], w.to(torch.bfloat16).float()[others]) < LAYER_TOLERANCE[kind]


@pytest.mark.parametrize("kind", list(KINDS))
def test_dequantizing_path_is_near_bf16_and_quantizes_the_activations(kind, fresh_routes):
    linear = _linear()
    m = Linear8.from_linear(linear, kind)
    x = _x()
    with torch.no_grad():
        y, ref = m(x), linear(x)
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    assert 0 < rel(y, ref) <= LAYER_TOLERANCE[kind], f"{kind}: {rel(y, ref):.4f} vs bf16"
    # the same weights with bf16 activations give a different result: the activations were quantized
    w = m.weight.float() * m.weight_scale[:, None]
    weight_only = (x.float() @ w.t() + linear.bias.float()).to(torch.bfloat16)
    assert not torch.equal(y, weight_only)
    xq, sx = quantize_rows(x.reshape(-1, 256), KINDS[kind])
    both = ((xq.float() * sx) @ w.t() + linear.bias.float()).reshape(y.shape)
    assert rel(y, both) < KERNEL_TOLERANCE


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("rows", [1, 20])  # 1 row: the adaLN linears (M = batch); int8 pads it to 17
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_formulas_match_the_dequantizing_path(kind, rows, bias, fresh_routes):
    """The kernel branch of forward, run through torch's CPU _scaled_mm/_int_mm (same layout, scales)."""
    m = Linear8.from_linear(_linear(bias), kind)
    x = _x(rows)
    with torch.no_grad():
        slow = m(x)
        m._route = (torch.device("cpu"), "kernel")
        fast = m(x)
    assert fast.shape == slow.shape == (2, rows, 128) and fast.dtype == torch.bfloat16
    assert rel(fast, slow) <= KERNEL_TOLERANCE


def test_dtype_casts_keep_the_8bit_weight_and_float32_scales(fresh_routes):
    m = Linear8.from_linear(_linear(), "fp8")
    with torch.no_grad():
        before = m(_x())
    m.to(torch.float16)  # what DiffusionPipeline.to(dtype) does to every module
    assert m.weight.dtype == torch.float8_e4m3fn and m.weight_scale.dtype == torch.float32
    assert m.bias.dtype == torch.float16
    with torch.no_grad():
        after = m(_x().half())
    assert after.dtype == torch.float16 and rel(after, before) < KERNEL_TOLERANCE


def test_linear8_is_an_nn_linear_holding_only_its_own_tensors():
    """peft wraps it as an nn.Linear (bf16 adapters: compute_dtype); nn.Linear's float weight never exists,
    keys and repr are the 8-bit layer's, and the quantizer does not take it for a Linear to quantize."""
    from krea_lite.quantize import split_linears

    m = Linear8.from_linear(_linear(), "fp8")
    assert isinstance(m, nn.Linear) and m.compute_dtype == torch.bfloat16
    assert list(m.state_dict()) == ["bias", "weight", "weight_scale"] and [n for n, _ in m.named_parameters()] == ["bias"]
    assert m.weight.dtype == torch.float8_e4m3fn and repr(m) == ("Linear8(in_features=256, out_features=128, "
                                                                 "bias=True, scheme=fp8mm)")
    assert split_linears(nn.Sequential(m, _linear()), ())[0] == ["1"]


def test_8bit_input_is_refused_in_one_line(fresh_routes):
    m = Linear8.from_linear(_linear(), "fp8")
    with pytest.raises(KreaLiteError, match="keep that layer in bf16"):
        m(_x().to(torch.float8_e4m3fn))


# --- folders: save -> reload, manifest, bad input --------------------------------------------------


@pytest.mark.parametrize("scheme", W8A8)
def test_reload_reproduces_the_output_exactly(scheme, tiny_source, quantized, fresh_routes):
    folder = quantized(scheme)
    config = json.loads((tiny_source / "transformer" / "config.json").read_text())
    inputs = transformer_inputs(config)
    manifest = json.loads((folder / MANIFEST).read_text())
    with torch.no_grad():
        before = quantize_in_memory(bf16_transformer(tiny_source), scheme)(**inputs)[0]
        reloaded = load_component(folder / "transformer", "transformer", manifest["components"]["transformer"])
        after = reloaded(**inputs)[0]
        again = load_component(folder / "transformer", "transformer", manifest["components"]["transformer"])(**inputs)[0]
    assert torch.equal(before, after) and torch.equal(after, again)
    linears = [m for m in reloaded.modules() if isinstance(m, Linear8)]
    assert len(linears) == len(manifest["components"]["transformer"]["quantized_modules"]) > 0
    assert reloaded.dtype == torch.bfloat16  # diffusers reads the model dtype from its parameters


@pytest.mark.parametrize("scheme", W8A8)
def test_t5_reloads_exactly_and_keeps_wo(scheme, quantized, tiny_source, fresh_routes):
    from transformers import T5EncoderModel

    folder = quantized(scheme)
    info = json.loads((folder / MANIFEST).read_text())["components"]["text_encoder_2"]
    assert info["kept_modules"] and all(m.endswith("DenseReluDense.wo") for m in info["kept_modules"])
    assert info["keep_patterns"] == list(T5_KEEP_BNB) and "casts" in info["keep_reason"]
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    t5 = load_component(folder / "text_encoder_2", "text_encoder_2", info)
    ref = T5EncoderModel.from_pretrained(tiny_source / "text_encoder_2", torch_dtype=torch.bfloat16).eval()
    with torch.no_grad():
        a = t5(ids).last_hidden_state
        b = load_component(folder / "text_encoder_2", "text_encoder_2", info)(ids).last_hidden_state
        r = ref(ids).last_hidden_state
    assert torch.equal(a, b) and torch.isfinite(a).all()
    # The tiny random T5 amplifies quantization error (its layer norms rescale small random weights):
    # weight-only optimum-quanto measures 0.146 (qfloat8), 0.029 (qint8), nf4 0.51; fp8mm 0.147, int8mm 0.046.
    assert 0 < rel(a, r) <= T5_TOLERANCE[scheme]


@pytest.mark.parametrize("scheme", W8A8)
def test_manifest_and_files_describe_the_scheme(scheme, quantized):
    from safetensors import safe_open

    folder = quantized(scheme)
    manifest = verify_checkpoint(folder, full=True)
    t = manifest["components"]["transformer"]
    k = KINDS[KIND[scheme]]
    assert t["scheme"] == scheme and t["backend"] == "krea-lite"
    assert t["requires"] == {"cuda_capability": k.needs, "kernel": k.kernel, "fallback": "dequantize"}
    assert manifest["components"]["text_encoder_2"]["requires"] == t["requires"]
    assert set(t["keep_patterns"]) == set(TRANSFORMER_KEEP) and "proj_out" in t["kept_modules"]
    assert "quantization_config" not in json.loads((folder / "transformer" / "config.json").read_text())
    assert "requires" not in manifest["components"]["vae"]
    dtypes = {}
    for path in sorted((folder / "transformer").glob("*.safetensors")):  # plain safetensors, nothing pickled
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                dtypes[key] = f.get_slice(key).get_dtype()
    some = t["quantized_modules"][0]
    assert dtypes[f"{some}.weight"] == {"fp8mm": "F8_E4M3", "int8mm": "I8"}[scheme]
    assert dtypes[f"{some}.weight_scale"] == "F32"
    assert dtypes["x_embedder.weight"] == "BF16"


def test_folder_with_the_wrong_8bit_dtype_is_refused_in_one_line(quantized, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(quantized("fp8mm"), folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    info = dict(manifest["components"]["transformer"], scheme="int8mm")  # manifest says int8, files hold fp8
    with pytest.raises(KreaLiteError, match=r"stores torch.float8_e4m3fn weights .* expected torch.int8"):
        load_component(folder / "transformer", "transformer", info)


# --- hardware checks --------------------------------------------------------------------------------


def test_cpu_computes_by_dequantizing_and_says_so_once(quantized, fresh_routes, capsys):
    manifest = json.loads((quantized("fp8mm") / MANIFEST).read_text())
    lines = w8a8.check_folder(manifest, "cpu")
    assert [line.split(":")[0] for line in lines] == ["transformer", "text_encoder_2"]
    m = Linear8.from_linear(_linear(), "fp8")
    with torch.no_grad():
        m(_x())
        m(_x())
    assert w8a8.check_folder(manifest, "cpu") == lines
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("krea-lite:")]
    assert len(printed) == 1 and "fp8mm computes by dequantizing on the cpu" in printed[0]


@pytest.mark.parametrize("kind, capability, instead", [
    ("fp8", (8, 6), "int8mm runs natively"),  # Ampere: int8 tensor cores, no fp8
    ("fp8", (7, 5), "nf4 is smaller"),  # Turing: neither
    ("int8", (7, 5), "nf4 is smaller"),
])
def test_card_without_the_instructions_falls_back_in_one_line(kind, capability, instead, monkeypatch, fresh_routes,
                                                              capsys):
    monkeypatch.setattr(w8a8, "_card", lambda device: ("NVIDIA Test Card", capability))
    path, reason = w8a8.route(kind, "cuda:0")
    assert path == "dequantize"
    assert f"{KINDS[kind].scheme} needs CUDA compute capability {KINDS[kind].needs}+" in reason
    assert f"NVIDIA Test Card is {capability[0]}.{capability[1]}" in reason and instead in reason
    manifest = {"components": {"transformer": {"scheme": KINDS[kind].scheme, "quantized_modules": ["a"]},
                               "vae": {"scheme": "copied"}}}
    assert w8a8.check_folder(manifest, "cuda:0") == [f"transformer: {reason}"]
    w8a8.check_folder(manifest, "cuda:0")
    assert capsys.readouterr().out.count("krea-lite:") == 1


@pytest.mark.parametrize("capability, scheme", [((9, 0), "fp8mm"), ((8, 9), "fp8mm"), ((8, 6), "int8mm"),
                                                ((7, 5), "nf4")])
def test_native_scheme_follows_the_capability(capability, scheme, monkeypatch, fresh_routes):
    monkeypatch.setattr(w8a8, "_card", lambda device: ("NVIDIA Test Card", capability))
    monkeypatch.setattr(w8a8, "_probe", lambda name, device: None)  # as if the kernel ran
    assert w8a8.native_scheme("cuda:0")[0] == scheme
    assert w8a8.native_scheme("cpu")[0] == "nf4"


def test_kernel_that_fails_its_probe_falls_back_instead_of_erroring(monkeypatch, fresh_routes):
    """A card new enough on paper, a torch whose kernel cannot run there: a line, no kernel error."""
    monkeypatch.setattr(w8a8, "_card", lambda device: ("NVIDIA Test Card", (9, 0)))
    path, reason = w8a8.route("int8", "cuda:0")  # this torch has no CUDA: the probe's kernel call fails
    assert path == "dequantize" and "cannot run torch._int_mm on NVIDIA Test Card" in reason


@pytest.mark.parametrize("kind", list(KINDS))
def test_probe_accepts_a_working_kernel_and_rejects_a_wrong_one(kind, monkeypatch):
    cpu = torch.device("cpu")  # torch's CPU _scaled_mm / _int_mm stand in for the CUDA kernels
    assert w8a8._probe(kind, cpu) is None
    kernel = "_fp8_mm" if kind == "fp8" else "_int8_mm"
    monkeypatch.setattr(w8a8, kernel, lambda xq, sx, wq, sw, *bias: torch.zeros(xq.shape[0], wq.shape[0]))
    assert w8a8._probe(kind, cpu) == "it returned wrong results for 1 rows"


def test_layers_the_kernel_cannot_take_dequantize(fresh_routes, capsys):
    m = Linear8.from_linear(nn.Linear(40, 24).to(torch.bfloat16), "fp8")
    w8a8._ROUTES[("fp8", "cpu")] = ("kernel", None)  # as if this device had the kernel
    assert m.decide("cpu") == "dequantize"
    assert "not multiples of 16" in capsys.readouterr().out


# --- streaming -----------------------------------------------------------------------------------------


def _w8a8_flux(kind: str):
    from .test_streaming import tiny_flux

    model = tiny_flux(schemes=("bf16",))
    for blocks in (model.transformer_blocks, model.single_transformer_blocks):
        for block in blocks:
            for name, m in list(block.named_modules()):
                if isinstance(m, nn.Linear):
                    block.set_submodule(name, Linear8.from_linear(m, kind))
    return model


def test_leaf_tensors_are_the_plain_buffers():
    from krea_lite.packing import leaf_tensors

    m = Linear8.from_linear(_linear(), "int8")
    assert [id(t) for t in leaf_tensors(m)] == [id(m.bias), id(m.weight), id(m.weight_scale)]
    assert all(type(t) in (torch.Tensor, nn.Parameter) for t in leaf_tensors(m))


@pytest.mark.parametrize("kind", list(KINDS))
def test_streamed_equals_resident_bit_for_bit(kind, fresh_routes):
    from krea_lite.placement import apply_plan

    from .test_streaming import flux_inputs, same_bits, streamed_plan

    model = _w8a8_flux(kind)
    with torch.no_grad():
        ref = model(**flux_inputs())[0]
    pipe = types.SimpleNamespace(transformer=model)
    placement = apply_plan(pipe, streamed_plan(pipe, double=(1, 2, 3), single=(0, 2, 3, 4), prefetch=2), "cpu")
    try:
        with torch.no_grad():
            for _ in range(2):
                assert same_bits(model(**flux_inputs())[0], ref)
    finally:
        placement.close()


# --- GPU tier ------------------------------------------------------------------------------------------

# FLUX shapes: (tokens, in, out): a double block's qkv at 1024² (4096 image + 512 text tokens), the
# single blocks' proj_out (in 15360), and an adaLN modulation linear (one row per image).
FLUX_SHAPES = [(4608, 3072, 3072), (4608, 15360, 3072), (1, 3072, 18432), (512, 3072, 12288)]
GPU_TOLERANCE = {"fp8": 0.01, "int8": 0.005}  # fast accumulation (fp8) / rounding order; see KERNEL_TOLERANCE


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("tokens, fan_in, fan_out", FLUX_SHAPES)
def test_gpu_kernels_match_the_dequantized_reference(kind, tokens, fan_in, fan_out):
    cap = torch.cuda.get_device_capability()
    if cap < KINDS[kind].capability:
        pytest.skip(f"{kind} needs capability {KINDS[kind].needs}, this card is {cap}")
    g = torch.Generator(device="cuda").manual_seed(0)
    linear = nn.Linear(fan_in, fan_out, device="cuda", dtype=torch.bfloat16)
    nn.init.normal_(linear.weight, std=fan_in ** -0.5, generator=g)
    m = Linear8.from_linear(linear, kind)
    assert w8a8.prepare(nn.Sequential(m), "cuda") == {"kernel": 1}
    x = torch.randn(1, tokens, fan_in, device="cuda", generator=g).to(torch.bfloat16)
    with torch.no_grad():
        fast = m(x)
        m._route = (m._route[0], "dequantize")
        slow = m(x)
        ref = linear(x)
    assert torch.isfinite(fast).all()
    assert rel(fast, slow) <= GPU_TOLERANCE[kind], f"kernel vs dequantized {rel(fast, slow):.4f}"
    assert rel(fast, ref) <= LAYER_TOLERANCE[kind]


@pytest.mark.gpu
@requires_cuda
def test_gpu_fp8_runs_its_kernel_at_capability_9():
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs a Hopper-class card (capability 9.0+)")
    assert w8a8.route("fp8", "cuda") == ("kernel", None)
    assert w8a8.route("int8", "cuda") == ("kernel", None)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("scheme", W8A8)
def test_gpu_folder_loads_and_runs_its_kernels(scheme, quantized, tiny_source):
    from krea_lite.pipeline import load_pipeline

    pipe = load_pipeline(quantized(scheme), device="cuda")
    kind = KIND[scheme]
    native = torch.cuda.get_device_capability() >= KINDS[kind].capability
    config = json.loads((tiny_source / "transformer" / "config.json").read_text())
    inputs = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in transformer_inputs(config, 64, 16).items()}
    with torch.no_grad():
        out = pipe.transformer(**inputs)[0]
        paths = {m._route[1] for m in pipe.transformer.modules() if isinstance(m, Linear8)}
        ref = bf16_transformer(tiny_source).to("cuda")(**inputs)[0]
    assert paths == ({"kernel"} if native else {"dequantize"})
    assert torch.isfinite(out).all() and rel(out, ref) <= {"fp8mm": 0.08, "int8mm": 0.03}[scheme]


def test_generate_from_an_fp8mm_folder_on_the_cpu(quantized, tmp_path, fresh_routes):
    from PIL import Image

    from krea_lite.generate import GenerateConfig, generate
    from krea_lite.pipeline import load_pipeline

    pipe = load_pipeline(quantized("fp8mm"), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    (g,) = generate(pipe, ["a red fox in snow"], GenerateConfig(steps=2, width=64, height=64, seed=7), tmp_path)
    image = Image.open(g.path)
    assert image.size == (64, 64) and image.text["scheme_transformer"] == "fp8mm"
    assert len(set(image.convert("L").getdata())) > 1
