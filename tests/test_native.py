"""The native-form path of quantize: a single-file reader whose Linears are already in a scheme's stored
form is copied as it is (no second quantization); asking for another scheme converts, and says so."""

from __future__ import annotations

import json

import pytest
import torch

from krea_lite.checkpoint import MANIFEST, read_tensors
from krea_lite.errors import KreaLiteError
from krea_lite.quantize import QuantizeConfig, keep_patterns, quantize_pipeline, split_linears
from krea_lite.schemes import get_scheme
from krea_lite.source import BflFile, Source, resolve_source
from krea_lite.synthetic import SINGLE_FILE

QUANTIZE_FP8 = get_scheme("fp8mm").quantize  # bound now: the tests below make the scheme's own method fail


class Fp8File(BflFile):
    """A stand-in for a file that stores fp8mm weights: the BFL file, its quantizable Linears quantized here."""

    format = "test-fp8"
    native_scheme = "fp8mm"

    def __init__(self, path, targets, rename=None):
        super().__init__(path)
        self.targets, self.rename = targets, rename or {}

    def iter_native(self):
        for name, t in self.iter_tensors():
            module, _, leaf = name.rpartition(".")
            if leaf == "weight" and module in self.targets:
                yield self.rename.get(module, module), QUANTIZE_FP8(t)
            else:
                yield name, t

    def native_info(self):
        return {"tensor_types": {"F8_E4M3": len(self.targets)}}


def _source(tiny_source, **kw):
    src = resolve_source(str(tiny_source / SINGLE_FILE), base=str(tiny_source))
    from krea_lite.quantize import build_meta

    model = build_meta("transformer", src.config("transformer"))
    targets = set(split_linears(model, keep_patterns("transformer", "fp8mm", None))[0])
    reader = Fp8File(src.transformer_file, targets, **kw)
    return Source(id=src.id, root=src.root, readers=(("transformer", reader),)), targets


def _run(monkeypatch, src, out, config):
    monkeypatch.setattr("krea_lite.source.resolve_source", lambda *a, **k: src)
    return quantize_pipeline(src.id, out, config, progress=False)


def test_native_form_is_copied_as_stored_and_equals_quantizing_here(tiny_source, quantized, tmp_path, monkeypatch):
    ref = quantized("fp8mm", "nf4")  # the same weights quantized from the diffusers folder
    src, targets = _source(tiny_source)

    def second_pass(*_):
        raise AssertionError("a native fp8mm weight was quantized again")

    monkeypatch.setattr(type(get_scheme("fp8mm")), "quantize", second_pass)
    out = _run(monkeypatch, src, tmp_path / "native", QuantizeConfig(device="cpu"))  # T5: nf4, the default
    manifest = json.loads((out / MANIFEST).read_text())
    t = manifest["components"]["transformer"]
    assert (t["scheme"], t["stored_as"], t["requantized"], t["source_format"]) == ("fp8mm", "native", False, "test-fp8")
    assert set(t["quantized_modules"]) == targets and t["native"] == {"tensor_types": {"F8_E4M3": len(targets)}}
    assert manifest["source"]["transformer_file"]["format"] == "test-fp8"
    a = dict(read_tensors(out / "transformer", manifest["files"]))
    b = dict(read_tensors(ref / "transformer", json.loads((ref / MANIFEST).read_text())["files"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert manifest["components"]["text_encoder_2"]["stored_as"] == "quantized"


def test_another_scheme_converts_and_says_it_requantized(tiny_source, quantized, tmp_path, monkeypatch):
    src, _ = _source(tiny_source)
    out = _run(monkeypatch, src, tmp_path / "nf4", QuantizeConfig(transformer="nf4", device="cpu"))
    t = json.loads((out / MANIFEST).read_text())["components"]["transformer"]
    assert (t["scheme"], t["stored_as"], t["requantized"]) == ("nf4", "converted", True)


def test_a_native_tensor_for_no_flux_linear_is_one_line_and_leaves_nothing(tiny_source, tmp_path, monkeypatch):
    src, targets = _source(tiny_source, rename={sorted(_source(tiny_source)[1])[0]: "transformer_blocks.0.nope"})
    with pytest.raises(KreaLiteError, match=r"quantized 'transformer_blocks.0.nope', which is not a Linear") as e:
        _run(monkeypatch, src, tmp_path / "bad", QuantizeConfig(device="cpu"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "bad").exists()


def test_transformer_auto_picks_what_the_card_runs_and_says_why(tiny_source, tmp_path, capsys):
    from krea_lite.cli import main

    out = tmp_path / "auto"
    assert main(["quantize", str(tiny_source), "--out", str(out), "--transformer", "auto", "--device", "cpu",
                 "--quiet"]) == 0
    said = capsys.readouterr().out
    t = json.loads((out / MANIFEST).read_text())["components"]["transformer"]
    assert t["scheme"] == "nf4" and "auto" in said  # the CPU has no 8-bit matmul: the smallest weights
    assert t["chosen_by"] == "--transformer auto on the CPU: no 8-bit matmul kernel on the CPU, so nf4, the smallest weights"
    assert main(["plan", "--model", str(out), "--vram-gb", "8"]) == 0
    assert "transformer scheme nf4, chosen by --transformer auto on the CPU" in capsys.readouterr().out
