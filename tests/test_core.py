"""CPU tier: quantize -> save -> reload -> generate on the tiny synthetic model, for every scheme."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from torch import nn

from krea_lite.checkpoint import MANIFEST, read_tensors, verify_checkpoint, weight_files
from krea_lite.pipeline import load_component, load_pipeline
from krea_lite.quantize import TRANSFORMER_KEEP_BNB, build_meta, keep_patterns, split_linears
from krea_lite.schemes import SCHEMES, get_scheme

# Relative error of one transformer forward vs bf16 on the tiny random model. Random weights are
# a harsh case (no outliers structure to exploit); real-image fidelity is measured by `krea-lite bench`.
# fp8mm/int8mm also quantize the activations (per token); measured 0.042/0.016 (tests/test_w8a8.py says why).
TOLERANCE = {"bf16": 0.0, "nf4": 0.15, "int8": 0.03, "qint8": 0.03, "qfloat8": 0.08, "qint4": 0.15,
             "fp8mm": 0.08, "int8mm": 0.03}


def transformer_inputs(config: dict, tokens: int = 16, text: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, tokens, config["in_channels"], generator=g).bfloat16(),
        encoder_hidden_states=torch.randn(1, text, config["joint_attention_dim"], generator=g).bfloat16(),
        pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=g).bfloat16(),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
        img_ids=torch.zeros(tokens, 3),
        txt_ids=torch.zeros(text, 3),
        return_dict=False,
    )


def _listed(folder) -> list[str]:
    """A source component's safetensors, named as read_tensors takes them (relative to the pipeline folder)."""
    return [f"{folder.name}/{p.name}" for p in weight_files(folder)]


def bf16_transformer(source) -> nn.Module:
    config = json.loads((source / "transformer" / "config.json").read_text())
    model = build_meta("transformer", config)
    model.load_state_dict(dict(read_tensors(source / "transformer", _listed(source / "transformer"))), assign=True)
    return model.eval()


def quantize_in_memory(model: nn.Module, scheme_name: str) -> nn.Module:
    """The same scheme functions as the converter, applied without touching the disk."""
    scheme = get_scheme(scheme_name)
    quantized, _, _ = split_linears(model, keep_patterns("transformer", scheme_name, None))
    for name in quantized if scheme_name != "bf16" else []:
        linear = model.get_submodule(name)
        stored = scheme.quantize(linear.weight.data)
        if linear.bias is not None:
            stored["bias"] = linear.bias.data
        with torch.device("meta"):
            shell = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        module = scheme.make_module(shell)
        scheme.load(module, stored)
        model.set_submodule(name, module)
    return model.eval()  # bnb picks its CPU kernel by train/eval mode


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s != "gguf"])  # gguf only keeps a .gguf's blocks: test_gguf.py
def test_reload_reproduces_pre_save_output_and_stays_near_bf16(scheme, tiny_source, quantized):
    folder = quantized(scheme)
    config = json.loads((tiny_source / "transformer" / "config.json").read_text())
    inputs = transformer_inputs(config)
    with torch.no_grad():
        reference = bf16_transformer(tiny_source)(**inputs)[0].float()
        before = quantize_in_memory(bf16_transformer(tiny_source), scheme)(**inputs)[0]
        manifest = json.loads((folder / MANIFEST).read_text())
        reloaded = load_component(folder / "transformer", "transformer", manifest["components"]["transformer"])
        after = reloaded(**inputs)[0]
    assert torch.equal(before, after), "save -> reload changed the output"
    assert torch.isfinite(after).all()
    rel = ((after.float() - reference).norm() / reference.norm()).item()
    assert rel <= TOLERANCE[scheme], f"{scheme}: relative error {rel:.4f} vs bf16"
    if scheme != "bf16":
        assert rel > 0, "a quantized model cannot match bf16 exactly: was anything quantized?"


def test_manifest_describes_the_folder(quantized, tiny_source):
    folder = quantized("nf4")
    manifest = verify_checkpoint(folder, full=True)
    t = manifest["components"]["transformer"]
    assert t["scheme"] == "nf4" and t["backend"] == "bitsandbytes"
    assert set(t["keep_patterns"]) == set(TRANSFORMER_KEEP_BNB)
    assert "x_embedder" in t["kept_modules"] and "proj_out" in t["quantized_modules"]
    assert not set(t["kept_modules"]) & set(t["quantized_modules"])
    assert any(".ff.net." in m for m in t["quantized_modules"])
    t5 = manifest["components"]["text_encoder_2"]
    assert t5["kept_modules"] and all(m.endswith("DenseReluDense.wo") for m in t5["kept_modules"])
    assert manifest["components"]["vae"]["scheme"] == "copied"
    assert manifest["source"]["id"] == str(tiny_source)
    for lib in ("torch", "diffusers", "bitsandbytes", "optimum-quanto"):
        assert manifest["libraries"][lib]
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    assert on_disk == set(manifest["files"])
    qc = json.loads((folder / "transformer" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"
    assert set(qc["llm_int8_skip_modules"]) == set(t["kept_modules"])
    assert t["bytes"] < t["source_bytes"] / 2


def test_quanto_folder_keeps_final_projection_and_has_no_library_config(quantized):
    folder = quantized("qint8")
    assert "quantization_config" not in json.loads((folder / "transformer" / "config.json").read_text())
    assert "proj_out" in json.loads((folder / MANIFEST).read_text())["components"]["transformer"]["kept_modules"]


def test_single_file_source_gives_the_same_transformer(tiny_source, quantized, tmp_path):
    from krea_lite.quantize import QuantizeConfig, quantize_pipeline

    from_folder = quantized("nf4")
    out = quantize_pipeline(tiny_source / "flux1-krea-dev.safetensors", tmp_path / "from-file",
                            QuantizeConfig(base=str(tiny_source), device="cpu"), progress=False)
    a = json.loads((from_folder / MANIFEST).read_text())
    b = json.loads((out / MANIFEST).read_text())
    assert b["source"]["id"].endswith("flux1-krea-dev.safetensors")
    single = tiny_source / "flux1-krea-dev.safetensors"  # hashed beside the conversion, recorded whole
    assert b["source"]["transformer_file"]["sha256"] == hashlib.sha256(single.read_bytes()).hexdigest()
    tensors_a = dict(read_tensors(from_folder / "transformer", json.loads((from_folder / MANIFEST).read_text())["files"]))
    tensors_b = dict(read_tensors(out / "transformer", b["files"]))
    assert tensors_a.keys() == tensors_b.keys()
    assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)
    assert a["components"]["transformer"]["quantized_modules"] == b["components"]["transformer"]["quantized_modules"]


def test_generate_same_seed_same_png_bytes(quantized, tmp_path):
    from PIL import Image

    from krea_lite.generate import GenerateConfig, generate

    pipe = load_pipeline(quantized("nf4"), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    config = GenerateConfig(steps=2, width=64, height=64, seed=7)
    (a,) = generate(pipe, ["a red fox in snow"], config, tmp_path / "a")
    (b,) = generate(pipe, ["a red fox in snow"], config, tmp_path / "b")
    assert a.path.read_bytes() == b.path.read_bytes()
    image = Image.open(a.path)
    assert image.size == (64, 64)
    assert image.text["prompt"] == "a red fox in snow" and image.text["seed"] == "7"
    assert image.text["steps"] == "2" and image.text["scheme_transformer"] == "nf4"
    assert len(image.text["model_manifest_sha256"]) == 64
    (c,) = generate(pipe, ["a red fox in snow"], GenerateConfig(steps=2, width=64, height=64, seed=8), tmp_path / "c")
    assert c.path.read_bytes() != a.path.read_bytes()
    # generate() encodes each prompt once for all its images: same pixels as a plain pipeline call
    direct = pipe(prompt="a red fox in snow", num_inference_steps=2, guidance_scale=config.guidance, width=64,
                  height=64, generator=torch.Generator("cpu").manual_seed(7)).images[0]
    assert list(direct.getdata()) == list(image.convert("RGB").getdata())


def test_cli_quantize_then_generate(tiny_source, tmp_path, capsys):
    from PIL import Image

    from krea_lite.cli import main

    out = tmp_path / "q"
    assert main(["quantize", str(tiny_source), "--out", str(out), "--transformer", "int8",
                 "--text-encoder", "qint8", "--device", "cpu", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "transformer" in printed and "int8" in printed and "total" in printed
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n", encoding="utf-8")
    assert main(["generate", "--model", str(out), "--prompts", str(prompts), "--steps", "2", "--width", "64",
                 "--height", "48", "--num-images", "2", "--out", str(tmp_path / "png"), "--quiet"]) == 0
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert len(pngs) == 4
    assert Image.open(pngs[0]).size == (64, 48)
    assert main(["verify", str(out)]) == 0


def test_out_of_memory_retries_once_with_a_conservative_plan(monkeypatch, tmp_path, capsys):
    """generate(): a CUDA OOM re-places the pipeline with plan.shrink() once, then succeeds."""
    from dataclasses import dataclass

    from PIL import Image

    import krea_lite.pipeline as pipeline_mod
    from krea_lite.generate import GenerateConfig, generate
    from krea_lite.pipeline import LoadInfo

    @dataclass(frozen=True)
    class FakePlan:
        conservative: int = 0
        peak_bytes: int = 7 << 30

        def shrink(self):
            return FakePlan(self.conservative + 1, 6 << 30)

    class FakePipe:
        calls = 0

        def encode_prompt(self, **kwargs):
            return torch.zeros(1, 4, 8), torch.zeros(1, 8), None

        def __call__(self, **kwargs):
            FakePipe.calls += 1
            if FakePipe.calls == 1:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return type("Out", (), {"images": [Image.new("RGB", (16, 16))]})()

    (tmp_path / "krea_lite.json").write_text("{}")
    pipe = FakePipe()
    pipe.krea_lite = LoadInfo(path=tmp_path, manifest={"components": {}}, device="cpu", plan=FakePlan())
    placed = []
    monkeypatch.setattr(pipeline_mod, "place", lambda p, plan: placed.append(plan))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    (g,) = generate(pipe, ["a fox"], GenerateConfig(steps=1, width=16, height=16), tmp_path / "png")
    assert g.path.exists() and FakePipe.calls == 2
    assert placed == [FakePlan(1, 6 << 30)]
    assert "retrying once with a more conservative plan" in capsys.readouterr().out


def test_paths_starting_with_home_are_expanded(quantized, monkeypatch):
    folder = quantized("nf4")
    monkeypatch.setenv("HOME", str(folder.parent))
    assert verify_checkpoint(f"~/{folder.name}", full=False)["components"]["transformer"]["scheme"] == "nf4"
    assert load_pipeline(f"~/{folder.name}", device="cpu").krea_lite.path == folder
