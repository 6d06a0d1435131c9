"""LoRA on krea-lite pipelines: diffusers' own loader and converters, with the file checked first.

`pipe.load_lora_weights`, `set_adapters`, `disable_lora`/`enable_lora`, `delete_adapters` and
`unload_lora_weights` work on a pipeline from `load_pipeline` as on any FluxPipeline (bf16, the
bitsandbytes schemes, fp8mm and int8mm; for the optimum-quanto schemes and gguf diffusers' `load_lora_weights`
would fail midway in its shape-expansion step, which reads `<module>.weight`, so it refuses: use `load_lora`). This module
adds what a tool needs around them:

- `read_lora_file` checks a file before anything is loaded (safetensors only, nothing is unpickled;
  truncated or corrupt headers, NaN, LoRAs for other architectures, DoRA/LoKr, FLUX Control LoRAs);
- `match_lora` runs diffusers' converter (`FluxPipeline.lora_state_dict`: diffusers/peft, kohya,
  ComfyUI, XLabs, ... layouts) and checks every module, rank and shape against the pipeline;
- `load_lora` / `use_loras` load through diffusers' `load_lora_into_transformer` and
  `load_lora_into_text_encoder` (what `load_lora_weights` calls, minus the shape expansion that
  would widen a layer for a LoRA of another shape), and delete a half-made adapter on failure;
  switching LoRAs never touches the base weights;
- `guard_fuse` makes `fuse_lora` on a quantized transformer (and `load_lora_weights` where it would fail)
  refuse in one line: merging would
  requantize the weights (peft's bitsandbytes merge dequantizes, adds and quantizes again, and on a
  plain `lora.Linear` wrapping a quantized layer it would add to the packed bytes).

Adapters stay unmerged (peft's side branch: base(x) + scale * B(A(x))) in the base's compute dtype.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .errors import KreaLiteError

COMPONENTS = ("transformer", "text_encoder")  # what diffusers' FLUX loader puts LoRAs on (T5 is not one)
_SCALE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_NOT_FINITE = re.compile(r"[+-]?(nan|inf|infinity)", re.IGNORECASE)
_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U8", "BOOL"}
_HEADER_LIMIT = 100 << 20  # safetensors' own cap on the JSON header
_REGISTRY = "krea_lite_loras"  # pipe attribute: {adapter name: LoadedLora} of what this module loaded


# ------------------------------------------------------------------------------------------ specs


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to use: a .safetensors file and its scale. `file` holds the checked file once read."""

    path: Path
    scale: float = 1.0
    file: LoraFile | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path).expanduser())
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise KreaLiteError(f"LoRA scale {self.scale!r} for {self.path} must be a finite number (e.g. 0.8)")
        object.__setattr__(self, "scale", float(self.scale))

    def checked(self) -> LoraSpec:
        """This spec with its file read and checked (`read_lora_file`), so a bad file fails before a model loads."""
        return self if self.file is not None else replace(self, file=read_lora_file(self.path))


def parse_lora_arg(text: str) -> LoraSpec:
    """`FILE[:SCALE]` -> LoraSpec. The scale is what follows the last ':' when that is a number, so
    Windows paths (C:\\loras\\x.safetensors) and file names with colons need no quoting; SCALE defaults to 1.0."""
    head, sep, tail = text.rpartition(":")
    if sep and head and _NOT_FINITE.fullmatch(tail.strip()):
        raise KreaLiteError(f"--lora {text}: scale {tail.strip()!r} must be a finite number (e.g. {head}:0.8)")
    if sep and head and _SCALE.fullmatch(tail.strip()):
        return LoraSpec(Path(head), float(tail))
    if not text:
        raise KreaLiteError("--lora needs a file: --lora FILE[:SCALE], e.g. --lora style.safetensors:0.8")
    return LoraSpec(Path(text))


def lora_specs(args: Sequence[str] | None) -> list[LoraSpec]:
    """The CLI's `--lora` values, parsed and their files checked (before the model loads)."""
    specs = [parse_lora_arg(a).checked() for a in args or ()]
    seen: dict[str, Path] = {}
    for s in specs:
        if s.file.sha256 in seen:
            raise KreaLiteError(f"--lora {s.path} is the same file as {seen[s.file.sha256]}; give it once "
                                "(scales add up: use one --lora FILE:SCALE)")
        seen[s.file.sha256] = s.path
    return specs


# ------------------------------------------------------------------------------------- the file


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file read and checked on its own (no model needed)."""

    path: Path
    sha256: str
    nbytes: int
    layout: str  # as diffusers will read it: "diffusers/peft", "kohya", "ComfyUI (BFL names)", ...
    tensors: dict = field(repr=False, compare=False)
    metadata: dict | None = field(default=None, repr=False, compare=False)  # lora_adapter_metadata, if saved
    t5_modules: int = 0  # modules for T5 (text_encoder_2), which diffusers' FLUX loader does not apply


def _fail(path: Path, what: str) -> KreaLiteError:
    return KreaLiteError(f"LoRA {path}: {what}")


def _header(path: Path, data: bytes) -> dict:
    """The safetensors header of `data`, checked against the file's size; one line if it is not one."""
    if data[:4] == b"PK\x03\x04":
        raise _fail(path, "is a PyTorch zip checkpoint (.pt/.pth/.bin/.ckpt), not safetensors; krea-lite never "
                          "unpickles files: get the .safetensors version of this LoRA")
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise _fail(path, "is a Python pickle, not safetensors; krea-lite never unpickles files: get the "
                          ".safetensors version of this LoRA")
    if len(data) < 8:
        raise _fail(path, f"is {len(data)} bytes long, too short for a safetensors file; re-download it")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _HEADER_LIMIT or 8 + n > len(data):
        raise _fail(path, f"is truncated or not a safetensors file (its first 8 bytes announce a {n}-byte header; "
                          f"the file has {len(data)} bytes); re-download it")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"has a corrupt safetensors header ({e.__class__.__name__} at byte {8 + getattr(e, 'pos', 0)}); "
                          "re-download it") from None
    if not isinstance(header, dict):
        raise _fail(path, "has a corrupt safetensors header (not a JSON object); re-download it")
    have, end = len(data) - 8 - n, 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        ok = (isinstance(info, dict) and info.get("dtype") in _DTYPES and isinstance(info.get("shape"), list)
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2)
        if not ok:
            raise _fail(path, f"has a corrupt safetensors header (entry {key!r}); re-download it")
        end = max(end, info["data_offsets"][1])
    if end > have:
        raise _fail(path, f"is truncated: its header describes {end} bytes of tensor data and the file holds "
                          f"{have}; re-download it")
    return header


def _layout(keys: list[str]) -> str:
    """The layout, in the order diffusers' `FluxLoraLoaderMixin.lora_state_dict` tests for them."""
    if any(".lora_down.weight" in k for k in keys):
        if any(k.startswith("lora_transformer_") for k in keys):
            return "kohya (diffusers names)"
        if any(k.startswith("diffusion_model.") for k in keys):
            return "ComfyUI (BFL names)"
        if any(k.startswith("transformer.") for k in keys):
            return "diffusers/kohya mix"
        return "kohya"
    if any("processor" in k for k in keys):
        return "XLabs"
    if any("query_norm.scale" in k for k in keys):
        return "BFL control"
    if any("base_model" in k for k in keys):
        return "fal Kontext"
    return "diffusers/peft"


_UNET = ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block")


def _foreign(keys: list[str]) -> str | None:
    """The architecture a LoRA was made for when its keys say it is not FLUX.1, else None."""
    if any(u in k for k in keys for u in _UNET):
        sdxl = any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys)
        example = next(k for k in keys if any(u in k for u in _UNET))
        return f"{'SDXL' if sdxl else 'Stable Diffusion 1.x/2.x or SDXL'} (UNet keys such as {example!r})"
    if any("joint_blocks" in k or ".context_block." in k or "x_block" in k for k in keys):
        return "Stable Diffusion 3 (keys such as " + repr(next(k for k in keys if "block" in k)) + ")"
    return None


def _t5_modules(keys: list[str]) -> int:
    t5 = {re.sub(r"\.(lora_(A|B|down|up)\.weight|alpha)$", "", k) for k in keys
          if k.startswith(("lora_te2_", "text_encoders.t5xxl.", "text_encoder_2."))}
    return len(t5)


def read_lora_file(path: str | Path) -> LoraFile:
    """Read a LoRA .safetensors file and check it without a model: one KreaLiteError line if it is not a
    LoRA that diffusers' FLUX loader can use. Reads the file once (the sha256 is of those bytes)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path).expanduser()
    if not path.exists():
        raise _fail(path, "does not exist (to give a scale write FILE:SCALE, e.g. style.safetensors:0.8)")
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.safetensors"))
        hint = f" (it holds {', '.join(inside[:3])})" if inside else ""
        raise _fail(path, f"is a folder; give the LoRA's .safetensors file{hint}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _fail(path, f"cannot be read: {e.strerror}") from None
    header = _header(path, data)
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise _fail(path, f"is not a readable safetensors file ({e}); re-download it") from None
    keys = list(tensors)
    if not keys:
        raise _fail(path, "holds no tensors")
    meta = header.get("__metadata__") or {}
    adapter_meta = None
    if isinstance(meta, dict) and meta.get("lora_adapter_metadata"):
        try:
            adapter_meta = json.loads(meta["lora_adapter_metadata"])
        except json.JSONDecodeError:
            raise _fail(path, "has corrupt 'lora_adapter_metadata' (not JSON); re-save or re-download it") from None
    if foreign := _foreign(keys):
        raise _fail(path, f"is a LoRA for {foreign}, not for FLUX.1; krea-lite runs FLUX.1 Krea [dev]")
    if any("lokr_" in k or "hada_" in k for k in keys):
        raise _fail(path, "is a LyCORIS LoKr/LoHa file, which diffusers' FLUX.1 loader does not read; "
                          "use a plain LoRA")
    if any("dora_scale" in k or "lora_magnitude_vector" in k for k in keys):
        raise _fail(path, "is a DoRA; diffusers' FLUX loader would drop its magnitude vectors and apply "
                          "something else: use a plain LoRA")
    lora_keys = [k for k in keys if re.search(r"lora_(A|B|down|up)\b|\.(down|up)\.weight$", k)]
    if not lora_keys:
        raise _fail(path, f"holds no LoRA tensors (no lora_A/lora_B or lora_down/lora_up keys among its {len(keys)}; "
                          f"first: {keys[0]!r}): is it a model checkpoint rather than a LoRA?")
    if any(k.endswith(("query_norm.scale", "key_norm.scale")) or ".norm_q." in k or ".norm_k." in k for k in keys):
        raise _fail(path, "is a FLUX Control LoRA (it replaces the attention norms; Canny/Depth ones also widen "
                          "x_embedder): it needs FluxControlPipeline and a control image, which krea-lite does not run")
    for k, t in tensors.items():
        if not t.is_floating_point():
            raise _fail(path, f"tensor {k!r} is {t.dtype}, not floating point; the file is not a LoRA or is damaged")
        # a float32 sum is NaN/inf when any element is (4x faster than isfinite on bf16); confirm exactly
        if not torch.isfinite(t.sum(dtype=torch.float32)) and not torch.isfinite(t).all():
            raise _fail(path, f"tensor {k!r} holds NaN or infinite values; the file is damaged (or the training "
                              "diverged): re-download it")
    return LoraFile(path=path, sha256=hashlib.sha256(data).hexdigest(), nbytes=len(data), layout=_layout(keys),
                    tensors=tensors, metadata=adapter_meta, t5_modules=_t5_modules(keys))


# ------------------------------------------------------------------------ matching the pipeline


@dataclass(frozen=True)
class LoraMatch:
    """A checked file converted by diffusers and matched against one pipeline's modules."""

    file: LoraFile
    state: dict = field(repr=False)  # peft keys with their component prefix, only modules that exist
    alphas: dict = field(repr=False)  # network alphas of those modules ({} when none)
    modules: dict  # component -> number of modules the LoRA changes
    ranks: tuple[int, ...]
    unmatched: tuple[str, ...]  # modules of the LoRA that this pipeline does not have
    adapter_bytes: int  # A and B as they will be stored (the base's compute dtype, 2 bytes)

    def summary(self, scale: float | None = None) -> str:
        """One line: file, layout, rank, scale and how many modules the LoRA changes."""
        ranks = "/".join(map(str, self.ranks)) if len(self.ranks) <= 3 else f"{self.ranks[0]}-{self.ranks[-1]}"
        parts = ", ".join(f"{COMPONENT_NAMES[c]} {n}" for c, n in self.modules.items() if n)
        line = (f"LoRA {self.file.path.name} ({self.file.layout}, rank {ranks}"
                + (f", scale {scale:g}" if scale is not None else "")
                + f"): changes {sum(self.modules.values())} modules ({parts}), {self.adapter_bytes / 2**20:.1f} MiB")
        if self.unmatched:
            total = sum(self.modules.values()) + len(self.unmatched)
            line += (f"; matches only part of the model: {len(self.unmatched)} of its {total} modules are not in it "
                     f"and are ignored (first: {self.unmatched[0]!r})")
        if self.file.t5_modules:
            line += (f"; its {self.file.t5_modules} T5 modules are not applied (diffusers' FLUX loader has no "
                     "T5 LoRA support)")
        return line


COMPONENT_NAMES = {"transformer": "transformer", "text_encoder": "CLIP text encoder"}


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0][:160] if text else ""
    return f"{type(e).__name__}{': ' + first if first else ''}"


def _convert(file: LoraFile) -> tuple[dict, dict]:
    """diffusers' FLUX converter on a copy of the tensors: (state dict, network alphas)."""
    from diffusers import FluxPipeline

    try:
        state, alphas = FluxPipeline.lora_state_dict(dict(file.tensors), return_alphas=True)
    except Exception as e:  # the converters raise ValueError, KeyError, AssertionError, NotImplementedError, ...
        raise _fail(file.path, f"diffusers' FLUX LoRA converter cannot read its {file.layout} keys ({_why(e)}); is it "
                               "a LoRA for FLUX.1 [dev] at its real size (3072 wide, 19 + 38 blocks)?") from None
    return state, dict(alphas or {})


def _peft_keys(component: str, sd: dict) -> dict:
    """One component's keys in peft form (`<module>.lora_A.weight`), as diffusers converts them on load."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if not sd:
        return sd
    if component == "transformer":
        return sd if all("lora_A" in k or "lora_B" in k for k in sd) else convert_unet_state_dict_to_peft(sd)
    return convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))


_PAIR = re.compile(r"^(.*)\.(lora_A|lora_B)\.(weight|bias)$")


def _base(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)  # a layer peft already wrapped for another adapter


def match_lora(file: LoraFile, transformer: nn.Module, text_encoder: nn.Module | None = None) -> LoraMatch:
    """Convert `file` with diffusers' FLUX converter and check it against the modules of this pipeline.

    Args:
        file: from `read_lora_file`.
        transformer: the pipeline's FluxTransformer2DModel (any scheme; a meta-device model works too).
        text_encoder: its CLIPTextModel, or None to check the transformer part only.

    Returns:
        A LoraMatch whose `state` holds only modules that exist, every one with a fitting rank and shape.

    Raises:
        KreaLiteError: a module's shape or rank does not fit, or no module of the LoRA exists in the model.
    """
    state, alphas = _convert(file)
    models = {"transformer": transformer, "text_encoder": text_encoder}
    keep, kept_alphas, counts, ranks, unmatched, nbytes = {}, {}, {}, set(), [], 0
    for comp in COMPONENTS:
        sd = _peft_keys(comp, {k[len(comp) + 1:]: v for k, v in state.items() if k.startswith(comp + ".")})
        model = models[comp]
        strip = comp == "text_encoder" and model is not None and not hasattr(model, "text_model")
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in sd.items():
            m = _PAIR.match(k)
            name = m.group(1) if m else k
            if strip:
                name = name.removeprefix("text_model.")
            modules.setdefault(name, {})[f"{m.group(2)}.{m.group(3)}" if m else k] = v
        counts[comp] = 0
        for name, parts in modules.items():
            try:
                module = None if model is None else model.get_submodule(name)
            except AttributeError:
                module = None
            if module is None:
                unmatched.append(f"{comp}.{name}")
                continue
            _check_module(file, comp, name, _base(module), parts)
            a, b = parts["lora_A.weight"], parts["lora_B.weight"]
            ranks.add(a.shape[0])
            nbytes += 2 * (a.numel() + b.numel())
            counts[comp] += 1
            for kind, t in parts.items():
                keep[f"{comp}.{name}.{kind}"] = t
            for key in (f"{comp}.{name}.alpha", f"{comp}.text_model.{name}.alpha"):
                if key in alphas:
                    kept_alphas[f"{comp}.{name}.alpha"] = alphas[key]
    unmatched += [k for k in state if not k.startswith(tuple(c + "." for c in COMPONENTS))]
    if not keep:
        first = min(unmatched) if unmatched else "(none)"
        raise _fail(file.path, f"none of its {len(unmatched)} modules exists in this FLUX.1 pipeline (first: {first!r}); "
                               "it was made for another model")
    return LoraMatch(file=file, state=keep, alphas=kept_alphas, modules=counts, ranks=tuple(sorted(ranks)),
                     unmatched=tuple(sorted(unmatched)), adapter_bytes=nbytes)


def _check_module(file: LoraFile, comp: str, name: str, module: nn.Module, parts: dict) -> None:
    where = f"{comp}.{name}"
    if not isinstance(module, nn.Linear):
        raise _fail(file.path, f"its {file.layout} keys convert to {where!r}, which is a {type(module).__name__}, not a "
                               "linear layer (diffusers' converter cannot place this file's keys for that module)")
    extra = sorted(set(parts) - {"lora_A.weight", "lora_B.weight", "lora_B.bias"})
    if extra:
        raise _fail(file.path, f"{where} has tensors {extra} that are not LoRA factors")
    missing = [p for p in ("lora_A.weight", "lora_B.weight") if p not in parts]
    if missing:
        what = {"lora_A.weight": "lora_A (down)", "lora_B.weight": "lora_B (up)"}[missing[0]]
        raise _fail(file.path, f"{where} lacks its {what} tensor: the file is incomplete")
    a, b = parts["lora_A.weight"], parts["lora_B.weight"]
    if a.dim() != 2 or b.dim() != 2:
        raise _fail(file.path, f"{where}: its factors have shapes {tuple(a.shape)} and {tuple(b.shape)}, not matrices "
                               "(a convolution LoRA? FLUX has only linear layers)")
    if a.shape[0] != b.shape[1] or a.shape[0] == 0:
        raise _fail(file.path, f"{where}: rank mismatch: lora_A (down) has rank {a.shape[0]}, lora_B (up) "
                               f"{b.shape[1]}; the file is damaged")
    if (a.shape[1], b.shape[0]) != (module.in_features, module.out_features):
        if name == "x_embedder" and a.shape[1] > module.in_features:
            why = (f"its x_embedder takes {a.shape[1]} input channels and FluxPipeline's {module.in_features}: it is "
                   "a LoRA for FLUX Fill/Depth/Canny, which krea-lite does not run")
        else:
            why = ("it was made for a model with other shapes (another FLUX variant, or full-size FLUX.1 on a "
                   "smaller model)")
        raise _fail(file.path, f"{where} is {module.in_features} -> {module.out_features} in this model but "
                               f"{a.shape[1]} -> {b.shape[0]} in the LoRA: {why}")
    if "lora_B.bias" in parts and tuple(parts["lora_B.bias"].shape) != (module.out_features,):
        raise _fail(file.path, f"{where}: lora_B bias has shape {tuple(parts['lora_B.bias'].shape)}, the layer "
                               f"{module.out_features} outputs")


# ------------------------------------------------------------------------------------ loading


@dataclass(frozen=True)
class LoadedLora:
    """A LoRA loaded on a pipeline as the adapter `adapter` (what `use_loras` and the PNG metadata report)."""

    adapter: str
    path: Path
    sha256: str
    scale: float
    match: LoraMatch = field(repr=False, compare=False)  # without its tensors (peft holds those now)

    @property
    def modules(self) -> dict:
        return dict(self.match.modules)

    def summary(self) -> str:
        """One line: file, layout, rank, scale and how many modules the LoRA changes."""
        return self.match.summary(self.scale)


def _loaded(name: str, spec: LoraSpec, match: LoraMatch) -> LoadedLora:
    light = replace(match, state={}, alphas={}, file=replace(match.file, tensors={}))
    return LoadedLora(name, spec.path, spec.file.sha256, spec.scale, light)


def _registry(pipe) -> dict[str, LoadedLora]:
    """Adapters this module loaded that the pipeline still has (a direct unload_lora_weights drops them)."""
    reg = getattr(pipe, _REGISTRY, None)
    if reg is None:
        reg = {}
        setattr(pipe, _REGISTRY, reg)
    present = _adapters(pipe)
    for name in [n for n in reg if n not in present]:
        del reg[name]
    return reg


def _adapters(pipe) -> set[str]:
    return {a for comp in COMPONENTS for a in getattr(getattr(pipe, comp, None), "peft_config", {}) or {}}


def _tuner_layers(pipe):
    from peft.tuners.tuners_utils import BaseTunerLayer

    for comp in COMPONENTS:
        model = getattr(pipe, comp, None)
        if model is not None:
            yield from (m for m in model.modules() if isinstance(m, BaseTunerLayer))


def _adapter_name(file: LoraFile) -> str:
    stem = re.sub(r"[^A-Za-z0-9_]", "_", file.path.stem)[:40] or "lora"
    return f"{stem}_{file.sha256[:8]}"  # no '.': peft keeps adapters in ModuleDicts


def _inject(pipe, match: LoraMatch, name: str) -> None:
    """Load the adapter through diffusers' per-component loaders (what load_lora_weights calls)."""
    meta = match.file.metadata
    # low_cpu_mem_usage=True is load_lora_weights' own default with peft and transformers > 4.45
    for comp in COMPONENTS:
        sd = {k: v for k, v in match.state.items() if k.startswith(comp + ".")}
        if not sd:
            continue
        alphas = {k: v for k, v in match.alphas.items() if k.startswith(comp + ".")} or None
        if comp == "transformer":
            pipe.load_lora_into_transformer(sd, network_alphas=alphas, transformer=pipe.transformer, adapter_name=name,
                                            metadata=meta, _pipeline=pipe, low_cpu_mem_usage=True)
        else:
            pipe.load_lora_into_text_encoder(sd, network_alphas=alphas, text_encoder=pipe.text_encoder,
                                             prefix="text_encoder", lora_scale=pipe.lora_scale, adapter_name=name,
                                             metadata=meta, _pipeline=pipe, low_cpu_mem_usage=True)
    _to_compute_device(pipe, name)


def _to_compute_device(pipe, name: str) -> None:
    """Put the transformer's new A/B on the device the transformer computes on. peft puts them beside each
    base weight, which for a block streamed by krea-lite is its parked host copy."""
    info = getattr(pipe, "krea_lite", None)
    device = torch.device(getattr(info, "device", "cpu") or "cpu")
    if device.type == "cpu":
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in pipe.transformer.modules():
        if isinstance(m, BaseTunerLayer):
            for attr in ("lora_A", "lora_B"):
                d = getattr(m, attr, None)
                if d is not None and name in d:
                    d[name].to(device)


def _remove_adapter(pipe, name: str) -> None:
    """Undo a (possibly half-made) adapter: delete it where it exists; drop the LoRA layers if none is left."""
    for comp in COMPONENTS:
        model = getattr(pipe, comp, None)
        if model is not None and name in (getattr(model, "peft_config", None) or {}):
            if comp == "transformer":
                model.delete_adapters(name)
            else:
                from diffusers.utils.peft_utils import delete_adapter_layers

                delete_adapter_layers(model, name)
    if not _adapters(pipe):
        pipe.unload_lora_weights()  # no other adapter: remove peft's wrappers, the base modules return


def _set_active(pipe, active: list[tuple[str, float]]) -> None:
    if active:
        pipe.enable_lora()
        pipe.set_adapters([n for n, _ in active], [s for _, s in active])
    elif _adapters(pipe):
        pipe.disable_lora()


def _active(pipe) -> list[str]:
    layers = list(_tuner_layers(pipe))
    if not layers or all(layer.disable_adapters for layer in layers):
        return []
    return list(pipe.get_active_adapters())


def active_loras(pipe) -> list[LoadedLora]:
    """The LoRAs (loaded by this module) that the pipeline applies now, with their scales."""
    reg = _registry(pipe)
    if not reg:  # nothing loaded through krea-lite (peft need not even be importable)
        return []
    return [reg[n] for n in _active(pipe) if n in reg]


def guard_fuse(pipe) -> None:
    """Make `fuse_lora` refuse, in one line, on a quantized transformer (idempotent; bf16 still fuses), and
    `pipe.load_lora_weights` on gguf and optimum-quanto transformers, where diffusers' loader fails midway.

    diffusers' `pipe.fuse_lora` calls `transformer.fuse_lora`; on a quantized transformer that method is
    replaced on this instance only (the class, and the pipeline, stay the ordinary diffusers ones).
    """
    tr = getattr(pipe, "transformer", None)
    kind = _quantized(pipe)
    if tr is None or kind is None or "fuse_lora" in vars(tr):
        return

    def fuse_lora(*_args, **_kwargs):
        raise KreaLiteError(f"fuse_lora refused: the transformer is {kind}, and merging a LoRA into it would "
                            "requantize the weights (the LoRA's effect shrinks or vanishes); krea-lite runs LoRAs "
                            "unmerged: keep them as adapters (set_adapters sets their scales), or fuse on a bf16 folder")

    tr.fuse_lora = fuse_lora
    if any(k in kind for k in _NO_DIFFUSERS_LOADER) and "load_lora_weights" not in vars(pipe):

        def load_lora_weights(*_args, **_kwargs):  # diffusers' would fail midway, leaving peft wrappers behind
            raise KreaLiteError(f"load_lora_weights refused: the transformer is {kind}, whose packed weights "
                                "diffusers' loader reads as weight shapes and fails on; use "
                                "krea_lite.lora.load_lora(pipe, FILE, adapter_name=...) (or use_loras), which checks "
                                "the file and loads it through diffusers' per-component loaders")

        pipe.load_lora_weights = load_lora_weights


# transformers whose packed weights break diffusers' load_lora_weights (its shape-expansion step)
_NO_DIFFUSERS_LOADER = ("gguf", "GGUFLinear", "qint8", "qfloat8", "qint4", "QLinear")


_QUANTIZED_LAYERS = ("bitsandbytes.", "optimum.", "krea_lite.w8a8", "krea_lite.gguf_file", "diffusers.quantizers.gguf.")


def _quantized(pipe) -> str | None:
    info = getattr(pipe, "krea_lite", None)
    manifest = getattr(info, "manifest", None)
    if manifest:
        scheme = manifest["components"]["transformer"]["scheme"]
        return None if scheme == "bf16" else f"quantized ({scheme})"
    tr = getattr(pipe, "transformer", None)
    for m in tr.modules() if tr is not None else ():
        if type(m).__module__.startswith(_QUANTIZED_LAYERS):
            return f"quantized ({type(m).__name__})"
    return None


def _spec(item) -> LoraSpec:
    if isinstance(item, LoraSpec):
        return item
    if isinstance(item, tuple):
        return LoraSpec(Path(item[0]), item[1])
    return LoraSpec(Path(item))


def use_loras(pipe, loras: Sequence[LoraSpec | str | Path | tuple], keep_loaded: bool = False) -> list[LoadedLora]:
    """Make exactly these LoRAs active, with their scales, on a loaded pipeline; the base is never reloaded.

    Files already loaded (same sha256) are reused; new ones are checked against the pipeline first, all of
    them before any is loaded, so a bad file leaves the pipeline as it was.

    Args:
        pipe: a FluxPipeline (from `load_pipeline` or diffusers).
        loras: LoraSpec, a path, or (path, scale) tuples; empty: no LoRA.
        keep_loaded: keep adapters that are not asked for loaded (inactive) for a later switch; by
            default they are deleted (an empty `loras` then removes peft's layers entirely).

    Returns:
        One LoadedLora per requested LoRA, in order.
    """
    specs = [_spec(x).checked() for x in loras]
    reg = _registry(pipe)
    by_sha = {r.sha256: r for r in reg.values()}
    seen = set()
    for s in specs:
        if s.file.sha256 in seen:
            raise _fail(s.path, "is given twice (the same file); give it once with the summed scale")
        seen.add(s.file.sha256)
    new = [(s, match_lora(s.file, pipe.transformer, getattr(pipe, "text_encoder", None)))
           for s in specs if s.file.sha256 not in by_sha]
    guard_fuse(pipe)
    loaded: list[str] = []
    previous = [(r.adapter, r.scale) for r in active_loras(pipe)]
    try:
        for s, match in new:
            name = _adapter_name(s.file)
            if name in _adapters(pipe):
                raise _fail(s.path, f"adapter name {name!r} is already used on this pipeline; delete_adapters it first")
            _load_one(pipe, match, name)
            loaded.append(name)
            reg[name] = _loaded(name, s, match)
            by_sha[s.file.sha256] = reg[name]
    except BaseException:
        for name in reversed(loaded):
            _remove_adapter(pipe, name)
            reg.pop(name, None)
        if _adapters(pipe):
            _set_active(pipe, [p for p in previous if p[0] in _adapters(pipe)])
        raise
    out = []
    for s in specs:
        r = by_sha[s.file.sha256]
        r = replace(r, path=s.path, scale=s.scale)
        reg[r.adapter] = r
        out.append(r)
    wanted = {r.adapter for r in out}
    if not keep_loaded:
        unused = [n for n in _adapters(pipe) if n not in wanted]
        if unused and not wanted:
            pipe.unload_lora_weights()
        elif unused:
            pipe.delete_adapters(unused)
        for n in unused:
            reg.pop(n, None)
    _set_active(pipe, [(r.adapter, r.scale) for r in out])
    _fit(pipe, loaded, previous)
    return out


def _fit(pipe, loaded: Sequence[str] = (), previous: Sequence[tuple[str, float]] = ()) -> None:
    """A placed pipeline plans again for the adapters' bytes (resident beside the streamed blocks). When they
    do not fit, the adapters just `loaded` are removed again, the `previous` ones made active, and one line
    says so."""
    from .pipeline import fit_adapters

    if getattr(pipe, _FUSED, False) and _adapters(pipe):
        fused_side_branch(pipe)  # the layers peft just wrapped run fused too
    try:
        fit_adapters(pipe)
    except KreaLiteError as e:
        if not loaded:
            raise
        reg = _registry(pipe)
        for name in reversed(loaded):
            _remove_adapter(pipe, name)
            reg.pop(name, None)
        if _adapters(pipe):
            _set_active(pipe, [p for p in previous if p[0] in _adapters(pipe)])
        raise KreaLiteError(f"the LoRA adapters do not fit this pipeline's memory budget beside the model ({e}); "
                            "they were not kept: use fewer or lower-rank LoRAs, or a larger vram_gb") from None


def _load_one(pipe, match: LoraMatch, name: str) -> None:
    try:
        _inject(pipe, match, name)
    except KeyboardInterrupt:
        _remove_adapter(pipe, name)
        raise
    except Exception as e:
        _remove_adapter(pipe, name)
        raise _fail(match.file.path, f"diffusers could not load it ({_why(e)}); nothing of it was kept") from e


def load_lora(pipe, path: str | Path | LoraSpec, scale: float = 1.0, adapter_name: str | None = None) -> LoadedLora:
    """Check one LoRA file against the pipeline, load it as an adapter, and stack it on the active ones.

    Args:
        pipe: a FluxPipeline (from `load_pipeline` or diffusers).
        path: the LoRA .safetensors file (or a LoraSpec, whose scale then wins).
        scale: its weight in `set_adapters` (1.0: as trained).
        adapter_name: the adapter's name; default `<file stem>_<first 8 hex of its sha256>`.

    Returns:
        The LoadedLora (its `summary()` says how many modules it changes).
    """
    spec = (path if isinstance(path, LoraSpec) else LoraSpec(Path(path), scale)).checked()
    reg = _registry(pipe)
    previous = [(r.adapter, r.scale) for r in active_loras(pipe)]
    existing = next((r for r in reg.values() if r.sha256 == spec.file.sha256), None)
    if existing is None:
        match = match_lora(spec.file, pipe.transformer, getattr(pipe, "text_encoder", None))
        name = adapter_name or _adapter_name(spec.file)
        if name in _adapters(pipe):
            raise _fail(spec.path, f"adapter name {name!r} is already used on this pipeline; pass another "
                                   "adapter_name or delete_adapters it first")
        guard_fuse(pipe)
        _load_one(pipe, match, name)
        existing, new = _loaded(name, spec, match), [name]
    else:
        new = []
    rec = replace(existing, path=spec.path, scale=spec.scale)
    reg[rec.adapter] = rec
    _set_active(pipe, [p for p in previous if p[0] != rec.adapter] + [(rec.adapter, rec.scale)])
    _fit(pipe, new, previous)
    return rec


def unload_loras(pipe) -> None:
    """Remove every LoRA (diffusers' `unload_lora_weights`): the base modules return, unchanged."""
    if _adapters(pipe):
        pipe.unload_lora_weights()
    _registry(pipe).clear()
    _fit(pipe)


def lora_metadata(pipe) -> dict[str, str]:
    """PNG text entries for the LoRAs the pipeline applies now: {"loras": JSON list of file, sha256, scale}."""
    active = active_loras(pipe)
    if not active:
        return {}
    return {"loras": json.dumps([{"file": r.path.name, "sha256": r.sha256, "scale": r.scale} for r in active])}


# ----------------------------------------------------------------------------- for the planner


def adapter_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every LoRA tensor (A, B and their biases, all adapters) under `module`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = []
    for m in module.modules():
        if isinstance(m, BaseTunerLayer):
            for attr in ("lora_A", "lora_B"):
                for layer in (getattr(m, attr, None) or {}).values():
                    out += [p for p in layer.parameters()]
    return out


def adapter_bytes(pipe) -> dict[str, int]:
    """Bytes of the LoRA tensors per component ({"transformer": n, "text_encoder": m})."""
    return {c: sum(t.numel() * t.element_size() for t in adapter_tensors(getattr(pipe, c)))
            for c in COMPONENTS if getattr(pipe, c, None) is not None}


# ------------------------------------------------------------------------------- fused side branch

_FUSED = "krea_lite_fused_side_branch"  # pipe attribute: fused_side_branch(pipe) was asked for


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's LoRA Linear forward with the active adapters' side branch accumulated into the base output in
    place: low = x @ A^T, then out += scale * low @ B^T in one `addmm_` (the scale applied inside the matmul);
    several adapters run as one adapter of their summed rank (A's scaled by their weights, stacked; B's side
    by side), so x is read and the output written once, not once per adapter. No copy of the base output
    (peft clones it on bitsandbytes layers), no bf16 product and separate scale and add per adapter, and
    nothing kept: the adapters' own tensors are used (stacked per call, transient). What peft does, up
    to rounding; anything this path does not cover (gradients, dropout in training mode, disabled, merged,
    mixed-batch adapter_names, DoRA-style variants, lora_bias) runs peft's own forward."""
    active = [a for a in self.active_adapters if a in self.lora_A]
    if (torch.is_grad_enabled() or self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None
            or not active or any(a in self.lora_variant or self.lora_B[a].bias is not None
                                 or (self.training and not isinstance(self.lora_dropout[a], nn.Identity)) for a in active)):
        return type(self).forward(self, x, *args, **kwargs)
    kwargs.pop("adapter_names", None)  # peft's forward takes it; the base layer does not
    # every base layer krea-lite wraps returns a fresh tensor (no view of a weight, input or cache), so
    # adding into it in place is safe
    result = self.base_layer(x, *args, **kwargs).contiguous()
    flat, rows = result.view(-1, result.shape[-1]), x.reshape(-1, x.shape[-1])
    if len(active) == 1:
        a, b, alpha = self.lora_A[active[0]].weight, self.lora_B[active[0]].weight, self.scaling[active[0]]
    else:  # stacked: one matmul pair over the adapters side by side (x read once, the output written once);
        # the scales go into A's rows. The concatenations are transient (a few MB), nothing is kept
        a = torch.cat([self.lora_A[n].weight * self.scaling[n] for n in active])
        b, alpha = torch.cat([self.lora_B[n].weight for n in active], dim=1), 1.0
    low = torch.nn.functional.linear(rows.to(a.dtype), a).to(result.dtype)
    flat.addmm_(low, b.t().to(result.dtype), alpha=alpha)
    return result


def fused_side_branch(pipe, enable: bool = True) -> int:
    """Opt-in: run each LoRA layer's side branch accumulated into the base output in place (`_fused_forward`):
    the scale inside the matmul instead of peft's bf16 product, scale and add per adapter (and, on bitsandbytes
    layers, a clone of the base output); no extra memory. The adapters stay unmerged and the base is untouched; the output
    equals peft's up to bf16 rounding, not bit for bit. Adapters loaded later through `use_loras`/`load_lora`
    are fused too. `enable=False` restores peft's forward.

    Returns how many LoRA layers run fused now."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for c in COMPONENTS:
        module = getattr(pipe, c, None)
        for m in (module.modules() if module is not None else ()):
            if isinstance(m, LoraLayer) and isinstance(getattr(m, "lora_A", None), nn.ModuleDict):
                if enable:
                    m.forward = _fused_forward.__get__(m)
                    n += 1
                else:
                    vars(m).pop("forward", None)
    setattr(pipe, _FUSED, enable)
    return n
