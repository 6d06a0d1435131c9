"""Quantization schemes and the registry that maps a scheme name to its backend.

A scheme knows three things about one nn.Linear: how to turn its bf16 weight into the tensors
that go on disk (`quantize`), what module replaces the Linear when a model is rebuilt on the meta
device (`make_module`), and how to put the stored tensors back into that module (`load`).
The on-disk names are the libraries' own serialization formats, so a bitsandbytes folder also
loads in plain diffusers/transformers and a quanto folder through optimum-quanto's `requantize`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch
from torch import nn

from .errors import KreaLiteError

# Two messages the first load prints on a CPU-only machine without torchvision, neither about krea-lite
# nor actionable for it: bitsandbytes (imported by diffusers' quantizers, before any krea-lite call into
# it) tries an optional kernel package, and transformers falls back to PIL image processors that FLUX
# never uses. Exactly these are dropped, by a filter on the one logger that emits each; nothing else.
_LIBRARY_NOISE = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back to",
}


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__(f"krea-lite: drop {text!r}")
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_library_noise() -> None:
    """Install the `_LIBRARY_NOISE` filters (once). Runs when this module is first imported, which
    `pipeline` and `quantize` do before they import diffusers; `import krea_lite` does not."""
    for name, text in _LIBRARY_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessage(text))


quiet_library_noise()

# bitsandbytes NF4: 64 weights share one absmax; the absmaxes are themselves quantized to 8 bit
# ("double quant", QLoRA): ~4.13 bits per weight instead of ~4.5.
NF4_BLOCKSIZE = 64
NF4_DOUBLE_QUANT = True
# LLM.int8(): activation columns above this magnitude run in bf16 (diffusers' and transformers' default).
INT8_THRESHOLD = 6.0


@dataclass(frozen=True)
class Scheme:
    """One way of storing a Linear's weight; subclasses implement the three verbs."""

    name: str
    backend: str  # "none" | "bitsandbytes" | "optimum-quanto" | "krea-lite" (w8a8.py, over torch's own ops)
    bits: float  # nominal bits per quantized weight, for size estimates
    description: str

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """bf16 weight (out, in) -> tensors to store, keyed relative to the module prefix."""
        raise NotImplementedError

    def make_module(self, linear: nn.Linear) -> nn.Module:
        """The module that replaces `linear` (on the meta device) before loading."""
        raise NotImplementedError

    def load(self, module: nn.Module, stored: dict[str, torch.Tensor]) -> None:
        """Put stored tensors (keys as from `quantize`, plus "bias") into `module`, on the CPU."""
        raise NotImplementedError

    def library_config(self, skip_modules: list[str], component: str) -> dict | None:
        """The `quantization_config` entry of config.json that plain diffusers/transformers read."""
        return None

    def requires(self) -> dict | None:
        """The hardware the scheme's fast path needs, for the manifest (None: runs anywhere at full speed)."""
        return None

    def logical_shape(self, stored: dict[str, torch.Tensor]) -> tuple[int, ...]:
        """The (out, in) shape of the bf16 weight that `stored` (keys as from `quantize`) holds."""
        return tuple(stored["weight"].shape)


@dataclass(frozen=True)
class Bf16(Scheme):
    def quantize(self, weight):
        return {"weight": weight.to(torch.bfloat16)}

    def make_module(self, linear):
        return linear

    def load(self, module, stored):
        module.load_state_dict(stored, assign=True)


def _bnb():
    from .compat import bnb

    return bnb()


def _bnb_config(component: str, **kwargs) -> dict:
    if component == "transformer":
        from diffusers import BitsAndBytesConfig
    else:
        from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(**kwargs).to_dict()


@dataclass(frozen=True)
class BnbNF4(Scheme):
    def quantize(self, weight):
        bnb = _bnb()
        packed, state = bnb.functional.quantize_4bit(
            weight.contiguous(), blocksize=NF4_BLOCKSIZE, compress_statistics=NF4_DOUBLE_QUANT, quant_type="nf4"
        )
        # Same keys as Linear4bit._save_to_state_dict: "weight" + "weight.<quant state>".
        out = {"weight": packed.cpu()}
        out.update({f"weight.{k}": v.cpu() for k, v in state.as_dict(packed=True).items()})
        return out

    def make_module(self, linear):
        bnb = _bnb()
        return bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=torch.bfloat16, compress_statistics=NF4_DOUBLE_QUANT, quant_type="nf4", device="meta",
        )

    def load(self, module, stored):
        bnb = _bnb()
        stats = {k[len("weight."):]: v for k, v in stored.items() if k.startswith("weight.")}
        module.weight = bnb.nn.Params4bit.from_prequantized(
            stored["weight"], stats, requires_grad=False, device="cpu", module=module
        )
        if "bias" in stored:
            module.bias = nn.Parameter(stored["bias"], requires_grad=False)

    def logical_shape(self, stored):
        raw = stored.get("weight.quant_state.bitsandbytes__nf4")
        if raw is None:
            raise KreaLiteError("an NF4 weight without its quant_state.bitsandbytes__nf4 entry")
        return tuple(json.loads(bytes(raw.tolist()).decode())["shape"])

    def library_config(self, skip_modules, component):
        return _bnb_config(
            component, load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=NF4_DOUBLE_QUANT,
            bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=skip_modules,
        )


@dataclass(frozen=True)
class BnbInt8(Scheme):
    def quantize(self, weight):
        bnb = _bnb()
        # Row-wise absmax int8 ("vector-wise", axis 0): weight ~= CB * SCB[:, None] / 127.
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        # Same keys as Linear8bitLt._save_to_state_dict.
        return {"weight": cb.cpu(), "SCB": scb.cpu(), "weight_format": torch.tensor(0, dtype=torch.uint8)}

    def make_module(self, linear):
        bnb = _bnb()
        return bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta",
        )

    def load(self, module, stored):
        bnb = _bnb()
        cb = stored["weight"]
        module.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=stored["SCB"])
        if "bias" in stored:
            module.bias = nn.Parameter(stored["bias"], requires_grad=False)

    def library_config(self, skip_modules, component):
        return _bnb_config(
            component, load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD, llm_int8_skip_modules=skip_modules
        )


def _quanto():
    try:
        import optimum.quanto as quanto
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise KreaLiteError("optimum-quanto is not installed: pip install 'optimum-quanto>=0.2.7'") from e
    return quanto


@dataclass(frozen=True)
class Quanto(Scheme):
    qtype: str = "qint8"  # optimum-quanto weight qtype name

    def _qtype(self):
        return _quanto().qtypes[self.qtype]

    def quantize(self, weight):
        quanto = _quanto()
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        qlinear = quanto.QLinear.from_module(linear, weights=self._qtype())
        qlinear.freeze()
        # quanto's own serialization: weight._data, weight._scale (+ weight._shift for int4), input/output_scale.
        return {k: v.detach().cpu().contiguous() for k, v in qlinear.state_dict().items()}

    def make_module(self, linear):
        quanto = _quanto()
        return quanto.QLinear.qcreate(linear, weights=self._qtype(), device="meta")

    def load(self, module, stored):
        module.load_state_dict(stored, assign=True, strict=True)


@dataclass(frozen=True)
class W8A8(Scheme):
    """8-bit weights x 8-bit per-token activations through torch's own matmuls (see w8a8.py)."""

    kind: str = "fp8"  # a key of w8a8.KINDS

    def quantize(self, weight):
        from .w8a8 import quantize_weight

        q, scale = quantize_weight(weight, self.kind)
        return {"weight": q.cpu(), "weight_scale": scale.cpu()}

    def make_module(self, linear):
        from .w8a8 import Linear8

        return Linear8(linear.in_features, linear.out_features, linear.bias is not None, self.kind, device="meta")

    def load(self, module, stored):
        module.load(stored)

    def requires(self):
        from .w8a8 import KINDS

        k = KINDS[self.kind]
        return {"cuda_capability": k.needs, "kernel": k.kernel, "fallback": "dequantize"}


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Bf16("bf16", "none", 16, "no quantization: bfloat16 weights"),
        BnbNF4("nf4", "bitsandbytes", 4.13, "bitsandbytes NF4, blocksize 64, double quant; bf16 compute"),
        BnbInt8("int8", "bitsandbytes", 8, "bitsandbytes LLM.int8(), row-wise absmax, outlier threshold 6"),
        Quanto("qint8", "optimum-quanto", 8, "optimum-quanto int8 weights, per-row scale", qtype="qint8"),
        Quanto("qfloat8", "optimum-quanto", 8, "optimum-quanto float8 e4m3 weights, per-row scale", qtype="qfloat8"),
        Quanto("qint4", "optimum-quanto", 4.25, "optimum-quanto int4 weights, groups of 128 with scale+shift",
               qtype="qint4"),
        # Not bitsandbytes' `int8` (LLM.int8(), bf16 activations): these quantize the activations too.
        W8A8("fp8mm", "krea-lite", 8, "float8 e4m3 weights (per-channel scale) x fp8 activations (per token, at run "
             "time) via torch._scaled_mm; CUDA capability 8.9+, elsewhere dequantizes", kind="fp8"),
        W8A8("int8mm", "krea-lite", 8, "int8 weights (per-channel scale) x int8 activations (per token, at run "
             "time) via torch._int_mm; CUDA capability 8.0+, elsewhere dequantizes", kind="int8"),
    )
}


def get_scheme(name: str) -> Scheme:
    """The scheme registered under `name`, or a one-line error listing the valid names."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise KreaLiteError(f"unknown scheme {name!r}: choose one of {', '.join(SCHEMES)}") from None
