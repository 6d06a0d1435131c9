"""sniff: which single-file layout a safetensors file holds, read from its own header (never its name).

A file may hold several parts (Forge and ComfyUI "checkpoints" bundle the transformer with the VAE and
text encoders, each under its own key prefix); `sniff` finds each part and its storage layout:

  transformer  "bf16"        BFL names, bf16/fp16/fp32 weights (flux1-krea-dev.safetensors)
               "fp8_scaled"  BFL names, float8 e4m3 weights with per-tensor `<layer>.scale_weight`
                             scalars and a `scaled_fp8` marker (ComfyUI flux1-krea-dev_fp8_scaled)
               "fp8"         BFL names, float8 e4m3 weights without scales (scale 1: flux1-dev-fp8)
               "nf4"         BFL names, bitsandbytes NF4 (Params4bit serialization: packed uint8
                             `X.weight` + `X.weight.absmax`, `.quant_map`, [`.nested_*`],
                             `.quant_state.bitsandbytes__nf4`), as Forge's flux1-dev-bnb-nf4(-v2)
  text_encoder_2  "float" / "fp8" / "fp8_scaled"   transformers T5EncoderModel names (t5xxl_*.safetensors)
  text_encoder    "float"    transformers CLIPTextModel names `text_model.*` (clip_l.safetensors)
  vae             "ldm"      BFL/LDM autoencoder names `encoder.down.0.block.0...` (ae.safetensors)

Everything else (an SD/SDXL UNet, CLIP-G alone, bitsandbytes FP4/int8, ComfyUI's newer mixed
`comfy_quant` files) is refused in one line. GGUF files are told apart by their magic (`is_gguf`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .errors import KreaLiteError

ROLES = ("transformer", "text_encoder_2", "text_encoder", "vae")
ROLE_NAMES = {"transformer": "FLUX transformer", "text_encoder_2": "T5-XXL text encoder",
              "text_encoder": "CLIP-L text encoder", "vae": "FLUX autoencoder (ae)"}
OPTION = {"transformer": "the source", "text_encoder_2": "--t5", "text_encoder": "--clip", "vae": "--vae"}
# One key that marks each part, relative to the part's prefix (which is whatever precedes it).
_MARKERS = {
    "transformer": ("double_blocks.0.img_attn.qkv.weight", "img_in.weight"),
    "text_encoder_2": ("encoder.block.0.layer.0.SelfAttention.q.weight",),
    "text_encoder": ("text_model.encoder.layers.0.self_attn.q_proj.weight",),
    "vae": ("decoder.up.0.block.0.conv1.weight", "encoder.down.0.block.0.conv1.weight"),
}
NF4_STATE = "quant_state.bitsandbytes__nf4"
SCALED_FP8 = "scaled_fp8"  # ComfyUI's marker tensor: an empty tensor of the fp8 dtype used
SCALE_WEIGHT = "scale_weight"
SCALE_INPUT = "scale_input"  # ComfyUI's static input scales for its own fp8 matmul: not used here
FP8 = "F8_E4M3"  # safetensors' dtype name of torch.float8_e4m3fn


@dataclass(frozen=True)
class Part:
    """One part of a single file: its key prefix, its layout and the dtypes of its tensors."""

    role: str
    prefix: str
    layout: str
    keys: tuple[str, ...]  # stored keys, prefix included
    dtypes: dict[str, int] = field(default_factory=dict)  # safetensors dtype name -> tensor count


@dataclass(frozen=True)
class Sniffed:
    path: Path
    parts: dict[str, Part]
    metadata: dict[str, str]

    def part(self, role: str) -> Part:
        """The part for `role`, or one line saying what the file holds instead."""
        if role in self.parts:
            return self.parts[role]
        if not self.parts:
            raise KreaLiteError(f"{self.path} is not a {ROLE_NAMES[role]} single file (none of its tensor names is "
                                f"one of a FLUX transformer, T5-XXL, CLIP-L or FLUX autoencoder); give a "
                                f"{ROLE_NAMES[role]} file as {OPTION[role]}")
        held = " and ".join(f"a {ROLE_NAMES[r]}" for r in self.parts)
        hint = f" (pass it as {OPTION[next(iter(self.parts))]})" if len(self.parts) == 1 else ""
        raise KreaLiteError(f"{self.path} holds {held}, not a {ROLE_NAMES[role]}{hint}; "
                            f"give a {ROLE_NAMES[role]} file as {OPTION[role]}")


def _prefix(keys: list[str], markers: tuple[str, ...]) -> str | None:
    for marker in markers:
        for k in keys:
            if k.endswith(marker) and (k == marker or k[: -len(marker)].endswith(".")):
                return k[: -len(marker)]
    return None


def _refuse_other(path: Path, keys: list[str]) -> None:
    if any(".input_blocks." in k or k.startswith("input_blocks.") for k in keys):
        raise KreaLiteError(f"{path} is a Stable Diffusion / SDXL UNet checkpoint, not FLUX; pass a FLUX.1 file")
    if any(k.endswith(".comfy_quant") for k in keys):
        raise KreaLiteError(f"{path} uses ComfyUI's mixed 'comfy_quant' format, which krea-lite does not read; "
                            "use flux1-krea-dev_fp8_scaled.safetensors or the bf16 file")
    if any(k.endswith("quant_state.bitsandbytes__fp4") for k in keys):
        raise KreaLiteError(f"{path} stores bitsandbytes FP4 weights, which krea-lite does not read; use an NF4 "
                            "or the bf16 file")
    if any(k.endswith(".SCB") for k in keys):
        raise KreaLiteError(f"{path} stores bitsandbytes int8 weights, which krea-lite does not read; use an NF4 "
                            "or the bf16 file")


def _layout(role: str, path: Path, keys: list[str], dtypes: dict[str, str]) -> str:
    names = {k.rsplit(".", 1)[-1] for k in keys}
    fp8 = any(d == FP8 for d in dtypes.values())
    if any(d == "F8_E5M2" for d in dtypes.values()):
        raise KreaLiteError(f"{path} stores float8 e5m2 weights; krea-lite reads e4m3 (fp8_e4m3fn) files only")
    if any(k.endswith(NF4_STATE) for k in keys):
        if role != "transformer":
            raise KreaLiteError(f"{path}: bitsandbytes NF4 is read for the transformer only; pass a float or fp8 "
                                f"{ROLE_NAMES[role]} file")
        return "nf4"
    if SCALED_FP8 in names or SCALE_WEIGHT in names:
        if role in ("text_encoder", "vae"):
            raise KreaLiteError(f"{path}: a scaled-fp8 {ROLE_NAMES[role]} is not read; pass the "
                                "fp16/bf16 file")
        return "fp8_scaled"
    if fp8:
        if role in ("text_encoder", "vae"):
            raise KreaLiteError(f"{path}: an fp8 {ROLE_NAMES[role]} is not read; pass the "
                                "fp16/bf16 file")
        return "fp8"
    return "ldm" if role == "vae" else ("bf16" if role == "transformer" else "float")


def sniff_file(path: Path) -> Sniffed:
    """Read the header of a single safetensors file and name its parts and their layouts.

    Raises KreaLiteError (one line) for a damaged file or a layout krea-lite refuses; a file holding
    no known part gives an empty `parts` (`Sniffed.part` says so)."""
    from .checkpoint import check_safetensors_header
    from .source import open_safetensors

    path = Path(path)
    if not path.is_file():
        raise KreaLiteError(f"{path} does not exist; check the path")
    if is_gguf(path):
        raise KreaLiteError(f"{path} is a GGUF file, not safetensors; this krea-lite reads GGUF only as the "
                            "transformer source")
    with open_safetensors(path) as f:  # a damaged header: "truncated or not a safetensors file"
        keys = list(f.keys())
        metadata = dict(f.metadata() or {})
        dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
    check_safetensors_header(path)  # data cut short or padded: one line now, not halfway through a conversion
    _refuse_other(path, keys)
    found: dict[str, str] = {}
    for role in ROLES:
        prefix = _prefix(keys, _MARKERS[role])
        if prefix is not None:
            found[role] = prefix
    if "text_encoder_2" in found and found["text_encoder_2"].endswith("decoder."):
        del found["text_encoder_2"]  # a T5 decoder block: not an encoder file (never expected)
    parts = {}
    for role, prefix in found.items():
        others = [p for r, p in found.items() if r != role and p.startswith(prefix) and len(p) > len(prefix)]
        mine = [k for k in keys if k.startswith(prefix) and not any(k.startswith(o) for o in others)]
        if role == "transformer":  # a bundle's transformer part: the other parts sit under their own prefixes
            mine = [k for k in mine if not any(k.startswith(p) for r, p in found.items() if r != role and p)]
        part_dtypes = {k: dtypes[k] for k in mine}
        parts[role] = Part(role, prefix, _layout(role, path, mine, part_dtypes), tuple(mine),
                           dict(Counter(part_dtypes.values())))
    return Sniffed(path, parts, metadata)


def is_gguf(path: Path) -> bool:
    """True when the file starts with the GGUF magic b"GGUF" (the format comes from the header, not the name)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
