"""GGUF transformer files: every supported type round-trips to what gguf-py's reference dequantize gives,
the kept blocks stream and compile, quantize .gguf -> folder -> load_pipeline -> an image on the CPU, and
damaged or foreign files fail in one line, leaving nothing behind and the source untouched."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import struct
import types

import gguf
import numpy as np
import pytest
import torch
from diffusers.quantizers.gguf.utils import GGUFParameter

from krea_lite.checkpoint import MANIFEST
from krea_lite.errors import KreaLiteError
from krea_lite.formats import is_gguf
from krea_lite.gguf_file import FLOAT_TYPES, QUANT_TYPES, GGUFLinear, dequantize
from krea_lite.pipeline import load_component, load_pipeline
from krea_lite.quantize import QuantizeConfig, quantize_pipeline
from krea_lite.source import SWAPPED, bfl_layout, resolve_source
from krea_lite.synthetic_gguf import gguf_name, write_gguf


@pytest.fixture(scope="module")
def files(tiny_source, tmp_path_factory):
    """files(kind) -> a tiny FLUX .gguf of that type (made once), beside a copy-free view of nothing else."""
    root, made = tmp_path_factory.mktemp("gguf"), {}

    def make(kind):
        if kind not in made:
            made[kind] = write_gguf(tiny_source, root / gguf_name(kind), kind)
        return made[kind]

    return make


@pytest.fixture(scope="module")
def folders(tiny_source, files, tmp_path_factory):
    root, made = tmp_path_factory.mktemp("gguf-out"), {}

    def make(kind, transformer=None):
        if (kind, transformer) not in made:
            made[kind, transformer] = quantize_pipeline(
                files(kind), root / f"{kind}-{transformer}",
                QuantizeConfig(transformer=transformer, text_encoder="bf16", base=str(tiny_source), device="cpu"),
                progress=False)
        return made[kind, transformer]

    return make


def _reference(path) -> dict[str, torch.Tensor]:
    """diffusers name -> float32 weights, from gguf-py alone: GGUFReader + gguf.quants.dequantize, split by rows."""
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    cfg_layers = 1 + max(int(n.split(".")[1]) for n in tensors if n.startswith("double_blocks."))
    cfg_single = 1 + max(int(n.split(".")[1]) for n in tensors if n.startswith("single_blocks."))
    hidden = int(tensors["img_in.weight"].shape[-1])
    out = {}
    for key, parts in bfl_layout(cfg_layers, cfg_single).items():
        t = tensors[key]
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        if key in SWAPPED:
            w = torch.cat(w.chunk(2)[::-1])
        sizes = [hidden] * (len(parts) - 1) + [w.shape[0] - hidden * (len(parts) - 1)]
        out.update(zip(parts, torch.split(w, sizes), strict=True))
    return out


def _gguf_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, GGUFLinear)}


@pytest.mark.parametrize("kind", QUANT_TYPES + FLOAT_TYPES)
def test_every_type_round_trips_to_the_reference_dequantize(kind, files, folders):
    path = files(kind)
    ref = _reference(path)
    out = folders(kind)
    info = json.loads((out / MANIFEST).read_text())["components"]["transformer"]
    assert (info["scheme"], info["source_format"], info["stored_as"], info["requantized"]) == (
        "gguf", "gguf", "native", False)
    assert sum(info["native"]["tensor_types"].values()) == len(gguf.GGUFReader(path).tensors)
    model = load_component(out / "transformer", "transformer", info)
    linears = _gguf_linears(model)
    assert sorted(linears) == sorted(info["quantized_modules"]) == sorted(info["native"]["module_types"])
    if kind in FLOAT_TYPES:
        assert not linears and info["backend"] is None  # F16/BF16/F32 weights become bf16 tensors
    else:
        assert len(linears) > 30 and {m.weight.quant_type.name for m in linears.values()} == {kind}
    x = torch.randn(3, 4096, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for name, p in model.named_parameters():
        module = model.get_submodule(name.rpartition(".")[0])
        if isinstance(module, GGUFLinear) and name.endswith(".weight"):
            got = dequantize(p.as_tensor(), p.quant_type)
            assert torch.equal(got, ref[name]), name  # float32: the same numbers as gguf-py
            xi = x[:, : module.in_features]
            expected = torch.nn.functional.linear(xi, ref[name].to(torch.bfloat16), module.bias)
            assert torch.equal(module(xi), expected), name
        else:
            assert torch.equal(p, ref[name].to(torch.bfloat16)), name  # F32/F16/BF16: exact as bf16


def test_fused_tensors_split_by_rows_without_dequantizing(files, tiny_source):
    """qkv / linear1 rows are copied byte for byte; the final adaLN's halves are swapped as rows."""
    path = files("Q8_0")
    src = resolve_source(str(path), base=str(tiny_source))
    native = dict(src.reader("transformer").iter_native())
    reader = gguf.GGUFReader(path)
    raw = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    qkv = raw["double_blocks.0.img_attn.qkv.weight"]
    parts = [native[f"transformer_blocks.0.attn.to_{c}"]["weight"] for c in "qkv"]
    assert torch.equal(torch.cat(parts), qkv)
    ada = raw["final_layer.adaLN_modulation.1.weight"]
    assert torch.equal(native["norm_out.linear"]["weight"], torch.cat(ada.chunk(2)[::-1]))
    assert native["norm_out.linear"]["weight_type"].item() == int(gguf.GGMLQuantizationType.Q8_0)


def _transformer_and_output(out):
    """The folder's transformer, loaded on the CPU; test inputs; its output for them."""
    info = json.loads((out / MANIFEST).read_text())["components"]["transformer"]
    model = load_component(out / "transformer", "transformer", info)
    inputs = _inputs()
    with torch.no_grad():
        ref = model(**inputs)[0]
    return model, inputs, ref


def test_kept_blocks_stream_bit_for_bit_and_measure_counts_the_raw_bytes(folders):
    from krea_lite.placement import apply_plan
    from krea_lite.plan import measure, plan_for_budget

    model, inputs, ref = _transformer_and_output(folders("Q4_K"))
    pipe = types.SimpleNamespace(transformer=model)
    sizes = measure(pipe)
    block = model.transformer_blocks[0]
    raw = sum(p.numel() for m in _gguf_linears(block).values() for p in [m.weight])  # uint8: bytes
    bf16 = 2 * sum(m.in_features * m.out_features for m in _gguf_linears(block).values())
    assert raw < sizes.transformer_blocks[0] < raw + (bf16 - raw) // 2  # the blocks, not bf16 weights
    plan = dataclasses.replace(plan_for_budget(sizes, None), streamed_double=(0, 1), streamed_single=(1,),
                               prefetch=1)
    placement = apply_plan(pipe, plan, "cpu")
    try:
        with torch.no_grad():
            for _ in range(2):
                assert torch.equal(model(**inputs)[0], ref)
        m = model.transformer_blocks[1].attn.to_q
        assert isinstance(m.weight, GGUFParameter) and m.weight.quant_type.name == "Q4_K"
    finally:
        placement.close()


def test_kept_blocks_compile_without_graph_breaks(folders, tmp_path):
    from krea_lite.compile import compile_counters, compile_transformer

    model, inputs, ref = _transformer_and_output(folders("Q4_K"))
    with torch.no_grad():
        torch._dynamo.reset()
        assert compile_transformer(model, cache_dir=tmp_path, device="cpu", backend="aot_eager").compiled
        before = compile_counters()
        got = model(**inputs)[0]
        warm = compile_counters()
        again = model(**inputs)[0]
    torch._dynamo.reset()
    assert warm["graph_breaks"] == before["graph_breaks"]
    # one graph per block class, plus the first single block's contiguous input (as for bf16 blocks)
    assert warm["graphs"] - before["graphs"] <= 3 and compile_counters()["graphs"] == warm["graphs"]
    assert torch.equal(got, ref) and torch.equal(again, ref)  # aot_eager runs the same ops


def _inputs(tokens: int = 16, text: int = 8) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(tokens // 4), indexing="ij"), -1).reshape(-1, 2)
    return dict(hidden_states=torch.randn(1, tokens, 64, generator=g).to(torch.bfloat16),
                encoder_hidden_states=torch.randn(1, text, 128, generator=g).to(torch.bfloat16),
                pooled_projections=torch.randn(1, 128, generator=g).to(torch.bfloat16),
                timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                img_ids=torch.cat([torch.zeros(tokens, 1), ids], 1), txt_ids=torch.zeros(text, 3), return_dict=False)


def test_quantize_gguf_then_load_pipeline_makes_an_image(folders, files):
    out = folders("Q8_0")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["source"]["transformer_file"]["format"] == "gguf"
    assert manifest["source"]["transformer_file"]["sha256"] == hashlib.sha256(files("Q8_0").read_bytes()).hexdigest()
    pipe = load_pipeline(out, device="cpu")
    assert _gguf_linears(pipe.transformer)
    image = pipe("a cat", num_inference_steps=2, width=64, height=64, guidance_scale=3.5,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 0


def test_another_scheme_dequantizes_then_quantizes_once(folders, files, tiny_source):
    out = folders("Q4_K", "nf4")
    info = json.loads((out / MANIFEST).read_text())["components"]["transformer"]
    assert (info["scheme"], info["stored_as"], info["requantized"], info["source_format"]) == (
        "nf4", "converted", True, "gguf")
    src = resolve_source(str(files("Q4_K")), base=str(tiny_source))
    ref = _reference(files("Q4_K"))
    for name, t in src.iter_tensors("transformer"):  # what the nf4 quantizer was given
        assert torch.equal(t, ref[name].to(torch.bfloat16)), name


def test_format_comes_from_the_header_not_the_name(files, tiny_source, tmp_path):
    renamed = tmp_path / "transformer.safetensors"
    shutil.copyfile(files("Q4_0"), renamed)
    assert is_gguf(renamed) and not is_gguf(tiny_source / "model_index.json")
    assert resolve_source(str(renamed), base=str(tiny_source)).reader("transformer").format == "gguf"


def test_scheme_gguf_cannot_quantize_a_diffusers_folder(tiny_source, tmp_path):
    with pytest.raises(KreaLiteError, match="keeps the blocks of a FLUX .gguf") as e:
        quantize_pipeline(tiny_source, tmp_path / "out", QuantizeConfig(transformer="gguf", device="cpu"),
                          progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


# --- damaged and foreign files ----------------------------------------------------------------------


def _small_gguf(path, arch="flux", names=("img_in.weight",), kind=gguf.GGMLQuantizationType.Q8_0):
    w = gguf.GGUFWriter(path, arch=arch)
    for n in names:
        w.add_tensor(n, gguf.quants.quantize(np.ones((4, 64), np.float32), kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _unknown_type(path, good):
    shutil.copyfile(good, path)
    t = gguf.GGUFReader(path).tensors[0]
    at = t.field.offset + sum(p.nbytes for p in t.field.parts[:-2])  # the tensor info's type (uint32)
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(struct.pack("<I", 99))
    return path


def _wrong_shapes(tmp_path, tiny_source, files):
    """A base whose transformer config is wider than the file's tensors."""
    base = tmp_path / "base"
    shutil.copytree(tiny_source, base, ignore=shutil.ignore_patterns("*.gguf", "flux1-krea-dev.safetensors"))
    cfg = json.loads((base / "transformer" / "config.json").read_text())
    (base / "transformer" / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 3}))
    return files("Q4_0"), base


def _cut(path, good, end):
    path.write_bytes(good.read_bytes()[:end])
    return path


BAD = {
    "truncated header": (lambda p, f: _cut(p, f("Q8_0"), 40), "truncated or not a valid GGUF"),
    "truncated data": (lambda p, f: _cut(p, f("Q8_0"), -1000), "truncated or not a valid GGUF"),
    "unknown tensor type": (lambda p, f: _unknown_type(p, f("Q8_0")), "unknown GGML type"),
    "an LLM": (lambda p, f: _small_gguf(p, arch="llama", names=("token_embd.weight",)), "architecture 'llama'"),
    "SDXL key names": (lambda p, f: _small_gguf(p, names=("input_blocks.0.0.weight",)), "not a FLUX transformer GGUF"),
    "a foreign tensor": (lambda p, f: _small_gguf(p, names=("img_in.weight", "double_blocks.0.img_attn.qkv.weight",
                                                             "input_blocks.0.0.weight")), "'input_blocks.0.0.weight'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_fail_in_one_line_and_leave_nothing(case, files, tiny_source, tmp_path):
    make, message = BAD[case]
    path = make(tmp_path / "bad.gguf", files)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(KreaLiteError, match=message) as e:
        quantize_pipeline(path, tmp_path / "out", QuantizeConfig(base=str(tiny_source), device="cpu"), progress=False)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert not (tmp_path / "out").exists() and hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_shapes_not_matching_flux_fail_in_one_line(files, tiny_source, tmp_path):
    path, base = _wrong_shapes(tmp_path, tiny_source, files)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(KreaLiteError, match="has shape .* config.json expects") as e:
        quantize_pipeline(path, tmp_path / "out", QuantizeConfig(base=str(base), device="cpu"), progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_synth_writes_gguf_files(tmp_path):
    from krea_lite.cli import main

    assert main(["synth", str(tmp_path / "s"), "--no-single-file", "--gguf", "Q5_K", "BF16"]) == 0
    for kind in ("Q5_K", "BF16"):
        reader = gguf.GGUFReader(tmp_path / "s" / gguf_name(kind))
        assert reader.fields["general.architecture"].contents() == "flux"
        assert {t.tensor_type.name for t in reader.tensors} <= {kind, "F16", "F32"}
    assert main(["synth", str(tmp_path / "t"), "--gguf", "Q9_X"]) == 2
    assert not (tmp_path / "t").exists()


def test_keep_and_the_gguf_scheme_are_refused_where_they_cannot_apply(files, tiny_source, tmp_path):
    with pytest.raises(KreaLiteError, match=r"--keep applies when krea-lite quantizes") as e:
        quantize_pipeline(files("Q4_K"), tmp_path / "k", QuantizeConfig(keep=("x_embedder",), base=str(tiny_source),
                                                                       device="cpu"), progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "k").exists()
    with pytest.raises(KreaLiteError, match=r"--text-encoder gguf keeps the blocks of a FLUX .gguf source"):
        quantize_pipeline(files("Q4_K"), tmp_path / "g", QuantizeConfig(text_encoder="gguf", base=str(tiny_source),
                                                                       device="cpu"), progress=False)
    assert not (tmp_path / "g").exists()


def test_the_disk_estimate_covers_a_converted_gguf(folders, files, tiny_source):
    from krea_lite.quantize import _estimate_bytes

    src = resolve_source(str(files("Q4_K")), base=str(tiny_source))
    out = folders("Q4_K", "bf16")  # dequantized: four times the file's bytes
    written = sum(p.stat().st_size for p in (out / "transformer").iterdir())
    estimate = _estimate_bytes(src, QuantizeConfig(transformer="bf16", text_encoder="bf16"))
    assert estimate >= written > 2 * files("Q4_K").stat().st_size


def test_diffusers_gguf_linear_dequantizing_in_float32_is_ours_bit_for_bit():
    """benchmarks/gguf_check.exact_dequantize: diffusers' own GGUFLinear, dequantizing in float32, computes our
    GGUFLinear's output exactly; with its float16 default it does not (the rounding the full-size check reports)."""
    import importlib.util
    from pathlib import Path

    from diffusers.quantizers.gguf.utils import GGUFLinear as DiffusersGGUFLinear

    from krea_lite.synthetic_gguf import _random_k_blocks

    spec = importlib.util.spec_from_file_location(
        "gguf_check", Path(__file__).parents[1] / "benchmarks" / "gguf_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(1)) * 0.02
    raw = _random_k_blocks(w, "Q4_K", seed=3)
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    outs = {}
    for cls in (DiffusersGGUFLinear, GGUFLinear):
        m = cls(512, 64, bias=False, compute_dtype=torch.bfloat16)
        m.weight = GGUFParameter(raw, quant_type=gguf.GGMLQuantizationType.Q4_K)
        outs[cls.__module__] = m
    theirs, ours = outs.values()
    with torch.no_grad():
        default = theirs(x)
        with check.exact_dequantize():
            exact = theirs(x)
        assert torch.equal(exact, ours(x))
        assert not torch.equal(default, exact)  # float16 dequantization rounds some weights differently
    assert torch.equal(theirs(x), default)  # the patch is undone on exit
