"""CPU tier: LoRA on the tiny synthetic model (diffusers' loader and converters, checked first).

Exactness: our bf16 folder + a LoRA == plain diffusers' bf16 pipeline + the same LoRA, bit for bit; on the
quantized bases (bitsandbytes, optimum-quanto, fp8mm/int8mm, gguf) == the dequantized base + the LoRA within
`TOLERANCE`; unload restores the base exactly.
Layouts whose diffusers converters hard-code FLUX.1's real widths are checked at full size on a meta model.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct

import pytest
import torch
from torch import nn

from krea_lite import lora as L
from krea_lite.errors import KreaLiteError
from krea_lite.pipeline import load_pipeline
from krea_lite.synthetic_gguf import gguf_name, write_gguf
from krea_lite.synthetic_lora import lora_units, reference, write_lora
from tests.conftest import requires_cuda
from tests.test_core import transformer_inputs

# Relative error of one transformer forward, quantized base + LoRA vs dequantized base + the same LoRA, on
# the CPU (measured on this tiny model: nf4 0, int8 0.016, qint8 0.008, fp8mm 0.032, int8mm 0.013, gguf 0;
# the base alone errs as much: the LoRA adds nothing of its own). int8, fp8mm and int8mm quantize the
# activations too (fp8 e4m3 rounds each to 3 mantissa bits, int8mm to absmax/127 steps); quanto's int8
# matmul rounds differently; nf4 and gguf dequantize to the very bf16 weight of the reference.
TOLERANCE = {"nf4": 0.0, "int8": 0.03, "qint8": 0.015, "fp8mm": 0.05, "int8mm": 0.02, "gguf": 0.0}
GGUF = "Q4_K"  # the GGUF type of the "gguf" base (a k-quant, as most FLUX .gguf files are)
ATTN = ("*.attn.*",)
DOUBLE = ("transformer_blocks.*",)  # what diffusers' kohya/ComfyUI converters can place at tiny widths


def no_avx512_repack(pipe) -> None:
    """bitsandbytes' AVX512-bf16 CPU path repacks NF4 weights on the first forward, and every state_dict()
    (which diffusers' LoRA loader calls) unpacks them, changing the next output's bits; use the plain kernel."""
    import bitsandbytes as bnb

    for comp in (pipe.transformer, pipe.text_encoder_2):
        for m in comp.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = False


def load(folder):
    pipe = load_pipeline(folder, device="cpu", verify="none")
    pipe.set_progress_bar_config(disable=True)
    no_avx512_repack(pipe)
    return pipe


def out(pipe, inputs):
    with torch.no_grad():
        return pipe.transformer(**inputs)[0]


def clip(pipe):
    ids = pipe.tokenizer(["a red fox"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids).pooler_output


def image(pipe):
    return pipe("a red fox in snow", num_inference_steps=2, width=64, height=64, max_sequence_length=32,
                generator=torch.Generator("cpu").manual_seed(0), output_type="np").images


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def peft_layers(pipe) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for c in (pipe.transformer, pipe.text_encoder) for m in c.modules())


@pytest.fixture(scope="module")
def inputs(tiny_source):
    return transformer_inputs(json.loads((tiny_source / "transformer" / "config.json").read_text()))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return {
        "a": write_lora(d / "style-a.safetensors", "diffusers", rank=4, seed=1, text_encoder=True),
        "b": write_lora(d / "style-b.safetensors", "diffusers", rank=8, seed=2),  # transformer only
        "full": write_lora(d / "full.safetensors", "diffusers", size="full", rank=1, seed=3,
                           targets=("transformer_blocks.0.attn.to_q",)),
    }


@pytest.fixture
def bf16(quantized):
    return load(quantized("bf16"))


@pytest.fixture(scope="module")
def folder(quantized, tiny_source, tmp_path_factory):
    """folder(scheme) -> the tiny folder with that transformer scheme; "gguf": a GGUF file's blocks, kept."""
    from krea_lite.quantize import QuantizeConfig, quantize_pipeline

    made = {}

    def make(scheme):
        if scheme != "gguf":
            return quantized(scheme)
        if not made:
            root = tmp_path_factory.mktemp("lora-gguf")
            made["gguf"] = quantize_pipeline(write_gguf(tiny_source, root / gguf_name(GGUF), GGUF), root / "folder",
                                             QuantizeConfig(text_encoder="bf16", base=str(tiny_source), device="cpu"),
                                             progress=False)
        return made["gguf"]

    return make


# ------------------------------------------------------------------------------- exactness


def test_bf16_folder_plus_lora_equals_plain_diffusers_bit_for_bit(quantized, tiny_source, files, inputs):
    from diffusers import FluxPipeline

    ours = load(quantized("bf16"))
    base_image, base_clip = image(ours), clip(ours)
    rec = L.load_lora(ours, files["a"], scale=0.8)
    ref = FluxPipeline.from_pretrained(tiny_source, dtype=torch.bfloat16)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(files["a"]), adapter_name="a")
    ref.set_adapters("a", 0.8)
    assert rec.modules == {"transformer": 34, "text_encoder": 12}
    assert torch.equal(out(ours, inputs), out(ref, inputs))
    assert torch.equal(clip(ours), clip(ref)) and not torch.equal(clip(ours), base_clip)
    got = image(ours)
    assert (got == image(ref)).all()
    assert not (got == base_image).all(), "the LoRA changed nothing"


@pytest.mark.parametrize("layout, kwargs", [
    ("diffusers", dict(text_encoder=True)),
    ("kohya", dict(targets=DOUBLE, text_encoder=True)),
    ("comfyui", dict(targets=DOUBLE, text_encoder=True)),
    ("kohya-diffusers", dict(targets=ATTN, text_encoder=True)),
    ("xlabs", {}),
])
def test_each_layout_loads_as_its_diffusers_equivalent(layout, kwargs, bf16, inputs, tmp_path):
    """A file in `layout`, through our checks and diffusers' converter, equals plain diffusers loading the
    already-converted reference (A copied to each fused part, B split), bit for bit."""
    path = write_lora(tmp_path / f"{layout}.safetensors", layout, rank=4, seed=5, **kwargs)
    base = out(bf16, inputs)
    L.load_lora(bf16, path)
    got, got_clip = out(bf16, inputs), clip(bf16)
    L.unload_loras(bf16)
    assert torch.equal(out(bf16, inputs), base)
    bf16.load_lora_weights(reference(layout, rank=4, seed=5, **kwargs), adapter_name="ref")
    assert torch.equal(got, out(bf16, inputs)) and not torch.equal(got, base)
    assert torch.equal(got_clip, clip(bf16))


def test_alpha_scales_like_diffusers(bf16, inputs, tmp_path):
    """kohya's alpha is folded into A by diffusers' converter; a diffusers-layout alpha becomes peft's scale.
    alpha = rank / 2 both ways is the same adapter (a power of two: the folding rounds nothing)."""
    kohya = write_lora(tmp_path / "k.safetensors", "kohya-diffusers", rank=4, seed=6, targets=ATTN, alpha=2.0)
    diff = write_lora(tmp_path / "d.safetensors", "diffusers", rank=4, seed=6, targets=ATTN, alpha=2.0)
    one = write_lora(tmp_path / "one.safetensors", "diffusers", rank=4, seed=6, targets=ATTN)
    L.load_lora(bf16, kohya)
    a = out(bf16, inputs)
    L.use_loras(bf16, [diff])
    b = out(bf16, inputs)
    L.use_loras(bf16, [one])
    full = out(bf16, inputs)
    L.use_loras(bf16, [(one, 0.5)])
    assert torch.equal(a, b) and torch.equal(b, out(bf16, inputs)) and not torch.equal(a, full)


def _meta(size: str):
    from krea_lite.synthetic import _configs, _meta_model

    cfg = _configs(size)
    return _meta_model("transformer", cfg["transformer"]), _meta_model("text_encoder", cfg["text_encoder"])


@pytest.mark.parametrize("layout, kwargs", [
    ("diffusers", dict(text_encoder=True)),
    ("kohya", dict(text_encoder=True, t5=True)),
    ("comfyui", dict(text_encoder=True, t5=True)),
    ("kohya-diffusers", dict(targets=ATTN, text_encoder=True)),
    ("xlabs", {}),
])
def test_full_size_layouts_convert_to_the_real_modules(layout, kwargs, tmp_path):
    """diffusers' kohya/ComfyUI converters hard-code 3072/12288 and 19/38 blocks: check them at full size
    against FluxTransformer2DModel and CLIP-L built on the meta device (rank 2 keeps the files small)."""
    transformer, text_encoder = _meta("full")
    path = write_lora(tmp_path / f"{layout}.safetensors", layout, size="full", rank=2, seed=7, **kwargs)
    match = L.match_lora(L.read_lora_file(path), transformer, text_encoder)
    expected = {k: v for k, v in reference(layout, size="full", rank=2, seed=7, text_encoder=kwargs.get(
        "text_encoder", False), targets=kwargs.get("targets")).items()}
    clip_keys = {k.replace("text_encoder.text_model.", "text_encoder.") for k in expected}
    assert not match.unmatched and match.ranks == (2,)
    assert set(match.state) == clip_keys
    for k, v in expected.items():
        assert torch.equal(match.state[k.replace("text_encoder.text_model.", "text_encoder.")], v), k
    n_parts = sum(len(u.parts) for u in lora_units(layout, "full", kwargs.get("targets"), kwargs.get("text_encoder",
                                                                                                      False)))
    assert sum(match.modules.values()) == n_parts
    if layout in ("diffusers", "kohya", "comfyui"):
        assert match.modules["transformer"] == 19 * 12 + 38 * 5  # every attention and MLP linear of every block
    if kwargs.get("t5"):
        assert match.file.t5_modules == 24 * 7 and "T5 modules are not applied" in match.summary()


# --------------------------------------------------------------------------- quantized bases


def dequantized(pipe):
    """The same pipeline with every quantized Linear replaced by a bf16 nn.Linear of its dequantized weight."""
    import bitsandbytes as bnb

    from krea_lite.gguf_file import GGUFLinear, dequantize
    from krea_lite.w8a8 import Linear8

    for component in (pipe.transformer,):
        for name, m in list(component.named_modules()):
            if isinstance(m, Linear8):
                w = m.weight.float() * m.weight_scale[:, None]
            elif isinstance(m, GGUFLinear):
                w = dequantize(m.weight.as_tensor(), m.weight.quant_type)
            elif isinstance(m, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
            elif isinstance(m, bnb.nn.Linear8bitLt):
                w = m.weight.CB.float() * m.weight.SCB.float()[:, None] / 127  # row-wise absmax int8
            elif type(m).__module__.startswith("optimum.quanto"):
                w = m.qweight.dequantize()
            else:
                continue
            linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=torch.bfloat16)
            linear.weight = nn.Parameter(w.to(torch.bfloat16), requires_grad=False)
            if m.bias is not None:
                linear.bias = nn.Parameter(m.bias.data.to(torch.bfloat16), requires_grad=False)
            component.set_submodule(name, linear)
    vars(pipe).pop("load_lora_weights", None)  # now a bf16 transformer: diffusers' own loader applies
    vars(pipe.transformer).pop("fuse_lora", None)
    return pipe


@pytest.mark.parametrize("scheme", ["nf4", "int8", "qint8"])
def test_quantized_base_plus_lora_matches_dequantized_base_plus_lora(scheme, quantized, files, inputs):
    q, d = load(quantized(scheme)), dequantized(load(quantized(scheme)))
    q_base, d_base = out(q, inputs), out(d, inputs)
    L.load_lora(q, files["a"])
    L.load_lora(d, files["a"])
    q_lora, d_lora = out(q, inputs), out(d, inputs)
    err = rel(q_lora, d_lora)
    assert err <= TOLERANCE[scheme], f"{scheme}: {err:.4f}"
    assert err <= 1.25 * rel(q_base, d_base) + 1e-3, "the LoRA adds error beyond the base's own kernel error"
    assert rel(d_lora, d_base) > 0.05, "the LoRA changed nothing"
    q.unload_lora_weights()
    assert torch.equal(out(q, inputs), q_base) and peft_layers(q) == 0


@pytest.mark.parametrize("scheme", ["fp8mm", "int8mm", "gguf"])
def test_8bit_matmul_and_gguf_bases_take_loras_like_the_dequantized_base(scheme, folder, files, inputs):
    """krea-lite's own layers (Linear8, GGUFLinear) get peft's unmerged LoRA Linear: base + LoRA == the
    dequantized base + the same LoRA through diffusers within TOLERANCE, at every set_adapters weight; at
    weight 0 and after unload_lora_weights the base output comes back bit for bit."""
    q, d = load(folder(scheme)), dequantized(load(folder(scheme)))
    keys = list(q.transformer.state_dict())
    q_base, d_base = out(q, inputs), out(d, inputs)
    rec = L.load_lora(q, files["a"])
    d.load_lora_weights(str(files["a"]), adapter_name="ref")
    assert rec.modules == {"transformer": 34, "text_encoder": 12}
    layer = q.transformer.transformer_blocks[0].attn.to_q
    assert type(layer.base_layer).__name__ == {"gguf": "GGUFLinear"}.get(scheme, "Linear8")
    assert {t.dtype for t in L.adapter_tensors(q.transformer)} == {torch.bfloat16}  # not fp8: compute_dtype
    x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.no_grad():
        a, b = layer.lora_A[rec.adapter], layer.lora_B[rec.adapter]
        assert torch.equal(layer(x), layer.base_layer(x) + b(a(x)) * layer.scaling[rec.adapter])
    ys = {}
    for w in (1.0, 0.5, -0.7):
        q.set_adapters(rec.adapter, w)
        d.set_adapters("ref", w)
        ys[w], d_lora = out(q, inputs), out(d, inputs)
        err = rel(ys[w], d_lora)
        assert err <= TOLERANCE[scheme], f"{scheme} at {w}: {err:.4f}"
        assert err <= 1.25 * rel(q_base, d_base) + 1e-3, "the LoRA adds error beyond the base's own kernel error"
        assert rel(ys[w], q_base) > 0.05 and rel(d_lora, d_base) > 0.05, "the LoRA changed nothing"
    plain = load(folder(scheme))
    if scheme != "gguf":  # diffusers' own loader takes Linear8 too
        plain.load_lora_weights(str(files["a"]), adapter_name="plain")
        assert torch.equal(out(plain, inputs), ys[1.0])
    else:  # on gguf its shape-expansion step would fail midway: refused in one line before anything loads
        with pytest.raises(KreaLiteError, match=r"load_lora_weights refused: .*krea_lite\.lora\.load_lora") as e:
            plain.load_lora_weights(str(files["a"]), adapter_name="plain")
        assert "\n" not in str(e.value) and peft_layers(plain) == 0 and list(plain.transformer.state_dict()) == keys
    q.set_adapters(rec.adapter, 0.0)
    assert torch.equal(out(q, inputs), q_base)
    q.unload_lora_weights()
    assert torch.equal(out(q, inputs), q_base) and peft_layers(q) == 0 and list(q.transformer.state_dict()) == keys


# ------------------------------------------------------------------------- the adapter API


def test_set_adapters_disable_enable_delete_and_unload(bf16, files, inputs):
    base, base_clip = out(bf16, inputs), clip(bf16)
    a = L.load_lora(bf16, files["a"])
    only_a, clip_a = out(bf16, inputs), clip(bf16)
    b = L.load_lora(bf16, files["b"])
    assert [r.adapter for r in L.active_loras(bf16)] == [a.adapter, b.adapter]  # load_lora stacks
    both = out(bf16, inputs)
    bf16.set_adapters([a.adapter, b.adapter], [0.0, 1.0])
    only_b = out(bf16, inputs)
    assert torch.equal(clip(bf16), base_clip)  # b has no CLIP part; a is at 0
    bf16.set_adapters([a.adapter, b.adapter], [1.0, 0.0])
    assert torch.equal(out(bf16, inputs), only_a) and torch.equal(clip(bf16), clip_a)
    assert len({tuple(t.flatten()[:64].tolist()) for t in (base, only_a, only_b, both)}) == 4

    # one layer is base + w * B(A(x)): the side branch scales linearly with the adapter weight
    layer = bf16.transformer.transformer_blocks[0].attn.to_q
    x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(0)).bfloat16()
    ys = {}
    for w in (0.0, 0.5, 1.0):
        bf16.set_adapters([a.adapter], [w])
        with torch.no_grad():
            ys[w] = layer(x).float()
    torch.testing.assert_close(ys[1.0] - ys[0.0], 2 * (ys[0.5] - ys[0.0]), rtol=0.02, atol=0.02)

    bf16.set_adapters([a.adapter, b.adapter], [1.0, 1.0])
    bf16.disable_lora()
    assert torch.equal(out(bf16, inputs), base) and L.active_loras(bf16) == [] and L.lora_metadata(bf16) == {}
    bf16.enable_lora()
    assert torch.equal(out(bf16, inputs), both)
    bf16.delete_adapters(a.adapter)
    assert bf16.get_list_adapters() == {"transformer": [b.adapter]}
    assert [r.adapter for r in L.active_loras(bf16)] == [b.adapter]
    bf16.unload_lora_weights()
    assert torch.equal(out(bf16, inputs), base) and torch.equal(clip(bf16), base_clip) and peft_layers(bf16) == 0
    assert L.active_loras(bf16) == []


def test_switching_loras_keeps_the_base_and_reuses_loaded_files(bf16, files):
    weights = {n: p for n, p in bf16.transformer.named_parameters()}
    ptrs = {n: p.data_ptr() for n, p in weights.items()}
    base = image(bf16)
    (ra,) = L.use_loras(bf16, [(files["a"], 1.0)])
    img_a = image(bf16)
    (rb,) = L.use_loras(bf16, [files["b"]])
    assert bf16.get_list_adapters() == {"transformer": [rb.adapter]}  # a was deleted (keep_loaded=False)
    img_b = image(bf16)
    L.use_loras(bf16, [files["a"], files["b"]], keep_loaded=True)
    L.use_loras(bf16, [files["a"]], keep_loaded=True)
    assert set(bf16.get_list_adapters()["transformer"]) == {ra.adapter, rb.adapter}  # b kept, inactive
    assert (image(bf16) == img_a).all() and not (img_a == img_b).all() and not (img_a == base).all()
    (again,) = L.use_loras(bf16, [(files["a"], 0.5)], keep_loaded=True)
    assert again.adapter == ra.adapter and again.scale == 0.5  # same sha256: not loaded again
    assert L.use_loras(bf16, []) == [] and peft_layers(bf16) == 0
    assert (image(bf16) == base).all()
    after = dict(bf16.transformer.named_parameters())
    assert after.keys() == weights.keys()
    assert all(after[n] is weights[n] and after[n].data_ptr() == ptrs[n] for n in weights)


def test_png_metadata_lists_each_lora(bf16, files, tmp_path):
    from PIL import Image

    from krea_lite.generate import GenerateConfig, generate

    L.use_loras(bf16, [(files["a"], 0.75), (files["b"], -0.5)])
    (g,) = generate(bf16, ["a red fox"], GenerateConfig(steps=1, width=64, height=64, max_sequence_length=32),
                    tmp_path)
    listed = json.loads(Image.open(g.path).text["loras"])
    assert listed == [
        {"file": "style-a.safetensors", "sha256": hashlib.sha256(files["a"].read_bytes()).hexdigest(), "scale": 0.75},
        {"file": "style-b.safetensors", "sha256": hashlib.sha256(files["b"].read_bytes()).hexdigest(), "scale": -0.5},
    ]
    L.use_loras(bf16, [])
    (g,) = generate(bf16, ["a red fox"], GenerateConfig(steps=1, width=64, height=64, max_sequence_length=32),
                    tmp_path / "none")
    assert "loras" not in Image.open(g.path).text


def test_lora_matching_part_of_the_model_says_how_many_modules_it_changed(bf16, files, tmp_path, inputs):
    from safetensors.torch import load_file, save_file

    state = load_file(files["b"])
    for i in (5, 6):  # the tiny model has blocks 0 and 1
        state[f"transformer.transformer_blocks.{i}.attn.to_q.lora_A.weight"] = torch.zeros(8, 256, dtype=torch.bfloat16)
        state[f"transformer.transformer_blocks.{i}.attn.to_q.lora_B.weight"] = torch.zeros(256, 8, dtype=torch.bfloat16)
    path = tmp_path / "partial.safetensors"
    save_file(state, path)
    rec = L.load_lora(bf16, path)
    assert rec.modules == {"transformer": 34, "text_encoder": 0}
    assert "changes 34 modules" in rec.summary()
    assert "matches only part of the model: 2 of its 36 modules are not in it" in rec.summary()
    assert "transformer.transformer_blocks.5.attn.to_q" in rec.summary()


@pytest.mark.parametrize("scheme", ["nf4", "fp8mm", "int8mm", "gguf"])
def test_fuse_lora_refuses_on_a_quantized_base_and_works_on_bf16(scheme, folder, files, inputs, bf16):
    import types

    q = load(folder(scheme))
    L.load_lora(q, files["a"])
    before = out(q, inputs)
    with pytest.raises(KreaLiteError) as e:
        q.fuse_lora()
    assert "\n" not in str(e.value) and "requantize" in str(e.value) and f"({scheme})" in str(e.value)
    assert torch.equal(out(q, inputs), before) and q._merged_adapters == set()
    assert type(q).__name__ == "FluxPipeline" and type(q.transformer).__name__ == "FluxTransformer2DModel"
    assert L._quantized(types.SimpleNamespace(transformer=q.transformer))  # no manifest: told by its layers

    L.load_lora(bf16, files["a"])
    unfused = out(bf16, inputs)
    bf16.fuse_lora()  # bf16 merges exactly up to rounding: allowed
    assert rel(out(bf16, inputs), unfused) < 0.02


# ------------------------------------------------------------------------------------ bad input


def _write_raw(path, header: dict, data: bytes = b"") -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _lora_state(**extra):
    g = torch.Generator().manual_seed(0)
    sd = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 256, generator=g).bfloat16(),
          "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(256, 4, generator=g).bfloat16()}
    sd.update(extra)
    return sd


def _save(path, state):
    from safetensors.torch import save_file

    save_file(state, path)


def _bad(kind: str, tmp_path, files):
    """(path, expected substring) for one kind of bad LoRA input."""
    p = tmp_path / f"{kind}.safetensors"
    if kind == "missing":
        return tmp_path / "nowhere.safetensors", "does not exist"
    if kind == "folder":
        p.mkdir()
        return p, "is a folder"
    if kind == "empty":
        p.write_bytes(b"")
        return p, "too short"
    if kind == "pickle":
        p = tmp_path / "lora.pt"
        p.write_bytes(pickle.dumps({}, protocol=2))  # 6 bytes: shorter than a safetensors length field
        return p, "never unpickles"
    if kind == "torch-zip":
        p = tmp_path / "lora.bin"
        torch.save({"w": torch.zeros(2)}, p)
        return p, "PyTorch zip checkpoint"
    if kind == "truncated":
        data = files["a"].read_bytes()
        p.write_bytes(data[: len(data) - 1000])
        return p, "is truncated"
    if kind == "header-length":
        p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
        return p, "truncated or not a safetensors file"
    if kind == "corrupt-header":
        p.write_bytes(struct.pack("<Q", 12) + b'{"a": [1, 2' + b" " + b"\0" * 8)
        return p, "corrupt safetensors header"
    if kind == "bad-entry":
        _write_raw(p, {"x.lora_A.weight": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
        return p, "corrupt safetensors header (entry 'x.lora_A.weight')"
    if kind == "not-a-lora":
        _save(p, {"x_embedder.weight": torch.zeros(256, 64), "x_embedder.bias": torch.zeros(256)})
        return p, "holds no LoRA tensors"
    if kind == "sdxl":
        _save(p, {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight":
                  torch.zeros(4, 640), "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up"
                  ".weight": torch.zeros(640, 4), "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
                  torch.zeros(4, 1280), "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 4)})
        return p, "is a LoRA for SDXL"
    if kind == "full-size-flux":
        return files["full"], "is 256 -> 256 in this model but 3072 -> 3072 in the LoRA"
    if kind == "flux-fill":
        _save(p, _lora_state(**{"transformer.x_embedder.lora_A.weight": torch.zeros(4, 384),
                                "transformer.x_embedder.lora_B.weight": torch.zeros(256, 4)}))
        return p, "x_embedder takes 384 input channels"
    if kind == "rank-mismatch":
        sd = _lora_state()
        sd["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"] = torch.zeros(256, 3)
        _save(p, sd)
        return p, "rank mismatch"
    if kind == "half-pair":
        sd = _lora_state()
        del sd["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
        sd["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"] = torch.zeros(256, 4)
        _save(p, sd)
        return p, "tensor: the file is incomplete"
    if kind == "matches-nothing":
        _save(p, {"transformer.not_a_module.lora_A.weight": torch.zeros(4, 8),
                  "transformer.not_a_module.lora_B.weight": torch.zeros(8, 4)})
        return p, "none of its 1 modules exists in this FLUX.1 pipeline (first: 'transformer.not_a_module')"
    if kind == "nan":
        sd = _lora_state()
        sd["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"][0, 0] = float("nan")
        _save(p, sd)
        return p, "NaN or infinite"
    if kind == "integer":
        _save(p, _lora_state(**{"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.zeros(4, 256,
                                                                                                      dtype=torch.int8)}))
        return p, "not floating point"
    if kind == "dora":
        _save(p, _lora_state(**{"transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": torch.ones(256)}))
        return p, "is a DoRA"
    if kind == "lokr":
        _save(p, {"lycoris_double_blocks_0_img_attn_qkv.lokr_w1": torch.zeros(4, 4),
                  "lycoris_double_blocks_0_img_attn_qkv.lokr_w2": torch.zeros(4, 4)})
        return p, "LoKr/LoHa"
    if kind == "control":
        _save(p, {"double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(4, 256),
                  "double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(768, 4),
                  "double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(128)})
        return p, "FLUX Control LoRA"
    if kind == "tiny-kohya-single-blocks":  # diffusers' converter hard-codes the real single-block widths
        return write_lora(p, "kohya", rank=4), "converter cannot read its kohya keys"
    if kind == "kohya-diffusers-mlp":  # diffusers' mixture converter places attention layers only
        return write_lora(p, "kohya-diffusers", rank=4, targets=("transformer_blocks.*.ff.*",)), "not a linear layer"
    raise AssertionError(kind)


BAD = ["missing", "folder", "empty", "pickle", "torch-zip", "truncated", "header-length", "corrupt-header",
       "bad-entry", "not-a-lora", "sdxl", "full-size-flux", "flux-fill", "rank-mismatch", "half-pair",
       "matches-nothing", "nan", "integer", "dora", "lokr", "control", "tiny-kohya-single-blocks",
       "kohya-diffusers-mlp"]


@pytest.fixture(scope="module")
def shared_bf16(quantized, inputs):
    pipe = load(quantized("bf16"))
    return pipe, out(pipe, inputs), clip(pipe)


@pytest.mark.parametrize("kind", BAD)
def test_bad_lora_is_one_line_naming_the_file_and_loads_nothing(kind, shared_bf16, files, tmp_path, inputs):
    pipe, base, base_clip = shared_bf16
    path, expected = _bad(kind, tmp_path, files)
    for attempt in (lambda: L.load_lora(pipe, path), lambda: L.use_loras(pipe, [(files["b"], 1.0), path])):
        with pytest.raises(KreaLiteError) as e:
            attempt()
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and expected in msg, msg
        assert not L._adapters(pipe) and peft_layers(pipe) == 0  # nothing half-loaded
    assert torch.equal(out(pipe, inputs), base) and torch.equal(clip(pipe), base_clip)


def test_a_failure_inside_diffusers_removes_the_half_made_adapter(bf16, files, inputs, monkeypatch):
    base = out(bf16, inputs)
    a = L.load_lora(bf16, files["a"])
    only_a = out(bf16, inputs)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure after the transformer part was loaded")

    monkeypatch.setattr(bf16, "load_lora_into_text_encoder", broken)
    second = write_lora(files["a"].parent / "second.safetensors", "diffusers", rank=4, seed=9, text_encoder=True)
    with pytest.raises(KreaLiteError, match="nothing of it was kept") as e:
        L.load_lora(bf16, second)
    assert "\n" not in str(e.value) and "simulated failure" in str(e.value)
    assert bf16.get_list_adapters() == {"transformer": [a.adapter], "text_encoder": [a.adapter]}
    assert [r.adapter for r in L.active_loras(bf16)] == [a.adapter]
    assert torch.equal(out(bf16, inputs), only_a)
    with pytest.raises(KreaLiteError, match="nothing of it was kept"):
        L.use_loras(bf16, [second])
    assert torch.equal(out(bf16, inputs), only_a)
    L.unload_loras(bf16)
    with pytest.raises(KreaLiteError, match="nothing of it was kept"):  # no adapter before: no LoRA layer after
        L.load_lora(bf16, second)
    assert peft_layers(bf16) == 0 and torch.equal(out(bf16, inputs), base)


# ------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize("text, path, scale", [
    ("style.safetensors", "style.safetensors", 1.0),
    ("style.safetensors:0.8", "style.safetensors", 0.8),
    ("style.safetensors:-1.5e-1", "style.safetensors", -0.15),
    (r"C:\loras\style.safetensors", r"C:\loras\style.safetensors", 1.0),
    (r"C:\loras\style.safetensors:2", r"C:\loras\style.safetensors", 2.0),
    ("a:b.safetensors", "a:b.safetensors", 1.0),
    ("style.safetensors:x", "style.safetensors:x", 1.0),
])
def test_parse_lora_arg(text, path, scale):
    spec = L.parse_lora_arg(text)
    assert str(spec.path) == path and spec.scale == scale


@pytest.mark.parametrize("text", ["style.safetensors:nan", "style.safetensors:inf", "style.safetensors:-Infinity", ""])
def test_parse_lora_arg_refuses_scales_that_are_not_finite(text):
    with pytest.raises(KreaLiteError) as e:
        L.parse_lora_arg(text)
    assert "\n" not in str(e.value) and ("finite" in str(e.value) or "needs a file" in str(e.value))


def test_cli_generate_with_loras(quantized, files, tmp_path, capsys):
    from PIL import Image

    from krea_lite.cli import main

    args = ["generate", "a red fox", "--model", str(quantized("bf16")), "--steps", "1", "--width", "64", "--height",
            "64", "--max-sequence-length", "32", "--device", "cpu", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "with"), "--lora", f"{files['a']}:0.5", "--lora", str(files["b"])]) == 0
    printed = capsys.readouterr().out
    assert "LoRA style-a.safetensors (diffusers/peft, rank 4, scale 0.5): changes 46 modules" in printed
    assert "LoRA style-b.safetensors (diffusers/peft, rank 8, scale 1): changes 34 modules" in printed
    (png,) = (tmp_path / "with").glob("*.png")
    listed = json.loads(Image.open(png).text["loras"])
    assert [(x["file"], x["scale"]) for x in listed] == [("style-a.safetensors", 0.5), ("style-b.safetensors", 1.0)]
    assert main([*args, "--out", str(tmp_path / "without")]) == 0
    (plain,) = (tmp_path / "without").glob("*.png")
    assert "loras" not in Image.open(plain).text and plain.read_bytes() != png.read_bytes()


@pytest.mark.parametrize("lora, expected", [
    ("{a}:nan", "must be a finite number"),
    ("{a}:inf", "must be a finite number"),
    ("{dir}/missing.safetensors:0.5", "does not exist"),
    ("{a}", "same file as"),  # given twice
])
def test_cli_bad_lora_fails_before_the_model_loads(lora, expected, quantized, files, tmp_path, capsys, monkeypatch):
    from krea_lite import pipeline
    from krea_lite.cli import main

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --lora was checked")

    monkeypatch.setattr(pipeline, "load_pipeline", no_load)
    value = lora.format(a=files["a"], dir=tmp_path)
    extra = ["--lora", str(files["a"])] if expected == "same file as" else []
    rc = main(["generate", "p", "--model", str(quantized("bf16")), "--device", "cpu", *extra, "--lora", value])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and expected in err and "\n" not in err


# --------------------------------------------------------------------------- placed pipelines


def tight_plan(pipe):
    """The plan for the smallest budget that fits: streams every block it can (found by bisection)."""
    from krea_lite.plan import measure, plan_for_budget

    sizes = measure(pipe)

    def fits(budget):
        try:
            return plan_for_budget(sizes, budget, width=64, height=64)
        except KreaLiteError:
            return None

    lo, hi = 1, 64 << 30
    while hi - lo > 1 << 12:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    plan = fits(hi)
    assert plan.streamed_double or plan.streamed_single, "the tight plan streams nothing"
    return plan


@pytest.mark.parametrize("scheme", ["bf16", "nf4", "fp8mm", "int8mm", "gguf"])
def test_lora_on_a_placed_pipeline_equals_lora_on_the_unplaced_one(scheme, folder, files, inputs):
    from krea_lite.placement import apply_plan

    ref = load(folder(scheme))
    base_image = image(ref)
    ref_rec = L.load_lora(ref, files["a"], 0.8)
    ref_out, ref_image = out(ref, inputs), image(ref)

    pipe = load(folder(scheme))
    placement = apply_plan(pipe, tight_plan(pipe), "cpu")
    try:
        keys = set(pipe.transformer.state_dict())
        rec = L.load_lora(pipe, files["a"], 0.8)
        assert rec.modules == ref_rec.modules  # every block got its adapter, streamed or not
        assert torch.equal(out(pipe, inputs), ref_out)
        assert (image(pipe) == ref_image).all()
        pipe.disable_lora()
        assert (image(pipe) == base_image).all()
        pipe.enable_lora()
        assert (image(pipe) == ref_image).all()
        pipe.unload_lora_weights()
        assert (image(pipe) == base_image).all() and set(pipe.transformer.state_dict()) == keys
    finally:
        placement.close()


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("scheme", ["nf4", "bf16", "fp8mm", "int8mm", "gguf"])
def test_lora_on_a_tightly_placed_cuda_pipeline_equals_resident(scheme, folder, files, inputs):
    """On CUDA: a LoRA loaded after a tight placement (blocks streamed) == the same LoRA on the resident
    pipeline, bit for bit, through peft's side branch and through the fused one; its A/B live on the GPU and
    are never streamed."""
    from krea_lite.pipeline import place

    pipe = load_pipeline(folder(scheme), device="cuda", verify="none")  # no budget: resident
    pipe.set_progress_bar_config(disable=True)
    gpu_inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()}
    L.load_lora(pipe, files["a"], 0.8)
    ref_out, ref_image = out(pipe, gpu_inputs), image(pipe)
    assert L.fused_side_branch(pipe) > 0
    ref_fused = out(pipe, gpu_inputs)
    assert rel(ref_fused, ref_out) < FUSED_TOLERANCE[scheme]
    L.fused_side_branch(pipe, enable=False)
    plan = tight_plan(pipe)  # the smallest budget that holds the adapter's bytes too, measured while it is loaded
    L.unload_loras(pipe)
    base_image = image(pipe)
    place(pipe, plan)
    L.load_lora(pipe, files["a"], 0.8)
    assert all(t.device.type == "cuda" for t in L.adapter_tensors(pipe.transformer))
    assert torch.equal(out(pipe, gpu_inputs), ref_out)
    assert (image(pipe) == ref_image).all()
    L.fused_side_branch(pipe)
    assert torch.equal(out(pipe, gpu_inputs), ref_fused)
    L.fused_side_branch(pipe, enable=False)
    L.unload_loras(pipe)
    assert (image(pipe) == base_image).all()


@pytest.mark.parametrize("scheme", ["bf16", "nf4", "fp8mm", "gguf"])
def test_lora_loaded_before_placement_gives_the_same_image_placed(scheme, folder, files, inputs):
    """A LoRA already on the pipeline when it is placed travels with its blocks: placed == unplaced."""
    from krea_lite.placement import apply_plan

    pipe = load(folder(scheme))
    L.load_lora(pipe, files["a"], 0.8)
    ref_out, ref_image = out(pipe, inputs), image(pipe)
    placement = apply_plan(pipe, tight_plan(pipe), "cpu")
    try:
        assert torch.equal(out(pipe, inputs), ref_out)
        assert (image(pipe) == ref_image).all()
    finally:
        placement.close()
    assert (image(pipe) == ref_image).all()


def test_full_size_bfl_control_lora_is_refused_before_conversion(tmp_path):
    path = write_lora(tmp_path / "control.safetensors", "bfl-control", size="full", rank=2)  # diffusers splits A too
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    converted, _ = FluxPipeline.lora_state_dict(load_file(path), return_alphas=True)  # diffusers reads it ...
    assert any(".norm_q." in k for k in converted)
    with pytest.raises(KreaLiteError, match="is a FLUX Control LoRA") as e:  # ... krea-lite refuses it up front
        L.read_lora_file(path)
    assert "\n" not in str(e.value)


def test_loras_that_do_not_fit_the_placement_are_removed_again(bf16, files, inputs, monkeypatch):
    """When the re-plan for the new adapters fails (they do not fit the budget), nothing of them stays."""
    from krea_lite import pipeline

    L.use_loras(bf16, [files["a"]])
    before = out(bf16, inputs)

    def no_room(pipe):
        raise KreaLiteError("the VRAM budget of 1.00 GiB is too small")

    monkeypatch.setattr(pipeline, "fit_adapters", no_room)
    with pytest.raises(KreaLiteError, match=r"LoRA adapters do not fit .* they were not kept") as e:
        L.use_loras(bf16, [files["a"], files["b"]], keep_loaded=True)
    assert "\n" not in str(e.value)
    assert [r.path for r in L.active_loras(bf16)] == [files["a"]]
    assert len(bf16.transformer.peft_config) == 1
    assert torch.equal(out(bf16, inputs), before)


def test_plan_with_lora_shows_the_adapters_resident(quantized, files, capsys):
    from krea_lite.cli import main

    assert main(["plan", "--model", str(quantized("nf4")), "--vram-gb", "8", "--lora", f"{files['b']}:0.5"]) == 0
    table = capsys.readouterr().out
    assert "LoRA adapters (never streamed)" in table
    assert main(["plan", "--model", str(quantized("nf4")), "--vram-gb", "8"]) == 0
    assert "LoRA adapters" not in capsys.readouterr().out


# Fused side branch vs peft's, one whole transformer forward: each layer differs by bf16 rounding only (rel
# <= 2^-7, measured 0.003 on every base), but fp8mm/int8mm quantize the next layer's input, where a rounding
# difference can move a value to the next 8-bit step: measured bf16/nf4/gguf <= 0.006, int8mm 0.011, fp8mm 0.024.
FUSED_TOLERANCE = {"bf16": 1e-2, "nf4": 1e-2, "gguf": 1e-2, "int8mm": 0.02, "fp8mm": 0.05}


@pytest.mark.parametrize("scheme", ["bf16", "nf4", "fp8mm", "int8mm", "gguf"])
def test_fused_side_branch_follows_peft_and_switches_back(scheme, folder, files, inputs, monkeypatch):
    """The opt-in fused side branch gives peft's output up to bf16 rounding (per layer; through the model
    within FUSED_TOLERANCE), follows set_adapters and disable_lora, and enable=False restores peft's forward."""
    from peft.tuners.lora import LoraLayer

    pipe = load(folder(scheme))
    base = out(pipe, inputs)
    L.use_loras(pipe, [(files["a"], 0.8), (files["b"], 0.5)])
    peft_out = out(pipe, inputs)
    layers = [m for m in pipe.transformer.modules() if isinstance(m, LoraLayer)]
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 16, m.in_features, generator=g).bfloat16() for m in layers]
    with torch.no_grad():
        peft_ys = [m(x) for m, x in zip(layers, xs, strict=True)]
    before = {id(m): set(vars(m)) for m in pipe.transformer.modules()}
    assert L.fused_side_branch(pipe) == peft_layers(pipe) > 0

    def not_peft(*_a, **_k):
        raise AssertionError("the fused path fell back to peft's forward")

    for cls in {type(m) for m in layers}:  # the fused path must run, not fall back (peft's wrappers are in training mode)
        monkeypatch.setattr(cls, "forward", not_peft)
    with torch.no_grad():
        for m, x, y in zip(layers, xs, peft_ys, strict=True):
            got = m(x)
            assert rel(got, y) <= 2**-7 and (got.float() - y.float()).abs().max() <= 2**-6 * y.float().abs().max()
        fused = out(pipe, inputs)
    monkeypatch.undo()  # peft's forward again, for the fallbacks below
    added = {k for m in pipe.transformer.modules() for k in set(vars(m)) - before[id(m)]}
    assert added == {"forward"}  # nothing cached per layer: no copies of the adapters
    assert not torch.equal(fused, base) and rel(fused, peft_out) < FUSED_TOLERANCE[scheme]
    pipe.set_adapters([L.active_loras(pipe)[0].adapter], [1.0])  # one adapter, another scale
    one = out(pipe, inputs)
    L.fused_side_branch(pipe, enable=False)
    assert rel(one, out(pipe, inputs)) < FUSED_TOLERANCE[scheme]
    L.fused_side_branch(pipe)
    pipe.disable_lora()
    assert torch.equal(out(pipe, inputs), base)
    pipe.enable_lora()
    L.fused_side_branch(pipe, enable=False)
    assert not any("forward" in vars(m) for m in pipe.transformer.modules())
