"""ComfyUI / Forge single files as sources: detection from the header, each layout kept as stored and
checked against the format's own arithmetic (fp8 * scale; bitsandbytes' dequantize_4bit), encoders
equal to the synthetic originals, the whole path from ComfyUI-style files to an image, and one-line
errors for wrong inputs that leave nothing behind."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from krea_lite.checkpoint import MANIFEST
from krea_lite.errors import KreaLiteError
from krea_lite.formats import sniff_file
from krea_lite.quantize import QuantizeConfig, quantize_pipeline
from krea_lite.source import SWAPPED, bfl_layout
from krea_lite.synthetic_comfy import COMFY_PREFIX, FILES, write_comfy_files, write_nf4

GEN = dict(num_inference_steps=2, width=64, height=64, output_type="latent")


@pytest.fixture(scope="session")
def comfy(tiny_source, tmp_path_factory):
    files = write_comfy_files(tiny_source, tmp_path_factory.mktemp("comfy") / "files")
    files["nf4_nested"] = write_nf4(tiny_source, files["nf4"].with_name("nf4-nested.safetensors"), double_quant=True)
    return files


@pytest.fixture(scope="session")
def convert(tiny_source, tmp_path_factory):
    """convert(source_file, **QuantizeConfig fields) -> folder, made once per arguments."""
    root, made = tmp_path_factory.mktemp("comfy-q"), {}

    def make(source, **kw):
        key = (str(source), tuple(sorted(kw.items())))
        if key not in made:
            cfg = QuantizeConfig(base=str(tiny_source), device="cpu", **{k: str(v) if k in ("t5", "clip", "vae") else v
                                                                          for k, v in kw.items()})
            made[key] = quantize_pipeline(source, root / f"q{len(made)}", cfg, progress=False)
        return made[key]

    return make


def _manifest(folder):
    return json.loads((folder / MANIFEST).read_text())


def _transformer_inputs(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_img, n_txt = 16, 8
    return dict(hidden_states=torch.randn(1, n_img, config["in_channels"], generator=g).to(torch.bfloat16),
                encoder_hidden_states=torch.randn(1, n_txt, config["joint_attention_dim"], generator=g).to(torch.bfloat16),
                pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=g).to(torch.bfloat16),
                timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                img_ids=torch.zeros(n_img, 3), txt_ids=torch.zeros(n_txt, 3), return_dict=False)


def _diffusers_parts(path, transform):
    """Reference: every BFL tensor of the file, made a full-precision weight by `transform(key, f)`, cut
    into its diffusers parts here (torch.split on the BFL table), independent of krea-lite's readers."""
    with safe_open(str(path), "pt") as f:
        keys = [k[len(COMFY_PREFIX):] for k in f.keys()]
    blocks = lambda p: 1 + max(int(k.split(".")[1]) for k in keys if k.startswith(p))  # noqa: E731
    out = {}
    with safe_open(str(path), "pt") as f:
        for key, parts in bfl_layout(blocks("double_blocks."), blocks("single_blocks.")).items():
            t = transform(key, f)
            if key in SWAPPED:  # BFL (shift, scale) -> diffusers (scale, shift)
                t = torch.cat(t.chunk(2)[::-1])
            rows = t.shape[0]
            # qkv: 3 x hidden; linear1: q, k, v of hidden rows, then the 4 x hidden MLP input
            sizes = {1: [rows], 3: [rows // 3] * 3, 4: [rows // 7] * 3 + [rows - 3 * (rows // 7)]}[len(parts)]
            out.update(zip(parts, torch.split(t, sizes), strict=True))
    return out


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------- detection


def test_layouts_come_from_the_header_not_the_name(comfy, tmp_path):
    expected = {"fp8_scaled": ("transformer", "fp8_scaled"), "nf4": ("transformer", "nf4"),
                "nf4_nested": ("transformer", "nf4"), "t5_fp16": ("text_encoder_2", "float"),
                "t5_fp8_scaled": ("text_encoder_2", "fp8_scaled"), "clip_l": ("text_encoder", "float"),
                "ae": ("vae", "ldm")}
    for kind, (role, layout) in expected.items():
        misnamed = tmp_path / f"renamed-{kind}.safetensors"  # a name that says nothing
        misnamed.symlink_to(comfy[kind])
        parts = sniff_file(misnamed).parts
        assert list(parts) == [role] and parts[role].layout == layout, (kind, parts)
    assert sniff_file(comfy["fp8_scaled"]).parts["transformer"].prefix == COMFY_PREFIX
    clip_named_t5 = tmp_path / "t5xxl_fp16.safetensors"
    clip_named_t5.symlink_to(comfy["clip_l"])
    with pytest.raises(KreaLiteError, match="holds a CLIP-L text encoder, not a T5-XXL text encoder"):
        sniff_file(clip_named_t5).part("text_encoder_2")


# -------------------------------------------------------------------------------------- transformers


def test_fp8_scaled_is_kept_as_stored_and_computes_fp8_times_scale(comfy, convert, tiny_source):
    from krea_lite.pipeline import load_pipeline
    from krea_lite.w8a8 import Linear8

    out = convert(comfy["fp8_scaled"])
    t = _manifest(out)["components"]["transformer"]
    assert (t["scheme"], t["stored_as"], t["requantized"], t["source_format"]) == (
        "fp8mm", "native", False, "comfy-fp8_scaled")
    assert t["native"]["tensor_types"]["F8_E4M3 x per-tensor scale"] == len(t["quantized_modules"])
    # the embedders are fp8 in the file but kept bf16 by fp8mm: dequantized, and said so
    assert "x_embedder" in t["native"]["dequantized_to_bf16"] and "x_embedder" in t["kept_modules"]
    assert "proj_out" in t["kept_modules"]  # bf16 in the file

    def fp8_times_scale(key, f):  # ComfyUI's dequantization: weight.to(float) * scale_weight
        t = f.get_tensor(COMFY_PREFIX + key)
        if t.dtype != torch.float8_e4m3fn:
            return t
        return t.float() * f.get_tensor(COMFY_PREFIX + key.removesuffix(".weight") + ".scale_weight").float()

    ref = _diffusers_parts(comfy["fp8_scaled"], fp8_times_scale)
    pipe = load_pipeline(out, device="cpu")
    model = pipe.transformer
    for module in t["quantized_modules"]:
        m = model.get_submodule(module)
        assert isinstance(m, Linear8) and m.weight.dtype == torch.float8_e4m3fn
        assert torch.equal(m.weight.float() * m.weight_scale[:, None], ref[f"{module}.weight"]), module
        assert torch.unique(m.weight_scale).numel() == 1  # the per-tensor scale, one per row
    for module in t["kept_modules"]:
        assert torch.equal(model.get_submodule(module).weight, ref[f"{module}.weight"].to(torch.bfloat16)), module

    # the whole transformer: the same as the bf16 original up to fp8 rounding (weights and activations)
    from diffusers import FluxTransformer2DModel

    original = FluxTransformer2DModel.from_pretrained(tiny_source / "transformer", torch_dtype=torch.bfloat16)
    inputs = _transformer_inputs(original.config)
    with torch.no_grad():
        a, b = model(**inputs)[0].float(), original(**inputs)[0].float()
    assert (a - b).norm() / b.norm() < 0.15


@pytest.mark.parametrize("kind", ["nf4", "nf4_nested"])
def test_forge_nf4_is_kept_as_stored_and_dequantizes_bit_exactly(comfy, convert, kind):
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    from krea_lite.pipeline import load_pipeline

    out = convert(comfy[kind])
    t = _manifest(out)["components"]["transformer"]
    assert (t["scheme"], t["stored_as"], t["requantized"], t["source_format"]) == ("nf4", "native", False, "forge-nf4")
    kind_name = "NF4 (nested absmax)" if kind == "nf4_nested" else "NF4 (fp32 absmax)"
    assert t["native"]["tensor_types"][kind_name] == len(t["quantized_modules"])
    assert t["kept_modules"] == ["proj_out"]  # the one Linear the file keeps in bf16

    def bnb_dequantized(key, f):  # bitsandbytes' own dequantization of the whole fused source tensor
        k = COMFY_PREFIX + key
        stats = {n[len(k) + 1:]: f.get_tensor(n) for n in f.keys() if n.startswith(k + ".")}
        if not stats:
            return f.get_tensor(k)
        return bnb.functional.dequantize_4bit(f.get_tensor(k), QuantState.from_dict(stats, torch.device("cpu")))

    ref = _diffusers_parts(comfy[kind], bnb_dequantized)
    pipe = load_pipeline(out, device="cpu")
    model = pipe.transformer
    for module in t["quantized_modules"]:
        w = model.get_submodule(module).weight
        got = bnb.functional.dequantize_4bit(w.data, w.quant_state)
        assert torch.equal(got, ref[f"{module}.weight"]), module

    # the transformer computes what the dequantized source weights compute: the same model with every
    # NF4 Linear replaced by a bf16 nn.Linear holding bitsandbytes' dequantization of the source
    import copy

    reference = copy.deepcopy(model)
    for module in t["quantized_modules"]:
        q = reference.get_submodule(module)
        linear = torch.nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, dtype=torch.bfloat16)
        linear.weight.data = ref[f"{module}.weight"].to(torch.bfloat16)
        if q.bias is not None:
            linear.bias.data = q.bias.data
        reference.set_submodule(module, linear)
    inputs = _transformer_inputs(model.config)
    with torch.no_grad():
        a, b = model(**inputs)[0].float(), reference(**inputs)[0].float()
    # the weights are bit-exact (above); bitsandbytes' CPU matmul rounds its bf16 sums in another order than
    # F.linear (one bf16 ulp per Linear), which the random tiny model grows to about 1% over its blocks
    assert (a - b).norm() / b.norm() < 3e-2, ((a - b).norm() / b.norm()).item()


def test_an_nf4_cut_through_a_nested_block_keeps_the_exact_values():
    import bitsandbytes as bnb

    from krea_lite.singlefile import Nf4

    w = torch.randn(1024, 64).to(torch.bfloat16)  # 1024 absmax blocks: 4 nested blocks of 256
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    item = Nf4("m", packed, state.absmax, state.code, (1024, 64), 64, "bfloat16",
               {"absmax": state.state2.absmax, "quant_map": state.state2.code, "blocksize": state.state2.blocksize,
                "offset": state.offset.item(), "dtype": "float32"})
    whole = bnb.functional.dequantize_4bit(packed, state)
    aligned, straddling = item.rows(0, 512), item.rows(100, 700)
    assert aligned.nested and not aligned.flattened
    assert straddling.nested is None and straddling.flattened and straddling.absmax.dtype == torch.float32
    for part, (a, b) in ((aligned, (0, 512)), (straddling, (100, 700))):
        assert torch.equal(part.dequantized()[0][1], whole[a:b])


def test_another_scheme_converts_explicitly(comfy, convert):
    t = _manifest(convert(comfy["fp8_scaled"], transformer="nf4"))["components"]["transformer"]
    assert (t["scheme"], t["stored_as"], t["requantized"]) == ("nf4", "converted", True)


# ------------------------------------------------------------------------------------------ encoders


def _t5_output(model, seed=0):
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state.float()


def test_encoders_from_single_files_equal_the_originals(comfy, convert, tiny_source):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, T5EncoderModel

    from krea_lite.pipeline import load_pipeline

    out = convert(comfy["nf4"], t5=comfy["t5_fp16"], clip=comfy["clip_l"], vae=comfy["ae"], text_encoder="bf16")
    manifest = _manifest(out)
    src = manifest["source"]
    for comp, kind in (("text_encoder_2", "t5_fp16"), ("text_encoder", "clip_l"), ("vae", "ae")):
        assert src[f"{comp}_file"]["sha256"] == _sha(comfy[kind]) and src[f"{comp}_file"]["name"] == FILES[kind]
    assert manifest["components"]["text_encoder"]["source_format"] == "comfy-clip_l"
    pipe = load_pipeline(out, device="cpu")

    t5 = T5EncoderModel.from_pretrained(tiny_source / "text_encoder_2", torch_dtype=torch.bfloat16)
    a, b = _t5_output(pipe.text_encoder_2), _t5_output(t5)
    assert torch.allclose(a, b, rtol=1e-2, atol=1e-2)  # bf16 -> fp16 file -> bf16: fp16 rounding at most

    clip = CLIPTextModel.from_pretrained(tiny_source / "text_encoder", torch_dtype=torch.bfloat16)
    ids = torch.randint(0, clip.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = pipe.text_encoder(ids).pooler_output.float(), clip(ids).pooler_output.float()
    assert torch.allclose(a, b, rtol=1e-2, atol=1e-2)

    vae = AutoencoderKL.from_pretrained(tiny_source / "vae", torch_dtype=torch.bfloat16)
    z = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(pipe.vae.decode(z).sample, vae.decode(z).sample)  # ae.safetensors is bf16: exact


def test_fp8_scaled_t5_is_kept_as_fp8mm_with_wo_dequantized(comfy, convert, tiny_source, quantized):
    from transformers import T5EncoderModel

    from krea_lite.pipeline import load_pipeline

    out = convert(comfy["nf4"], t5=comfy["t5_fp8_scaled"])
    t = _manifest(out)["components"]["text_encoder_2"]
    assert (t["scheme"], t["stored_as"], t["requantized"]) == ("fp8mm", "native", False)
    assert t["kept_modules"] == t["native"]["dequantized_to_bf16"] and all(m.endswith(".wo") for m in t["kept_modules"])
    raw = load_file(comfy["t5_fp8_scaled"])
    pipe = load_pipeline(out, device="cpu")
    for module in t["quantized_modules"]:
        m = pipe.text_encoder_2.get_submodule(module)
        assert torch.equal(m.weight.view(torch.uint8), raw[f"{module}.weight"].view(torch.uint8))  # the file's bytes
        assert torch.equal(m.weight_scale, raw[f"{module}.scale_weight"].float().expand(m.weight.shape[0]))
    # as close to the bf16 original as krea-lite's own fp8mm of it (per-row scales; here per-tensor ones)
    from krea_lite.checkpoint import read_manifest
    from krea_lite.pipeline import load_component

    ours = quantized("fp8mm")
    own = load_component(ours / "text_encoder_2", "text_encoder_2", read_manifest(ours)["components"]["text_encoder_2"])
    t5 = T5EncoderModel.from_pretrained(tiny_source / "text_encoder_2", torch_dtype=torch.bfloat16)
    ref = _t5_output(t5)
    error = lambda m: ((_t5_output(m) - ref).norm() / ref.norm()).item()  # noqa: E731
    assert error(pipe.text_encoder_2) < 1.25 * error(own) + 1e-3


def test_the_vae_writer_round_trips_through_diffusers_converter(comfy, tiny_source):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = json.loads((tiny_source / "vae" / "config.json").read_text())
    converted = convert_ldm_vae_checkpoint(load_file(comfy["ae"]), config)
    original = load_file(tiny_source / "vae" / "diffusion_pytorch_model.safetensors")
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[k], original[k]) for k in original)


def test_a_bundle_checkpoint_gives_each_part_by_its_prefix(comfy, convert, tmp_path):
    """Forge/ComfyUI "checkpoints" hold every part in one file, each under its own prefix."""
    bundle = tmp_path / "bundle.safetensors"
    state = dict(load_file(comfy["fp8_scaled"]))  # already under model.diffusion_model.
    for kind, prefix in (("ae", "vae."), ("clip_l", "text_encoders.clip_l.transformer."),
                         ("t5_fp8_scaled", "text_encoders.t5xxl.transformer.")):
        state.update({prefix + k: v for k, v in load_file(comfy[kind]).items()})
    save_file(state, bundle)
    assert list(sniff_file(bundle).parts) == ["transformer", "text_encoder_2", "text_encoder", "vae"]
    one = convert(bundle, t5=bundle, clip=bundle, vae=bundle)
    separate = convert(comfy["fp8_scaled"], t5=comfy["t5_fp8_scaled"], clip=comfy["clip_l"], vae=comfy["ae"])
    for comp in ("transformer", "text_encoder_2", "text_encoder", "vae"):
        a = {k: v for f in sorted((one / comp).glob("*.safetensors")) for k, v in load_file(f).items()}
        b = {k: v for f in sorted((separate / comp).glob("*.safetensors")) for k, v in load_file(f).items()}
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), comp


# ---------------------------------------------------------------------------------------- end to end


def test_only_comfy_files_to_an_image_with_two_commands(tiny_source, tmp_path, capsys):
    """synth --comfy, then a base folder with configs and tokenizers only (no weights at all)."""
    from krea_lite.cli import main

    assert main(["synth", str(tmp_path / "flux"), "--comfy"]) == 0
    files = tmp_path / "flux-comfy"
    base = tmp_path / "base"
    shutil.copytree(tmp_path / "flux", base, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    shutil.rmtree(tmp_path / "flux")  # nothing of the diffusers weights is left
    assert not list(base.rglob("*.safetensors"))
    out = tmp_path / "model"
    assert main(["quantize", str(files / FILES["fp8_scaled"]), "--base", str(base), "--t5",
                 str(files / FILES["t5_fp8_scaled"]), "--clip", str(files / FILES["clip_l"]), "--vae",
                 str(files / FILES["ae"]), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    assert "fp8mm (as stored)" in capsys.readouterr().out
    assert main(["generate", "--model", str(out), "a red fox", "--out", str(tmp_path / "png"), "--device", "cpu",
                 "--quiet", "--steps", "2", "--width", "64", "--height", "64"]) == 0
    images = list((tmp_path / "png").glob("*.png"))
    assert len(images) == 1 and images[0].stat().st_size > 0


# ---------------------------------------------------------------------------------------- bad inputs


def _bad(case, comfy, tiny_source, tmp_path):
    """(transformer file, QuantizeConfig kwargs, expected message) of one broken input."""
    bad = tmp_path / "bad.safetensors"
    if case == "t5 as --clip":
        return comfy["nf4"], {"clip": comfy["t5_fp16"]}, "holds a T5-XXL text encoder, not a CLIP-L text encoder"
    if case == "truncated header":
        data = comfy["fp8_scaled"].read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        bad.write_bytes(data[: 8 + n // 2])
        return bad, {}, f"{bad} is truncated or not a safetensors file"
    if case == "fp8_scaled missing a scale":
        state = load_file(comfy["fp8_scaled"])
        state.pop(COMFY_PREFIX + "double_blocks.0.img_attn.qkv.scale_weight")
        save_file(state, bad)
        return bad, {}, "stores 'double_blocks.0.img_attn.qkv.weight' in fp8 without its"
    if case == "sdxl checkpoint":
        save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
                   "model.diffusion_model.out.2.weight": torch.zeros(4, 4, 3, 3)}, bad)
        return bad, {}, "is a Stable Diffusion / SDXL UNet checkpoint, not FLUX"
    if case == "shapes not FLUX's":
        base = tmp_path / "base"
        shutil.copytree(tiny_source, base, symlinks=True)
        cfg = json.loads((base / "transformer" / "config.json").read_text())
        (base / "transformer" / "config.json").write_text(json.dumps({**cfg, "joint_attention_dim": 256}))
        return comfy["fp8_scaled"], {"base": str(base)}, "'context_embedder.weight' has shape (256, 128), config.json"
    if case == "clip of another width":
        state = {k: v for k, v in load_file(comfy["clip_l"]).items()}
        state["text_model.final_layer_norm.weight"] = torch.ones(64, dtype=torch.float16)
        save_file(state, bad)
        return comfy["nf4"], {"clip": bad}, "'final_layer_norm.weight' has shape (64,), config.json expects (128,)"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["t5 as --clip", "truncated header", "fp8_scaled missing a scale", "sdxl checkpoint",
                                  "shapes not FLUX's", "clip of another width"])
def test_bad_inputs_are_one_line_and_leave_nothing(comfy, tiny_source, tmp_path, case):
    transformer, kw, message = _bad(case, comfy, tiny_source, tmp_path)
    given = [transformer, *[v for k, v in kw.items() if k != "base"]]
    before = {str(p): _sha(p) for p in given}
    out = tmp_path / "out"
    config = QuantizeConfig(**{"base": str(tiny_source), **{k: str(v) for k, v in kw.items()}}, device="cpu")
    with pytest.raises(KreaLiteError) as e:
        quantize_pipeline(transformer, out, config, progress=False)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert {str(p): _sha(p) for p in given} == before
