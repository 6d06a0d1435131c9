"""write_gguf: a synthetic diffusers transformer as a FLUX .gguf, laid out like the published ones.

Like city96's ComfyUI-GGUF convert tool lays a FLUX GGUF out: BFL tensor names, general.architecture
"flux", 1-D and tiny tensors (<= 1024 values) F32, 2-D weights whose rows are not a whole number of
blocks F16 (or BF16), every other 2-D weight in the chosen type. Tensors stream to disk one at a time
(gguf-py's GGUFWriter: tensor infos first, then the data), so the full-size model fits in RAM.

gguf-py quantizes F16/BF16/F32 and Q8_0, Q5_1, Q5_0, Q4_1, Q4_0 itself (`gguf.quants.quantize`); it has
no quantizer for the K types (Q6_K ... Q2_K). For those the codes are random bytes and each 256-weight
super-block's fp16 scale (and min) is set so that its weights have the mean and standard deviation of
the synthetic weights they stand for: valid blocks of the right magnitude, not a quantization.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import ExitStack
from pathlib import Path

import torch

from .errors import KreaLiteError
from .gguf_file import FLOAT_TYPES, QUANT_TYPES, dequantize, qtype
from .source import bfl_layout, diffusers_to_bfl, open_safetensors

TINY_TENSOR = 1024  # values: at most this many stay F32 (ComfyUI-GGUF's QUANTIZATION_THRESHOLD)
# byte offsets of the fp16 super-block scale d and min dmin inside one K block (ggml's block_qN_K structs)
K_SCALES = {"Q2_K": (80, 82), "Q3_K": (108, None), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208, None)}


def gguf_name(kind: str) -> str:
    """The file name `krea-lite synth --gguf KIND` writes beside the BFL single file."""
    return f"flux1-krea-dev-{kind}.gguf"


def _seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/gguf/{key}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _type_for(shape: tuple[int, ...], kind: str, float_type: str):
    from diffusers.quantizers.gguf.utils import GGML_QUANT_SIZES

    if len(shape) == 1 or math.prod(shape) <= TINY_TENSOR:
        return qtype("F32")
    t = qtype(kind)
    if kind in QUANT_TYPES and shape[-1] % GGML_QUANT_SIZES[t][0]:
        return qtype(float_type)
    return t


def _random_k_blocks(w: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """(rows, bytes) uint8 K blocks: random codes, scales fitted to each super-block's mean and std of `w`."""
    from diffusers.quantizers.gguf.utils import GGML_QUANT_SIZES

    t = qtype(kind)
    block, size = GGML_QUANT_SIZES[t]
    rows = w.shape[0]
    target = w.reshape(-1, block).float()
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (target.shape[0], size), dtype=torch.uint8, generator=g)
    if torch.cuda.is_available():  # the fit dequantizes twice: minutes for the full model on a CPU
        raw, target = raw.cuda(), target.cuda()
    d_at, m_at = K_SCALES[kind]

    def with_scales(d: float | torch.Tensor, m: float | torch.Tensor | None) -> torch.Tensor:
        out = raw.clone()
        for at, v in ((d_at, d), (m_at, m)):
            if at is not None:
                v = torch.as_tensor(v, dtype=torch.float32, device=out.device).expand(out.shape[0]).to(torch.float16)
                out[:, at:at + 2] = v.contiguous().view(torch.uint8).reshape(-1, 2)
        return out

    a = dequantize(with_scales(1.0, 0.0), t)  # the codes' shape with d = 1, dmin = 0
    d = target.std(1) / a.std(1).clamp_min(1e-6)
    if m_at is None:
        return with_scales(d, None).reshape(rows, -1).cpu()
    c = dequantize(with_scales(0.0, 1.0), t).mean(1)  # -(mins) with dmin = 1
    dmin = (target.mean(1) - d * a.mean(1)) / torch.where(c.abs() < 1e-6, torch.ones_like(c), c)
    return with_scales(d, dmin).reshape(rows, -1).cpu()


def _encode(w: torch.Tensor, t, seed: int):
    """The numpy array GGUFWriter writes for `w` (float32) in GGML type `t`."""
    import gguf

    if t.name == "F32":
        return w.float().numpy()
    if t.name == "F16":
        return w.half().numpy()
    if t.name in K_SCALES:
        return _random_k_blocks(w, t.name, seed).numpy()
    return gguf.quants.quantize(w.float().numpy(), t)  # BF16, Q8_0, Q5_x, Q4_x: gguf-py's own quantizer


def write_gguf(folder: Path, out: Path, kind: str, seed: int = 0, float_type: str = "F16") -> Path:
    """Write `folder`'s diffusers transformer as a FLUX GGUF of type `kind` at `out` (atomically).

    Args:
        folder: a synthetic pipeline folder (`write_synthetic`), or its `transformer/` folder.
        out: the .gguf file to create.
        kind: the GGML type of the Linear weights: one of gguf_file.QUANT_TYPES or F16/BF16/F32.
        seed: for the random codes of the K types.
        float_type: the type of 2-D weights whose rows are not whole blocks of `kind` (F16 or BF16).
    """
    import gguf
    import numpy as np

    qtype(kind)
    if float_type not in FLOAT_TYPES:
        raise KreaLiteError(f"float_type {float_type!r}: choose one of {', '.join(FLOAT_TYPES)}")
    folder = Path(folder)
    transformer = folder / "transformer" if (folder / "transformer").is_dir() else folder
    cfg = json.loads((transformer / "config.json").read_text())
    index = json.loads((transformer / "diffusion_pytorch_model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    layout = bfl_layout(cfg["num_layers"], cfg["num_single_layers"], cfg["guidance_embeds"])
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with ExitStack() as stack:
            handles = {n: stack.enter_context(open_safetensors(transformer / n)) for n in set(weight_map.values())}

            def shape(name: str) -> list[int]:
                return handles[weight_map[name]].get_slice(name).get_shape()

            writer = gguf.GGUFWriter(path=None, arch="flux")
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            writer.add_string("krea_lite.synthetic", f"random weights, type {kind}, seed {seed}")
            types = {}
            for key in sorted(layout):
                dims = [shape(p) for p in layout[key]]
                full = (sum(d[0] for d in dims), *dims[0][1:])
                t = types[key] = _type_for(full, kind, float_type)
                if t.name in ("F32", "F16"):
                    dtype = np.dtype(np.float32 if t.name == "F32" else np.float16)
                    writer.add_tensor_info(key, full, dtype, math.prod(full) * dtype.itemsize)
                else:  # uint8 rows of blocks (BF16: 2 bytes per value)
                    rows = gguf.quant_shape_to_byte_shape(full, t)
                    writer.add_tensor_info(key, rows, np.dtype(np.uint8), math.prod(rows), raw_dtype=t)
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for key in sorted(layout):
                w = diffusers_to_bfl(key, [handles[weight_map[p]].get_tensor(p) for p in layout[key]]).float()
                writer.write_tensor_data(_encode(w, types[key], _seed(seed, key)))
            writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
