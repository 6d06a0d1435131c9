"""write_lora: random LoRA files for the synthetic FLUX models, in every layout diffusers' FLUX loader reads.

A LoRA is written as "units": one low-rank pair (A: rank x in, B: out x rank) per module of the layout.
Layouts that name BFL modules fuse several diffusers modules into one unit (`double_blocks.0.img_attn.qkv`
is to_q, to_k and to_v; a single block's `linear1` is to_q, to_k, to_v and proj_mlp); diffusers' converters
copy A to every part and split B along its rows. The tensors of a unit are a pure function of (seed, the
diffusers modules it covers), so two layouts of the same (size, rank, seed, targets) that group modules
alike hold the same LoRA, and `reference` gives what the converters must turn any of them into.

    diffusers        transformer.<module>.lora_A.weight / lora_B.weight (+ .alpha); text_encoder.text_model.<...>
                     (also what ai-toolkit and peft's save_pretrained under diffusers write)
    kohya            lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight / lora_up.weight / alpha; lora_te1_...
    kohya-diffusers  lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight ... (diffusers names, kohya style)
    comfyui          diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight ...; text_encoders.clip_l.transformer...
    xlabs            double_blocks.0.processor.qkv_lora1.down.weight ... (attention only, no text encoder)
    bfl-control      double_blocks.0.img_attn.qkv.lora_A.weight ... plus the qk-norm scales of every block: BFL's
                     FLUX Control LoRA layout (always every module; krea-lite refuses these files, see lora.py)

diffusers' kohya, comfyui and bfl-control converters hard-code FLUX.1's widths (3072 / 12288) and block
counts (19 / 38): a "tiny" file in those layouts converts only where a layout leaves the hard-coded parts
out (kohya and comfyui without single blocks); test them at size "full" against a meta-device model.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import KreaLiteError

LAYOUTS = ("diffusers", "kohya", "kohya-diffusers", "comfyui", "xlabs", "bfl-control")
# The linears most LoRAs train: attention and MLP of every double and single block (no modulation, no embedders).
DEFAULT_TARGETS = (
    "transformer_blocks.*.attn.*", "transformer_blocks.*.ff.*", "transformer_blocks.*.ff_context.*",
    "single_transformer_blocks.*.attn.*", "single_transformer_blocks.*.proj_mlp",
    "single_transformer_blocks.*.proj_out",
)
ALL_TARGETS = ("*",)
CLIP_PREFIX = "text_model."  # real CLIP-L checkpoints and LoRAs keep it; transformers 5 maps it on load


@dataclass(frozen=True)
class Unit:
    """One low-rank pair of a LoRA file: `stem` in the layout's naming, covering diffusers `parts`."""

    component: str  # "transformer" | "text_encoder" | "text_encoder_2"
    stem: str
    parts: tuple[str, ...]  # module names inside the component, in the order B's rows cover them
    in_features: int
    out_features: tuple[int, ...]


def _linears(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _models(size: str) -> dict[str, nn.Module]:
    from .schemes import quiet_library_noise
    from .synthetic import SIZES, _configs, _meta_model

    quiet_library_noise()  # before diffusers imports bitsandbytes (its CPU-kernel notice is not about us)

    if size not in SIZES:
        raise KreaLiteError(f"unknown size {size!r}: choose one of {', '.join(SIZES)}")
    cfg = _configs(size)
    return {c: _meta_model(c, cfg[c]) for c in ("transformer", "text_encoder", "text_encoder_2")}


def _bfl_units(transformer: nn.Module, lin: dict[str, tuple[int, int]]) -> list[tuple[str, tuple[str, ...]]]:
    """(BFL module name, diffusers modules) for every BFL linear of the transformer."""
    from .source import bfl_layout

    cfg = transformer.config
    out = []
    for key, parts in bfl_layout(cfg.num_layers, cfg.num_single_layers, cfg.guidance_embeds).items():
        if not key.endswith(".weight"):
            continue
        mods = tuple(p.removesuffix(".weight") for p in parts)
        if all(m in lin for m in mods):  # the qk-norm scales are not linears
            out.append((key.removesuffix(".weight"), mods))
    return out


def _xlabs_units(transformer: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    cfg = transformer.config
    out = []
    for i in range(cfg.num_layers):
        b = f"transformer_blocks.{i}.attn."
        out += [(f"double_blocks.{i}.processor.qkv_lora1", (b + "to_q", b + "to_k", b + "to_v")),
                (f"double_blocks.{i}.processor.qkv_lora2", (b + "add_q_proj", b + "add_k_proj", b + "add_v_proj")),
                (f"double_blocks.{i}.processor.proj_lora1", (b + "to_out.0",)),
                (f"double_blocks.{i}.processor.proj_lora2", (b + "to_add_out",))]
    for i in range(cfg.num_single_layers):
        b = f"single_transformer_blocks.{i}."
        out += [(f"single_blocks.{i}.processor.qkv_lora", (b + "attn.to_q", b + "attn.to_k", b + "attn.to_v")),
                (f"single_blocks.{i}.processor.proj_lora", (b + "proj_out",))]
    return out


def lora_units(layout: str, size: str = "tiny", targets: tuple[str, ...] | None = None,
               text_encoder: bool = False, t5: bool = False) -> list[Unit]:
    """The units a `write_lora` file of these arguments holds (see the module docstring)."""
    if layout not in LAYOUTS:
        raise KreaLiteError(f"unknown LoRA layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    targets = DEFAULT_TARGETS if targets is None else tuple(targets)
    models = _models(size)
    tr = models["transformer"]
    lin = _linears(tr)
    if layout == "xlabs":
        groups = _xlabs_units(tr)
    elif layout in ("diffusers", "kohya-diffusers"):
        groups = [(n, (n,)) for n in lin]
    else:
        groups = _bfl_units(tr, lin)
    if layout != "bfl-control":  # BFL's converter pops every module: a control LoRA has them all
        groups = [(s, ps) for s, ps in groups if all(any(fnmatch.fnmatchcase(p, t) for t in targets) for p in ps)]
    units = [Unit("transformer", stem, parts, lin[parts[0]][0], tuple(lin[p][1] for p in parts))
             for stem, parts in groups]
    if text_encoder and layout not in ("xlabs", "bfl-control"):
        clip = _linears(models["text_encoder"])
        units += [Unit("text_encoder", CLIP_PREFIX + n, (n,), i, (o,)) for n, (i, o) in clip.items()
                  if ".layers." in n]
    if t5 and layout in ("diffusers", "kohya", "comfyui"):
        units += [Unit("text_encoder_2", n, (n,), i, (o,)) for n, (i, o) in _linears(models["text_encoder_2"]).items()]
    if not units:
        raise KreaLiteError(f"targets {targets} select no module of the {size} FLUX transformer for layout {layout!r}")
    return units


def _pair(seed: int, unit: Unit, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    digest = hashlib.sha256(f"lora/{seed}/{unit.component}/{'+'.join(unit.parts)}/{rank}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    a = torch.randn(rank, unit.in_features, generator=g) / math.sqrt(unit.in_features)
    b = torch.randn(sum(unit.out_features), rank, generator=g) * (0.2 / math.sqrt(rank))  # ~20% of the base layer
    return a.to(dtype), b.to(dtype)


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _keys(layout: str, unit: Unit) -> tuple[list[tuple[str, str]], str | None]:
    """[(A key, B key)] and the alpha key (None: the layout has no alpha)."""
    s, c = unit.stem, unit.component
    if layout == "diffusers":
        base = f"{c}.{s}"  # diffusers units are never fused
        return [(f"{base}.lora_A.weight", f"{base}.lora_B.weight")], f"{base}.alpha"
    if layout in ("kohya", "kohya-diffusers"):
        if c == "transformer":
            stem = ("lora_unet_" if layout == "kohya" else "lora_transformer_") + _flat(s)
        elif c == "text_encoder":
            stem = "lora_te1_" + _flat(s)
        else:
            stem = "lora_te2_" + _flat(s)
        return [(f"{stem}.lora_down.weight", f"{stem}.lora_up.weight")], f"{stem}.alpha"
    if layout == "comfyui":
        stem = {"transformer": "diffusion_model.", "text_encoder": "text_encoders.clip_l.transformer.",
                "text_encoder_2": "text_encoders.t5xxl.transformer."}[c] + s
        return [(f"{stem}.lora_down.weight", f"{stem}.lora_up.weight")], f"{stem}.alpha"
    if layout == "xlabs":
        return [(f"{s}.down.weight", f"{s}.up.weight")], None
    return [(f"{s}.lora_A.weight", f"{s}.lora_B.weight")], None  # bfl-control


def _check(rank: int, alpha: float | None) -> None:
    if not isinstance(rank, int) or rank <= 0:
        raise KreaLiteError(f"rank {rank!r} must be a positive integer")
    if alpha is not None and not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise KreaLiteError(f"alpha {alpha!r} must be a positive finite number")


def lora_tensors(layout: str, size: str = "tiny", rank: int = 4, seed: int = 0,
                 targets: tuple[str, ...] | None = None, text_encoder: bool = False, t5: bool = False,
                 alpha: float | None = None, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The tensors `write_lora` writes, without writing them (same arguments)."""
    _check(rank, alpha)
    out: dict[str, torch.Tensor] = {}
    for unit in lora_units(layout, size, targets, text_encoder, t5):
        a, b = _pair(seed, unit, rank, dtype)
        pairs, kalpha = _keys(layout, unit)
        (ka, kb), = pairs
        out[ka], out[kb] = a, b
        # kohya-style files always carry alpha (sd-scripts writes it; diffusers' mixture converter needs it)
        if kalpha and (alpha is not None or layout in ("kohya", "kohya-diffusers", "comfyui")):
            out[kalpha] = torch.tensor(float(rank if alpha is None else alpha), dtype=torch.float32)
    if layout == "bfl-control":
        tr = _models(size)["transformer"]
        g = torch.Generator().manual_seed(seed)
        for key, shape in _norm_scales(tr).items():
            out[key] = (1 + 0.02 * torch.randn(shape, generator=g)).to(dtype)
    return out


def _norm_scales(transformer: nn.Module) -> dict[str, tuple[int, ...]]:
    from .source import bfl_layout

    cfg = transformer.config
    params = dict(transformer.named_parameters())
    return {k: tuple(params[v[0]].shape) for k, v in bfl_layout(
        cfg.num_layers, cfg.num_single_layers, cfg.guidance_embeds).items() if k.endswith("_norm.scale")}


def reference(layout: str, size: str = "tiny", rank: int = 4, seed: int = 0,
              targets: tuple[str, ...] | None = None, text_encoder: bool = False,
              dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """What diffusers' converters must make of a `write_lora` file with alpha = rank (scale 1): peft keys
    `transformer.<module>.lora_A.weight` / `lora_B.weight` (`text_encoder.text_model.<module>...` for CLIP),
    A copied to every part of a fused unit and B split along its rows."""
    _check(rank, None)
    out = {}
    for unit in lora_units(layout, size, targets, text_encoder):
        a, b = _pair(seed, unit, rank, dtype)
        for part, rows in zip(unit.parts, torch.split(b, list(unit.out_features)), strict=True):
            name = CLIP_PREFIX + part if unit.component == "text_encoder" else part
            out[f"{unit.component}.{name}.lora_A.weight"] = a
            out[f"{unit.component}.{name}.lora_B.weight"] = rows
    return out


def write_lora(path: str | Path, layout: str = "diffusers", size: str = "tiny", rank: int = 4, seed: int = 0,
               targets: tuple[str, ...] | None = None, text_encoder: bool = False, t5: bool = False,
               alpha: float | None = None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a random LoRA for the synthetic FLUX model of `size`, with real key names and shapes.

    Args:
        path: the .safetensors file to write (replaced if it exists; written to a temporary sibling first).
        layout: one of `LAYOUTS` (see the module docstring).
        size: "tiny" or "full" (the shapes of `write_synthetic` of that size; full is FLUX.1 [dev]'s).
        rank: the LoRA rank (A is rank x in, B out x rank).
        seed: the tensors are a pure function of (seed, the modules a unit covers, rank).
        targets: fnmatch patterns over the transformer's diffusers module names; a fused unit is written when
            every module it covers matches. Default `DEFAULT_TARGETS` (attention and MLP of every block);
            `ALL_TARGETS` adds modulation, embedders and the final layer. Ignored by "bfl-control".
        text_encoder: also a LoRA on every CLIP-L encoder linear (not in xlabs or bfl-control).
        t5: also T5 units (diffusers, kohya and comfyui layouts), which diffusers' FLUX loader does not apply.
        alpha: the LoRA alpha (scale alpha / rank); None writes no alpha in the diffusers layout and
            alpha = rank in the kohya-style ones (scale 1).
        dtype: the dtype of A and B.

    Returns:
        `path`.
    """
    from safetensors.torch import save_file

    tensors = lora_tensors(layout, size, rank, seed, targets, text_encoder, t5, alpha, dtype)
    path = Path(path).expanduser()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"format": "pt", "krea_lite_synthetic": f"random LoRA, layout {layout}, size {size}, "
                                                                    f"rank {rank}, seed {seed}"})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
