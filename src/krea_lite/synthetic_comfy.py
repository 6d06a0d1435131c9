"""write_comfy_files: the single files ComfyUI and Forge users hold, made from a synthetic folder.

From a folder of `synthetic.write_synthetic` (tiny or full) this writes, with the real key names and
storage layouts (see formats.py):
  flux1-krea-dev_fp8_scaled.safetensors   ComfyUI scaled fp8: BFL names under `model.diffusion_model.`,
                                          float8 e4m3 Linear weights with a per-tensor fp32 `scale_weight`
                                          (weight ~= fp8 * scale), a `scaled_fp8` marker; biases, norms and
                                          the final layer in bf16
  flux1-krea-dev-bnb-nf4.safetensors      Forge bitsandbytes NF4 (v2 layout: fp32 absmax, no double quant;
                                          `double_quant=True`: v1's nested absmax), BFL names
  t5xxl_fp16.safetensors                  transformers T5EncoderModel names, fp16 (shared + embed_tokens)
  t5xxl_fp8_e4m3fn_scaled.safetensors     the same with fp8 Linear weights + scale_weight
  clip_l.safetensors                      CLIPTextModel names `text_model.*` in fp16, plus text_projection
                                          and logit_scale, as ComfyUI's clip_l ships
  ae.safetensors                          the VAE under BFL/LDM names (`encoder.down.0.block.0...`)

The files are written tensor by tensor (data first, the header after it), so the full-size ones
stream through host memory. Random weights are the folder's own; only storage differs.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from contextlib import ExitStack
from pathlib import Path

import torch

from .errors import KreaLiteError
from .source import bfl_layout, diffusers_to_bfl, open_safetensors

FILES = {
    "fp8_scaled": "flux1-krea-dev_fp8_scaled.safetensors",
    "nf4": "flux1-krea-dev-bnb-nf4.safetensors",
    "t5_fp16": "t5xxl_fp16.safetensors",
    "t5_fp8_scaled": "t5xxl_fp8_e4m3fn_scaled.safetensors",
    "clip_l": "clip_l.safetensors",
    "ae": "ae.safetensors",
}
COMFY_PREFIX = "model.diffusion_model."
FP8_MAX = 448.0  # float8 e4m3fn
# Stored in bf16 by the synthetic fp8_scaled file (everything else that is a Linear weight is fp8);
# its embedders are fp8, so a reader has both cases: native fp8 and fp8 of a module it keeps bf16.
FP8_BF16_KEYS = re.compile(r"^final_layer\.")
# Stored in bf16 by the synthetic NF4 file (a Linear Forge left unquantized: read as kept)
NF4_BF16_KEYS = re.compile(r"^final_layer\.linear\.")
_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3",
           torch.uint8: "U8"}


class StreamingWriter:
    """A safetensors file written one tensor at a time: data to a side file, then header + data."""

    def __init__(self, path: Path, metadata: dict[str, str] | None = None):
        self.path, self.metadata = path, metadata or {}
        self.data_path = path.with_name(path.name + ".data")
        self.data = open(self.data_path, "wb")
        self.header: dict = {}
        self.offset = 0

    def add(self, key: str, t: torch.Tensor) -> None:
        t = t.detach().cpu().contiguous()
        nbytes = t.numel() * t.element_size()
        self.header[key] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                            "data_offsets": [self.offset, self.offset + nbytes]}
        if nbytes:
            self.data.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self.offset += nbytes

    def close(self) -> Path:
        self.data.close()
        blob = json.dumps({"__metadata__": self.metadata, **self.header}, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(self.path, "wb") as f, open(self.data_path, "rb") as data:
            f.write(struct.pack("<Q", len(blob)) + blob)
            shutil.copyfileobj(data, f, 64 << 20)
        self.data_path.unlink()
        return self.path


def _fp8_scaled(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's per-tensor scaled fp8: (fp8, fp32 scalar scale) with t ~= fp8 * scale."""
    scale = (t.abs().amax().float() / FP8_MAX).clamp(min=1e-12)
    return (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale.reshape(())


def _is_linear_weight(key: str, t: torch.Tensor) -> bool:
    embeddings = ("embedding.weight", "shared.weight", "embed_tokens.weight", "relative_attention_bias.weight")
    return key.endswith(".weight") and t.dim() == 2 and not key.endswith(embeddings)


def _bfl_tensors(folder: Path):
    """(BFL key, bf16 tensor) of the folder's transformer, in sorted key order (as the BFL file)."""
    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    index = json.loads((folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    layout = bfl_layout(cfg["num_layers"], cfg["num_single_layers"], cfg["guidance_embeds"])
    with ExitStack() as stack:
        handles = {n: stack.enter_context(open_safetensors(folder / "transformer" / n)) for n in set(weight_map.values())}
        for key in sorted(layout):
            yield key, diffusers_to_bfl(key, [handles[weight_map[p]].get_tensor(p) for p in layout[key]])


def _component_tensors(folder: Path, component: str):
    files = sorted((folder / component).glob("*.safetensors"))
    for path in files:
        with open_safetensors(path) as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def write_fp8_scaled(folder: Path, path: Path) -> Path:
    w = StreamingWriter(path, {"format": "pt"})
    for key, t in _bfl_tensors(folder):
        if _is_linear_weight(key, t) and not FP8_BF16_KEYS.match(key):
            q, scale = _fp8_scaled(t)
            w.add(COMFY_PREFIX + key, q)
            w.add(COMFY_PREFIX + key.removesuffix(".weight") + ".scale_weight", scale)
        else:
            w.add(COMFY_PREFIX + key, t)
    w.add(COMFY_PREFIX + "scaled_fp8", torch.empty(0, dtype=torch.float8_e4m3fn))
    return w.close()


def write_nf4(folder: Path, path: Path, double_quant: bool = False) -> Path:
    """Forge's layout: bitsandbytes Linear4bit's own state dict keys under BFL names."""
    from .compat import bnb

    functional = bnb().functional
    w = StreamingWriter(path, {"format": "pt"})
    for key, t in _bfl_tensors(folder):
        if _is_linear_weight(key, t) and not NF4_BF16_KEYS.match(key):
            packed, state = functional.quantize_4bit(t.contiguous(), blocksize=64, compress_statistics=double_quant,
                                                     quant_type="nf4")
            w.add(COMFY_PREFIX + key, packed)
            for k, v in state.as_dict(packed=True).items():
                w.add(f"{COMFY_PREFIX}{key}.{k}", v)
        else:
            w.add(COMFY_PREFIX + key, t)
    return w.close()


def write_t5(folder: Path, path: Path, fp8: bool) -> Path:
    """t5xxl_fp16 (fp8=False; embed_tokens stored beside shared, tied) or t5xxl_fp8_e4m3fn_scaled."""
    w = StreamingWriter(path, {"format": "pt"} | ({"scaled_fp8": "e4m3fn"} if fp8 else {}))
    for key, t in _component_tensors(folder, "text_encoder_2"):
        if fp8 and _is_linear_weight(key, t):
            q, scale = _fp8_scaled(t)
            w.add(key, q)
            w.add(key.removesuffix(".weight") + ".scale_weight", scale)
        else:
            w.add(key, t.to(torch.float16))
        if key == "shared.weight" and not fp8:
            w.add("encoder.embed_tokens.weight", t.to(torch.float16))
    if fp8:
        w.add("scaled_fp8", torch.empty(0, dtype=torch.float8_e4m3fn))
    return w.close()


def write_clip(folder: Path, path: Path) -> Path:
    cfg = json.loads((folder / "text_encoder" / "config.json").read_text())
    w = StreamingWriter(path, {"format": "pt"})
    for key, t in _component_tensors(folder, "text_encoder"):
        w.add(key, t.to(torch.float16))
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(cfg["projection_dim"], cfg["hidden_size"], generator=g) / math.sqrt(cfg["hidden_size"])
    w.add("text_projection.weight", proj.to(torch.float16))  # CLIPTextModelWithProjection's: not FLUX's
    w.add("logit_scale", torch.tensor(4.6052, dtype=torch.float16))
    return w.close()


def ldm_vae_name(name: str, num_up: int) -> str:
    """A diffusers AutoencoderKL tensor name -> its BFL/LDM name (the inverse of diffusers'
    convert_ldm_vae_checkpoint, which reads these files; tests check the round trip)."""
    name = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", name)
    name = re.sub(r"down_blocks\.(\d+)\.resnets\.(\d+)\.", r"down.\1.block.\2.", name)
    name = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", name)
    name = re.sub(r"up_blocks\.(\d+)\.resnets\.(\d+)\.",
                  lambda m: f"up.{num_up - 1 - int(m[1])}.block.{m[2]}.", name)
    name = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{num_up - 1 - int(m[1])}.upsample.", name)
    name = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", name)
    name = name.replace("conv_shortcut.", "nin_shortcut.")
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for new, old in attn.items():
        name = name.replace(f"mid_block.attentions.0.{new}.", f"mid.attn_1.{old}.")
    return name


def write_ae(folder: Path, path: Path) -> Path:
    cfg = json.loads((folder / "vae" / "config.json").read_text())
    w = StreamingWriter(path, {"format": "pt"})
    for key, t in _component_tensors(folder, "vae"):
        ldm = ldm_vae_name(key, len(cfg["up_block_types"]))
        if ".attn_1." in ldm and ldm.endswith(".weight") and t.dim() == 2:
            t = t[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        w.add(ldm, t)
    return w.close()


def write_comfy_files(folder: str | Path, out: str | Path | None = None, double_quant: bool = False,
                      force: bool = False, kinds: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Write the ComfyUI/Forge single files of a synthetic folder into `out` (default `<folder>-comfy`).

    Args:
        folder: a folder written by `synthetic.write_synthetic`.
        out: the folder to create; it appears only when complete.
        double_quant: the NF4 file with nested (double-quantized) absmax, like Forge's v1 file.
        force: replace an existing `out` written by this function.
        kinds: which files (keys of FILES); default all (the full-size set is ~40 GB).

    Returns:
        {kind (a key of FILES): path}.
    """
    kinds = tuple(FILES) if kinds is None else tuple(kinds)
    if unknown := sorted(set(kinds) - set(FILES)):
        raise KreaLiteError(f"unknown single-file kind {unknown[0]!r}: choose from {', '.join(FILES)}")
    from .source import SYNTHETIC_MARKER

    folder = Path(folder).expanduser().resolve()
    if not (folder / SYNTHETIC_MARKER).is_file():
        raise KreaLiteError(f"{folder} is not a synthetic model folder (no {SYNTHETIC_MARKER}); "
                            "write one with `krea-lite synth`")
    out = Path(out).expanduser().resolve() if out else folder.with_name(folder.name + "-comfy")
    marker = out / "krea_lite_synthetic_comfy.json"
    if out.exists() and not (force and marker.is_file()):
        raise KreaLiteError(f"{out} already exists; pass --force to replace an earlier one or choose another folder")
    tmp = out.with_name(f".{out.name}.comfy-tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writers = {"fp8_scaled": write_fp8_scaled, "nf4": lambda f, p: write_nf4(f, p, double_quant=double_quant),
                   "t5_fp16": lambda f, p: write_t5(f, p, fp8=False), "t5_fp8_scaled": lambda f, p: write_t5(f, p, fp8=True),
                   "clip_l": write_clip, "ae": write_ae}
        for kind in kinds:
            writers[kind](folder, tmp / FILES[kind])
        (tmp / marker.name).write_text(json.dumps({"from": str(folder), "double_quant": double_quant}) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {k: out / FILES[k] for k in kinds}
