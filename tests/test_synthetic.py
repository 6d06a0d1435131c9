"""The synthetic FLUX: loads in diffusers, generates reproducibly, same seed -> same bytes, and its
BFL single file is exactly what diffusers' own converter expects."""

from __future__ import annotations

import hashlib
import inspect
import json

import numpy as np
import pytest
import torch
from torch import nn

from krea_lite.errors import KreaLiteError
from krea_lite.synthetic import SINGLE_FILE, TINY, _meta_model, write_synthetic


def _generate(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of the cat", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


def test_tiny_pipeline_generates_and_survives_save_reload(tiny_source, tmp_path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_source, dtype=torch.bfloat16)
    image = _generate(pipe)
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all() and image.std() > 0.05
    np.testing.assert_array_equal(image, _generate(pipe))
    # the trap: token ids, special ids and max lengths must survive save_pretrained -> from_pretrained
    pipe.save_pretrained(tmp_path / "saved")
    np.testing.assert_array_equal(image, _generate(FluxPipeline.from_pretrained(tmp_path / "saved",
                                                                                dtype=torch.bfloat16)))


def test_tokenizer_ids_match_text_encoders(tiny_source):
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip = CLIPTokenizer.from_pretrained(tiny_source / "tokenizer")
    t5 = T5TokenizerFast.from_pretrained(tiny_source / "tokenizer_2")
    clip_cfg = json.loads((tiny_source / "text_encoder" / "config.json").read_text())
    t5_cfg = json.loads((tiny_source / "text_encoder_2" / "config.json").read_text())
    assert (clip.bos_token_id, clip.eos_token_id, clip.pad_token_id) == (
        clip_cfg["bos_token_id"], clip_cfg["eos_token_id"], clip_cfg["pad_token_id"])
    assert len(clip) <= clip_cfg["vocab_size"] and len(t5) <= t5_cfg["vocab_size"]
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    text = "The Cat sat on 3 mats, ünïcödé 日本 " * 40  # longer than both limits, with unknown characters
    ids = clip(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id
    ids = t5(text, padding="max_length", max_length=512, truncation=True).input_ids
    assert len(ids) == 512 and ids[-1] == 1 and max(ids) < t5_cfg["vocab_size"]


def _hashes(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_force(tiny_source, tmp_path):
    again = write_synthetic(tmp_path / "again", seed=0)
    assert _hashes(again) == _hashes(tiny_source)
    with pytest.raises(KreaLiteError, match=r"again already exists; pass --force"):
        write_synthetic(again, seed=1)
    write_synthetic(again, seed=1, single_file=False, force=True)
    h0, h1 = _hashes(tiny_source), _hashes(again)
    assert h0.keys() - {SINGLE_FILE} == h1.keys()
    weights = [k for k in h1 if k.endswith(".safetensors")]
    assert weights and all(h0[k] != h1[k] for k in weights)
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no temporary folders left


def test_failure_leaves_nothing(tmp_path, monkeypatch):
    import krea_lite.synthetic as synthetic

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(synthetic, "_write_component", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_synthetic(tmp_path / "x")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KreaLiteError, match="unknown size 'huge'"):
        write_synthetic(tmp_path / "x", size="huge")
    (tmp_path / "photos").mkdir()
    with pytest.raises(KreaLiteError, match="photos exists and is not a synthetic model folder"):
        write_synthetic(tmp_path / "photos", force=True)


def test_tiny_linears_fit_quantizer_blocks():
    """NF4 needs blocks of 64, quanto int4 groups of 128 along in_features (x_embedder is 64 wide,
    as in the real model, where it stays bf16)."""
    for component in ("transformer", "text_encoder", "text_encoder_2"):
        model = _meta_model(component, TINY[component] if component != "text_encoder" else
                            {**TINY[component], "vocab_size": 520})
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear):
                assert m.out_features % 64 == 0, name
                assert m.in_features % 128 == 0 or name == "x_embedder", name


def _diffusers_converter(inner_dim: int):
    """diffusers' own BFL -> diffusers converter, with its hard-coded FLUX width (3072) set to ours."""
    import diffusers.loaders.single_file_utils as sfu

    code = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    assert code.count("inner_dim = 3072") == 1
    namespace = dict(vars(sfu))
    exec(code.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


def test_single_file_is_what_diffusers_converts(tiny_source):
    from safetensors.torch import load_file

    cfg = json.loads((tiny_source / "transformer" / "config.json").read_text())
    convert = _diffusers_converter(cfg["num_attention_heads"] * cfg["attention_head_dim"])
    converted = convert(load_file(tiny_source / SINGLE_FILE))
    expected = {}
    for path in sorted((tiny_source / "transformer").glob("*.safetensors")):
        expected.update(load_file(path))
    assert converted.keys() == expected.keys()
    for name, t in expected.items():
        assert converted[name].dtype == t.dtype == torch.bfloat16
        assert torch.equal(converted[name], t), name
