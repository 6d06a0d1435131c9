"""GGUF transformer files (city96 / QuantStack FLUX GGUFs, as ComfyUI-GGUF reads them): the reader and the module.

A FLUX GGUF holds the BFL transformer under BFL names (`double_blocks.0.img_attn.qkv.weight`, ...),
general.architecture "flux", small tensors as F32/F16/BF16 and Linear weights in GGML blocks (Q8_0 ...
Q2_K). GGUF lists shapes innermost first (ne order): torch's (rows, in) is the reverse. A block covers
`block_size` consecutive weights of one row and rows start on a block boundary, so the raw bytes of a
quantized (rows, in) weight are a (rows, in / block_size * type_size) uint8 array, and a fused BFL
tensor (qkv, single-block linear1) splits into its diffusers parts by rows, exactly, with no dequantize.
The final adaLN's (shift, scale) -> (scale, shift) swap is a row operation too.

`GGUFFile` is the source.Reader: `iter_native` yields those raw rows (scheme "gguf", kept as stored),
`iter_tensors` dequantized bf16 (for `--transformer nf4` and the like). `GGUFLinear` is diffusers' own
GGUFLinear over GGUFParameter, dequantizing with diffusers' torch kernels (in float32, then bf16).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers.quantizers.gguf.utils import GGML_QUANT_SIZES, GGUFParameter, dequantize_functions
from diffusers.quantizers.gguf.utils import GGUFLinear as DiffusersGGUFLinear

from .errors import KreaLiteError
from .source import _COMFY_PREFIX, SWAPPED, Reader, flux_layout, swap_halves

FLOAT_TYPES = ("F32", "F16", "BF16")  # stored as bf16 tensors (kept modules)
QUANT_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K")  # kept as GGUF
ARCH = "flux"


def _gguf():
    import gguf  # a dependency (diffusers' GGUF module above imports it too)

    return gguf


def qtype(name_or_id) -> object:
    """The GGMLQuantizationType for a name ("Q4_K") or id, if krea-lite computes with it; else one line."""
    T = _gguf().GGMLQuantizationType
    try:
        t = T[name_or_id] if isinstance(name_or_id, str) else T(int(name_or_id))
    except (KeyError, ValueError):
        raise KreaLiteError(f"unknown GGML tensor type {name_or_id!r}: krea-lite reads "
                            f"{', '.join(FLOAT_TYPES + QUANT_TYPES)}") from None
    if t.name not in FLOAT_TYPES + QUANT_TYPES:
        raise KreaLiteError(f"GGML tensor type {t.name} is not one krea-lite computes with ("
                            f"{', '.join(FLOAT_TYPES + QUANT_TYPES)}); use a file of another type")
    return t


def dequantize(raw: torch.Tensor, quant_type) -> torch.Tensor:
    """float32 weights of a (rows, bytes) uint8 tensor of GGML blocks, with diffusers' torch kernels.

    diffusers' GGUFLinear runs them in float16 (their default dtype); float32 here gives the same
    numbers as gguf-py's reference `gguf.quants.dequantize` (the scales are fp16, the codes small ints)."""
    block_size, type_size = GGML_QUANT_SIZES[quant_type]
    rows = raw.shape[:-1]
    blocks = raw.reshape(-1, type_size)
    out = dequantize_functions[quant_type](blocks, block_size, type_size, torch.float32)
    return out.reshape(*rows, raw.shape[-1] // type_size * block_size)


def logical_shape(raw: torch.Tensor, quant_type) -> tuple[int, int]:
    """The (rows, in) weight shape that (rows, bytes) uint8 GGML blocks of `quant_type` hold."""
    t = qtype(quant_type)
    block_size, type_size = GGML_QUANT_SIZES[t]
    if raw.dim() != 2 or raw.dtype != torch.uint8 or raw.shape[1] % type_size:
        raise KreaLiteError(f"a {t.name} weight of shape {tuple(raw.shape)} ({raw.dtype}) is not rows of whole "
                            f"{type_size}-byte blocks; re-create the folder or re-download the file")
    return (raw.shape[0], raw.shape[1] // type_size * block_size)


class KeptParameter(GGUFParameter):
    """diffusers' GGUFParameter (uint8 rows + `quant_type`) without its `__torch_function__` wrapping, like a
    plain nn.Parameter: ops on it give plain tensors, so torch.compile traces it as an ordinary graph input
    (diffusers' wrapping makes Dynamo type the block's outputs GGUFParameter: a recompile and a KeyError)."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def as_tensor(self):
        return self.view(torch.uint8)


class GGUFLinear(DiffusersGGUFLinear):
    """diffusers' GGUFLinear, dequantizing in float32 (`dequantize`) before the bf16 matmul.

    The weight is a diffusers GGUFParameter (uint8 rows + `quant_type`), which keeps its type when the
    streaming engine re-points its `.data`; under torch.compile the dequantize fuses into the block's
    graph (no graph break: tests/test_gguf.py)."""

    def forward(self, inputs):  # never diffusers' CUDA kernels (fetched from the hub at run time when enabled)
        return self.forward_native(inputs)

    def forward_native(self, inputs):
        w = self.weight
        weight = dequantize(w.as_tensor(), w.quant_type).to(self.compute_dtype)
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        return torch.nn.functional.linear(inputs, weight, bias)


def gguf_linear(in_features: int, out_features: int, bias: bool) -> GGUFLinear:
    """A GGUFLinear on the meta device (bf16 compute), for `load_component` to fill."""
    with torch.device("meta"):
        return GGUFLinear(in_features, out_features, bias, compute_dtype=torch.bfloat16)


def gguf_parameter(raw: torch.Tensor, quant_type) -> KeptParameter:
    return KeptParameter(raw, requires_grad=False, quant_type=qtype(quant_type))


# ---------------------------------------------------------------------------------------------------


def _open(path: Path):
    """gguf.GGUFReader (memory-mapped) with one-line errors for damaged files."""
    gguf = _gguf()
    try:
        return gguf.GGUFReader(path)
    except FileNotFoundError:
        raise KreaLiteError(f"{path} is missing; re-download it") from None
    except ValueError as e:
        if "GGMLQuantizationType" in str(e):  # a type id this gguf package does not know
            raise KreaLiteError(f"{path} stores a tensor of unknown GGML type ({e}); krea-lite reads "
                                f"{', '.join(FLOAT_TYPES + QUANT_TYPES)}: use a file of one of those types") from None
        raise KreaLiteError(f"{path} is truncated or not a valid GGUF file ({e}); re-download it") from None
    except (IndexError, KeyError, OSError, OverflowError, UnicodeDecodeError) as e:
        raise KreaLiteError(f"{path} is truncated or not a valid GGUF file ({type(e).__name__}: {e}); "
                            "re-download it") from None


def _field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


class GGUFFile(Reader):
    """A FLUX transformer in a GGUF file: quantized Linears stay GGUF blocks (scheme "gguf")."""

    format = "gguf"
    native_scheme = "gguf"

    def __init__(self, path: Path):
        super().__init__(path)
        reader = _open(path)
        arch = _field(reader, "general.architecture")
        if arch is not None and arch != ARCH:
            raise KreaLiteError(f"{path} is a GGUF of architecture {arch!r}, not a FLUX transformer ({ARCH!r}); "
                                "pass a FLUX .gguf (e.g. flux1-krea-dev-Q4_K_S.gguf)")
        tensors = {t.name: t for t in reader.tensors}
        prefix = _COMFY_PREFIX if any(k.startswith(_COMFY_PREFIX) for k in tensors) else ""
        names = {k[len(prefix):]: k for k in tensors if k.startswith(prefix)}
        if "img_in.weight" not in names or not any(n.startswith("double_blocks.") for n in names):
            raise KreaLiteError(f"{path} is not a FLUX transformer GGUF (no img_in / double_blocks.* tensors); "
                                "pass a FLUX .gguf or a diffusers folder")
        layout = flux_layout(path, names, "pass a FLUX .gguf or a diffusers folder")
        self.types: dict[str, str] = {}  # BFL key -> GGML type name
        self.shapes: dict[str, tuple[int, ...]] = {}  # BFL key -> torch (logical) shape
        for n, key in names.items():
            t = tensors[key]
            try:
                self.types[n] = qtype(int(t.tensor_type)).name
            except KreaLiteError as e:
                raise KreaLiteError(f"{path}: tensor {key!r}: {e}") from None
            self.shapes[n] = tuple(int(d) for d in reversed(t.shape.tolist()))
            if self.types[n] in QUANT_TYPES and len(self.shapes[n]) != 2:
                raise KreaLiteError(f"{path}: tensor {key!r} is {self.types[n]}-quantized with shape "
                                    f"{self.shapes[n]}; only 2-D Linear weights are, in a FLUX GGUF: re-download it")
        self.hidden = self.shapes["img_in.weight"][0]
        self.layout = layout
        self.keys = {n: names[n] for n in self.layout}  # BFL name -> key in the file (ComfyUI prefix)
        for n, parts in self.layout.items():
            rows = self.shapes[n][0]
            if len(parts) > 1 and rows <= self.hidden * (len(parts) - 1):
                raise KreaLiteError(f"{path}: tensor {n!r} has {rows} rows, too few for its {len(parts)} fused "
                                    f"parts of {self.hidden} (img_in's width); the shapes do not match FLUX")

    def tensor_names(self):
        return [p for parts in self.layout.values() for p in parts]

    def _rows(self) -> Iterator[tuple[str, str, torch.Tensor]]:
        """(diffusers name, GGML type, stored part) per tensor: uint8 rows for blocks and BF16, else floats."""
        reader = _open(self.path)
        tensors = {t.name: t for t in reader.tensors}
        for n, parts in self.layout.items():
            import numpy as np

            t, kind = tensors[self.keys[n]], self.types[n]
            try:
                data = torch.from_numpy(np.array(t.data))  # one tensor copied out of the memory map
            except (OSError, ValueError) as e:
                raise KreaLiteError(f"{self.path}: tensor {n!r} cannot be read ({e}); re-download the file") from None
            if kind == "BF16":
                data = data.view(torch.bfloat16)
            data = data.reshape(self.shapes[n][0], -1) if data.dim() > 1 else data
            if n in SWAPPED:
                data = swap_halves(data)
            rows = data.shape[0]
            sizes = [self.hidden] * (len(parts) - 1) + [rows - self.hidden * (len(parts) - 1)]
            for name, part in zip(parts, torch.split(data, sizes), strict=True):
                yield name, kind, part.clone()

    def iter_tensors(self):
        for name, kind, part in self._rows():
            yield name, (dequantize(part, qtype(kind)) if kind in QUANT_TYPES else part).to(torch.bfloat16)

    def iter_native(self):
        for name, kind, part in self._rows():
            if kind in QUANT_TYPES and name.endswith(".weight"):
                yield name.removesuffix(".weight"), {"weight": part,
                                                     "weight_type": torch.tensor(int(qtype(kind)), dtype=torch.uint8)}
            elif kind in QUANT_TYPES:
                yield name, dequantize(part, qtype(kind)).to(torch.bfloat16)
            else:
                yield name, part.to(torch.bfloat16)

    def native_info(self):
        counts: dict[str, int] = {}
        for kind in self.types.values():
            counts[kind] = counts.get(kind, 0) + 1
        modules = {p.removesuffix(".weight"): self.types[n] for n, parts in self.layout.items() for p in parts
                   if self.types[n] in QUANT_TYPES and p.endswith(".weight")}
        return {"tensor_types": dict(sorted(counts.items())), "module_types": modules}
