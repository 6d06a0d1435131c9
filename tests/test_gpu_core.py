"""GPU tier (skipped without CUDA): bitsandbytes folders load in plain diffusers/transformers and
give exactly what `load_pipeline` gives (its own placement: `nn.Module.to` alone leaves bnb int8
SCB on the CPU); the full-size synthetic folder when KREA_FULL_DIR names one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from krea_lite.pipeline import load_pipeline

from .conftest import requires_cuda
from .test_core import transformer_inputs

pytestmark = [pytest.mark.gpu, requires_cuda]


def _compare_transformer(ours, folder: Path, tokens: int, text: int):
    from diffusers import FluxTransformer2DModel

    plain = FluxTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch.bfloat16).to("cuda")
    config = json.loads((folder / "transformer" / "config.json").read_text())
    inputs = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in transformer_inputs(config, tokens, text).items()}
    with torch.no_grad():
        a, b = ours(**inputs)[0], plain(**inputs)[0]
    assert torch.isfinite(a).all()
    assert torch.equal(a, b), f"max diff {(a.float() - b.float()).abs().max().item()}"


def _compare_t5(ours, folder: Path):
    from transformers import T5EncoderModel

    plain = T5EncoderModel.from_pretrained(folder / "text_encoder_2", torch_dtype=torch.bfloat16, device_map="cuda")
    ids = torch.randint(0, 100, (1, 32), generator=torch.Generator().manual_seed(0)).to("cuda")
    with torch.no_grad():
        a, b = ours(ids).last_hidden_state, plain(ids).last_hidden_state
    assert torch.equal(a, b), f"max diff {(a.float() - b.float()).abs().max().item()}"


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_bnb_folder_loads_in_plain_diffusers_and_transformers(scheme, quantized):
    folder = quantized(scheme)
    pipe = load_pipeline(folder, device="cuda")  # no budget: everything resident on this card
    _compare_transformer(pipe.transformer, folder, tokens=64, text=16)
    _compare_t5(pipe.text_encoder_2, folder)


@pytest.mark.skipif(not os.environ.get("KREA_FULL_DIR"), reason="set KREA_FULL_DIR to a full-size NF4 folder")
def test_full_size_nf4_folder_loads_in_plain_diffusers():
    folder = Path(os.environ["KREA_FULL_DIR"])
    pipe = load_pipeline(folder, device="cuda")
    _compare_transformer(pipe.transformer, folder, tokens=1024, text=128)
    _compare_t5(pipe.text_encoder_2, folder)
