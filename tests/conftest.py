"""Shared fixtures: one tiny synthetic pipeline per session, and its quantized folders on demand."""

from __future__ import annotations

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory):
    from krea_lite.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("src") / "flux-tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def quantized(tiny_source, tmp_path_factory):
    """quantized(transformer_scheme, text_encoder_scheme=None) -> folder, made once per session."""
    from krea_lite.quantize import QuantizeConfig, quantize_pipeline

    root = tmp_path_factory.mktemp("quantized")
    made = {}

    def make(transformer: str, text_encoder: str | None = None):
        key = (transformer, text_encoder or transformer)
        if key not in made:
            made[key] = quantize_pipeline(tiny_source, root / "-".join(key),
                                          QuantizeConfig(transformer=key[0], text_encoder=key[1], device="cpu"),
                                          progress=False)
        return made[key]

    return make
