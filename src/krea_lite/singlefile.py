"""Readers for the ComfyUI / Forge single files (layouts: formats.py), tensor by tensor, lazily.

Each reader yields *items* under diffusers/transformers names, in one of three forms:
  Plain(name, tensor)             a tensor stored in a float dtype (bf16/fp16/fp32)
  Fp8(module, weight, scale)      a Linear stored as float8 e4m3 with one fp32 scale per output row:
                                  weight ~= fp8 * scale[:, None] (ComfyUI's per-tensor `scale_weight`
                                  repeated per row; the fp8mm scheme's own stored form)
  Nf4(module, ...)                a Linear stored as bitsandbytes NF4 (the nf4 scheme's stored form)
An item either gives its tensors as they are stored (`stored()`, no re-quantization) or dequantized
to bf16 (`dequantized()`, exactly what the format's own tools compute). Fused BFL tensors (qkv,
linear1) and the final adaLN's swapped halves are cut by rows: for fp8 rows of bytes and scales, for
NF4 rows of packed bytes and of 64-weight absmax blocks (so widths must be multiples of 64).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .errors import KreaLiteError
from .formats import NF4_STATE, SCALE_INPUT, SCALE_WEIGHT, SCALED_FP8, Part, sniff_file
from .source import SWAPPED, BflFile, Reader, _get, bfl_to_diffusers, flux_layout, open_safetensors

NF4_NESTED_KEYS = ("nested_absmax", "nested_quant_map")


# --------------------------------------------------------------------------------------------- items


@dataclass(frozen=True)
class Plain:
    name: str
    tensor: torch.Tensor
    source_dtype: str

    def dequantized(self) -> list[tuple[str, torch.Tensor]]:
        t = self.tensor
        return [(self.name, t.to(torch.bfloat16) if t.is_floating_point() and t.dtype != torch.bfloat16 else t)]


@dataclass(frozen=True)
class Fp8:
    module: str
    weight: torch.Tensor  # float8_e4m3fn (out, in)
    scale: torch.Tensor  # float32 (out,)
    source_dtype: str = "F8_E4M3"

    def stored(self) -> list[tuple[str, torch.Tensor]]:
        return [(f"{self.module}.weight", self.weight), (f"{self.module}.weight_scale", self.scale)]

    def dequantized(self) -> list[tuple[str, torch.Tensor]]:
        w = self.weight.to(torch.float32).mul_(self.scale[:, None])  # ComfyUI: weight.to(dtype) * scale_weight
        return [(f"{self.module}.weight", w.to(torch.bfloat16))]

    def rows(self, start: int, stop: int) -> Fp8:
        return replace(self, weight=self.weight[start:stop].clone(), scale=self.scale[start:stop].clone())


@dataclass(frozen=True)
class Nf4:
    """One bitsandbytes NF4 weight (out, in), flattened row-major into 64-weight blocks."""

    module: str
    packed: torch.Tensor  # uint8 (out * in / 2, 1): two 4-bit codes a byte
    absmax: torch.Tensor  # float32 (blocks,), or uint8 (blocks,) when nested
    quant_map: torch.Tensor  # float32 (16,)
    shape: tuple[int, int]
    blocksize: int
    dtype: str  # what dequantizing gives ("bfloat16", "float16", ...)
    nested: dict | None = None  # {"absmax": fp32, "quant_map": fp32 (256,), "blocksize": int, "offset": float, "dtype"}
    source_dtype: str = "NF4"
    flattened: bool = False  # its nested absmax was dequantized to fp32 (a cut through a nested block)

    def state(self):
        from .compat import bnb

        QuantState = bnb().functional.QuantState
        state2, offset = None, None
        if self.nested:
            n = self.nested
            state2 = QuantState(absmax=n["absmax"], blocksize=n["blocksize"], code=n["quant_map"],
                                dtype=getattr(torch, n["dtype"]))
            offset = torch.tensor(float(n["offset"]))
        return QuantState(absmax=self.absmax, shape=torch.Size(self.shape), code=self.quant_map,
                          blocksize=self.blocksize, quant_type="nf4", dtype=getattr(torch, self.dtype),
                          offset=offset, state2=state2)

    def stored(self) -> list[tuple[str, torch.Tensor]]:
        # bitsandbytes' own serialization (Linear4bit._save_to_state_dict): "weight" + "weight.<quant state>"
        out = [(f"{self.module}.weight", self.packed)]
        out += [(f"{self.module}.weight.{k}", v) for k, v in self.state().as_dict(packed=True).items()]
        return out

    def dequantized(self) -> list[tuple[str, torch.Tensor]]:
        from .compat import bnb

        w = bnb().functional.dequantize_4bit(self.packed, self.state(), quant_type="nf4")
        return [(f"{self.module}.weight", w.to(torch.bfloat16))]

    def flat_absmax(self) -> Nf4:
        """The same weight with its absmax dequantized to fp32, exactly as bitsandbytes' dequantize_4bit
        computes it (dequantize_blockwise + offset): dequantizing gives the same bits."""
        if not self.nested:
            return self
        from .compat import bnb

        state = self.state()
        absmax = bnb().functional.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
        return replace(self, absmax=absmax.float(), nested=None, flattened=True)

    def rows(self, start: int, stop: int) -> Nf4:
        cols = self.shape[1]
        if cols % self.blocksize:
            raise KreaLiteError(f"{self.module}: NF4 rows of {cols} weights do not fill whole blocks of "
                                f"{self.blocksize}, so a fused tensor cannot be split without re-quantizing")
        per_row = cols // self.blocksize
        b0, b1 = start * per_row, stop * per_row
        part = self
        if self.nested:
            nb = self.nested["blocksize"]
            whole = b0 % nb == 0 and (b1 % nb == 0 or b1 == self.absmax.numel())
            if not whole:  # nested blocks straddle the cut: keep this part's absmax as fp32 instead
                part = self.flat_absmax()
        nested = None
        if part.nested:
            nb = part.nested["blocksize"]
            nested = {**part.nested, "absmax": part.nested["absmax"][b0 // nb: -(-b1 // nb)].clone(),
                      "quant_map": part.nested["quant_map"].clone()}
        # every tensor its own copy: safetensors refuses to save tensors that share memory
        return replace(part, packed=part.packed[start * cols // 2: stop * cols // 2].clone(),
                       absmax=part.absmax[b0:b1].clone(), quant_map=part.quant_map.clone(), shape=(stop - start, cols),
                       nested=nested)


def concat_rows(items: list, module: str):
    """The parts stacked along rows again (the final adaLN's swapped halves)."""
    first = items[0]
    if isinstance(first, Fp8):
        return Fp8(module, torch.cat([i.weight for i in items]), torch.cat([i.scale for i in items]))
    nested_ok = all(i.nested for i in items) and all(
        i.absmax.numel() % i.nested["blocksize"] == 0 for i in items[:-1])
    if not nested_ok:
        items = [i.flat_absmax() for i in items]
    nested = None
    if nested_ok:
        nested = {**first.nested, "absmax": torch.cat([i.nested["absmax"] for i in items])}
    return replace(first, module=module, packed=torch.cat([i.packed for i in items]),
                   absmax=torch.cat([i.absmax for i in items]),
                   shape=(sum(i.shape[0] for i in items), first.shape[1]), nested=nested)


def split_rows(item, parts: tuple[str, ...], hidden: int, swapped: bool) -> list:
    """A fused BFL Linear weight item -> one item per diffusers module (parts are `<module>.weight`)."""
    rows = item.weight.shape[0] if isinstance(item, Fp8) else item.shape[0]
    if swapped:
        half = rows // 2
        item = concat_rows([item.rows(half, rows), item.rows(0, half)], item.module)
    sizes = [hidden] * (len(parts) - 1) + [rows - hidden * (len(parts) - 1)]
    out, start = [], 0
    for name, size in zip(parts, sizes, strict=True):
        piece = item.rows(start, start + size) if len(parts) > 1 else item
        out.append(replace(piece, module=name.removesuffix(".weight")))
        start += size
    return out


# ------------------------------------------------------------------------------------------- reading


def _scale(f, path: Path, key: str, rows: int) -> torch.Tensor:
    s = _get(f, path, key)
    if s.numel() != 1:
        raise KreaLiteError(f"{path}: {key!r} holds {s.numel()} values; a ComfyUI scale_weight is one per-tensor "
                            "scalar (re-download the file)")
    return s.reshape(1).to(torch.float32).expand(rows).clone()


def _nf4(f, path: Path, key: str, module: str) -> Nf4:
    from bitsandbytes.utils import unpack_tensor_to_dict

    info = unpack_tensor_to_dict(_get(f, path, f"{key}.{NF4_STATE}"))
    if info.get("quant_type") != "nf4" or not isinstance(info.get("shape"), list) or len(info["shape"]) != 2:
        raise KreaLiteError(f"{path}: {key!r} has an NF4 quant state krea-lite does not read ({info}); "
                            "re-download the file")
    nested = None
    if "nested_blocksize" in info:
        nested = {"absmax": _get(f, path, f"{key}.nested_absmax"), "quant_map": _get(f, path, f"{key}.nested_quant_map"),
                  "blocksize": int(info["nested_blocksize"]), "offset": float(info["nested_offset"]),
                  "dtype": info.get("nested_dtype", "float32")}
    return Nf4(module, _get(f, path, key), _get(f, path, f"{key}.absmax"), _get(f, path, f"{key}.quant_map"),
               tuple(info["shape"]), int(info["blocksize"]), str(info["dtype"]), nested)


@dataclass(frozen=True)
class TransformerFile:
    """A FLUX transformer single file (bf16, fp8_scaled, fp8 or nf4): BFL key -> diffusers parts."""

    path: Path
    part: Part
    layout: dict[str, tuple[str, ...]]  # BFL tensor name (no prefix) -> diffusers tensor names
    hidden: int
    extra: dict[str, int]  # ignored tensors by kind ("scale_input", "scaled_fp8")

    @property
    def format(self) -> str:
        return self.part.layout


def _quant_suffixes(layout: str) -> tuple[str, ...]:
    if layout == "nf4":
        return (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", f".{NF4_STATE}")
    return ()


def read_transformer_header(path: Path) -> TransformerFile:
    """Parse and check a transformer single file's header: a complete FLUX transformer, scales present."""
    part = sniff_file(path).part("transformer")
    prefix = part.prefix
    names = {k[len(prefix):]: k for k in part.keys}
    extra: dict[str, int] = {}
    tensors = set()
    suffixes = _quant_suffixes(part.layout)
    for n in names:
        leaf = n.rsplit(".", 1)[-1]
        if n == SCALED_FP8 or leaf == SCALE_INPUT:
            extra[leaf] = extra.get(leaf, 0) + 1
        elif leaf == SCALE_WEIGHT or n.endswith(suffixes):
            continue
        else:
            tensors.add(n)
    with _open(path) as f:
        if part.layout in ("fp8_scaled", "fp8"):
            for n in tensors:
                dtype = f.get_slice(names[n]).get_dtype()
                scale = n.removesuffix(".weight") + "." + SCALE_WEIGHT
                if dtype == "F8_E4M3" and part.layout == "fp8_scaled" and scale not in names:
                    raise KreaLiteError(f"{path} stores {n!r} in fp8 without its {scale!r}; the file is incomplete "
                                        "(re-download it)")
                if scale in names and dtype != "F8_E4M3":
                    raise KreaLiteError(f"{path} has {scale!r} for a {dtype} weight; re-download the file")
        if "img_in.weight" not in tensors:
            raise KreaLiteError(f"{path} lacks 'img_in.weight'; not a complete FLUX transformer (re-download it)")
        if part.layout == "nf4" and f"img_in.weight.{NF4_STATE}" in names:
            from bitsandbytes.utils import unpack_tensor_to_dict

            hidden = unpack_tensor_to_dict(f.get_tensor(names[f"img_in.weight.{NF4_STATE}"]))["shape"][0]
        else:
            hidden = f.get_slice(names["img_in.weight"]).get_shape()[0]

    layout = flux_layout(path, tensors, "pass a FLUX.1 transformer file")
    return TransformerFile(path, part, layout, int(hidden), extra)


def _open(path: Path):
    return open_safetensors(path)


def iter_transformer(tf: TransformerFile) -> Iterator:
    """Items of a transformer file, one BFL tensor (and its parts) at a time."""
    prefix = tf.part.prefix
    keys = set(tf.part.keys)
    with _open(tf.path) as f:
        for name, parts in tf.layout.items():
            key = prefix + name
            dtype = f.get_slice(key).get_dtype()
            module = name.removesuffix(".weight")
            swapped = name in SWAPPED
            if tf.format == "nf4" and f"{key}.{NF4_STATE}" in keys:
                yield from split_rows(_nf4(f, tf.path, key, module), parts, tf.hidden, swapped)
            elif dtype == "F8_E4M3" and name.endswith(".weight") and len(f.get_slice(key).get_shape()) == 2:
                w = _get(f, tf.path, key)
                scale_key = f"{prefix}{module}.{SCALE_WEIGHT}"
                scale = (_scale(f, tf.path, scale_key, w.shape[0]) if scale_key in keys
                         else torch.ones(w.shape[0], dtype=torch.float32))
                yield from split_rows(Fp8(module, w, scale), parts, tf.hidden, swapped)
            else:
                t = _get(f, tf.path, key)
                if t.dtype == torch.float8_e4m3fn:  # an fp8 bias or norm scale: plain values
                    t = t.to(torch.bfloat16)
                for n, piece in bfl_to_diffusers(name, t, parts, tf.hidden):
                    yield Plain(n, piece, dtype)


@dataclass(frozen=True)
class TextFile:
    """A T5-XXL or CLIP-L single file: stored key -> transformers name (its prefix removed)."""

    path: Path
    part: Part
    names: dict[str, str]  # transformers name -> stored key
    dropped: tuple[str, ...]  # stored tensors that are not part of the model FLUX uses

    @property
    def format(self) -> str:
        return self.part.layout


# CLIP-L files carry CLIPTextModelWithProjection's extras; FLUX uses CLIPTextModel (pooled output).
CLIP_EXTRAS = ("text_projection.weight", "logit_scale", "text_model.embeddings.position_ids")


def read_text_header(path: Path, role: str) -> TextFile:
    part = sniff_file(path).part(role)
    names, dropped = {}, []
    for key in part.keys:
        name = key[len(part.prefix):]
        leaf = name.rsplit(".", 1)[-1]
        if name == SCALED_FP8 or leaf in (SCALE_WEIGHT, SCALE_INPUT) or (role == "text_encoder" and name in CLIP_EXTRAS):
            if not (name == SCALED_FP8 or leaf == SCALE_WEIGHT):
                dropped.append(name)
            continue
        names[name] = key
    if part.layout == "fp8_scaled":
        keys = set(part.keys)
        with _open(path) as f:
            for name, key in names.items():
                scale = f"{part.prefix}{name.removesuffix('.weight')}.{SCALE_WEIGHT}"
                if f.get_slice(key).get_dtype() == "F8_E4M3" and scale not in keys:
                    raise KreaLiteError(f"{path} stores {name!r} in fp8 without its {scale!r}; the file is "
                                        "incomplete (re-download it)")
    return TextFile(path, part, names, tuple(dropped))


def iter_text(tf: TextFile) -> Iterator:
    keys = set(tf.part.keys)
    with _open(tf.path) as f:
        for name, key in tf.names.items():
            dtype = f.get_slice(key).get_dtype()
            t = _get(f, tf.path, key)
            module = name.removesuffix(".weight")
            if dtype == "F8_E4M3" and name.endswith(".weight") and t.dim() == 2 and not _is_embedding(name):
                scale_key = f"{tf.part.prefix}{module}.{SCALE_WEIGHT}"
                scale = (_scale(f, tf.path, scale_key, t.shape[0]) if scale_key in keys
                         else torch.ones(t.shape[0], dtype=torch.float32))
                yield Fp8(module, t, scale)
            else:
                if t.dtype == torch.float8_e4m3fn:  # an fp8 embedding or norm: its values, in bf16
                    scale_key = f"{tf.part.prefix}{module}.{SCALE_WEIGHT}"
                    t = t.float() * (_get(f, tf.path, scale_key).float() if scale_key in keys else 1.0)
                yield Plain(name, t, dtype)


def _is_embedding(name: str) -> bool:
    return name.endswith(("shared.weight", "embed_tokens.weight", "relative_attention_bias.weight",
                          "embedding.weight"))


def read_vae(path: Path, config: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An LDM/BFL autoencoder file -> diffusers AutoencoderKL tensors (diffusers' own converter)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    part = sniff_file(path).part("vae")
    with _open(path) as f:
        state = {k[len(part.prefix):]: _get(f, path, k) for k in part.keys}
    converted = convert_ldm_vae_checkpoint(state, config)
    return converted, {"format": part.layout, "prefix": part.prefix, "tensor_dtypes": dict(sorted(part.dtypes.items())),
                       "unconverted_tensors": max(0, len(state) - len(converted))}




# ------------------------------------------------------------------------------------------- readers

TRANSFORMER_FORMATS = {"fp8_scaled": "comfy-fp8_scaled", "fp8": "fp8", "nf4": "forge-nf4"}
NATIVE = {"fp8_scaled": "fp8mm", "fp8": "fp8mm", "nf4": "nf4"}


def _relative(item) -> dict[str, torch.Tensor]:
    n = len(item.module) + 1
    return {k[n:]: v for k, v in item.stored()}


class _ItemReader:
    """Reader methods shared by the item-based readers (mixed into source.Reader subclasses)."""

    component = "transformer"

    def _items(self) -> Iterator:
        raise NotImplementedError

    def _keep(self) -> tuple[str, ...]:
        """Linears the native scheme keeps in bf16 (quantize's defaults): stored quantized, they are
        dequantized (8-bit activations would otherwise run through them). NF4 computes in bf16 from the
        dequantized weight anyway, so its Linears stay as stored."""
        if self.native_scheme != "fp8mm":
            return ()
        from .quantize import keep_patterns

        return keep_patterns(self.component, self.native_scheme, None)

    def tensor_names(self) -> list[str]:
        return [n for item in self._items() for n, _ in item.dequantized()]

    def iter_tensors(self):
        for item in self._items():
            yield from item.dequantized()

    def iter_native(self):
        import fnmatch

        keep = self._keep()
        types: dict[str, int] = {}
        dequantized, flattened = [], 0
        for item in self._items():
            if isinstance(item, Plain):
                types[item.source_dtype] = types.get(item.source_dtype, 0) + 1
                yield from item.dequantized()
                continue
            if any(fnmatch.fnmatchcase(item.module, p) for p in keep):
                dequantized.append(item.module)
                yield from item.dequantized()
                continue
            kind = "F8_E4M3 x per-tensor scale" if isinstance(item, Fp8) else (
                "NF4 (nested absmax)" if item.nested else "NF4 (fp32 absmax)")
            types[kind] = types.get(kind, 0) + 1
            flattened += bool(getattr(item, "flattened", False))
            yield item.module, _relative(item)
        self._info = {"tensor_types": dict(sorted(types.items())), "dequantized_to_bf16": dequantized,
                      **({"dequantize_reason": "kept bf16 by the scheme (quantize's keep list); stored quantized "
                          "in the file"} if dequantized else {}),
                      **({"nf4_absmax_flattened": flattened} if flattened else {}), **self._extra()}

    def _extra(self) -> dict:
        return {}

    def native_info(self) -> dict:
        return dict(getattr(self, "_info", {}))


class TransformerReader(_ItemReader, Reader):
    """A ComfyUI fp8_scaled (or plain fp8) or Forge NF4 FLUX transformer file, kept in its stored form."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.header = read_transformer_header(path)
        self.format = TRANSFORMER_FORMATS[self.header.format]
        self.native_scheme = NATIVE[self.header.format]

    def tensor_names(self):
        return [n for parts in self.header.layout.values() for n in parts]

    def _items(self):
        return iter_transformer(self.header)

    def _extra(self):
        return {"ignored_tensors": dict(self.header.extra)} if self.header.extra else {}


class T5Reader(_ItemReader, Reader):
    """ComfyUI's t5xxl_fp16 / t5xxl_fp8_e4m3fn(_scaled): transformers T5EncoderModel names."""

    component = "text_encoder_2"

    def __init__(self, path: Path):
        super().__init__(path)
        self.header = read_text_header(path, "text_encoder_2")
        self.format = {"float": "comfy-t5xxl", "fp8": "comfy-t5xxl-fp8", "fp8_scaled": "comfy-t5xxl-fp8_scaled"}[
            self.header.format]
        self.native_scheme = "fp8mm" if self.header.format != "float" else None

    def _extra(self):
        tied = "shared.weight" in self.header.names and "encoder.embed_tokens.weight" in self.header.names
        return {"dropped": ["encoder.embed_tokens.weight (tied to shared.weight)"]} if tied else {}

    def _items(self):
        tied = "shared.weight" in self.header.names  # the tied alias is stored once, as `shared`
        for item in iter_text(self.header):
            if not (tied and getattr(item, "name", None) == "encoder.embed_tokens.weight"):
                yield item


class ClipReader(_ItemReader, Reader):
    """ComfyUI's clip_l.safetensors: CLIPTextModel names (`text_model.*`); the projection is dropped."""

    component = "text_encoder"
    format = "comfy-clip_l"

    def __init__(self, path: Path):
        super().__init__(path)
        self.header = read_text_header(path, "text_encoder")

    def _items(self):
        return iter_text(self.header)

    def native_info(self):
        return {"tensor_types": dict(sorted(self.header.part.dtypes.items())), "dropped": list(self.header.dropped)}


class VaeReader(Reader):
    """BFL's ae.safetensors (LDM names), converted by diffusers' own convert_ldm_vae_checkpoint."""

    format = "bfl-ae"

    def __init__(self, path: Path):
        super().__init__(path)
        part = sniff_file(path).part("vae")
        levels = 1 + max((int(k[len(part.prefix):].split(".")[2]) for k in part.keys
                          if k[len(part.prefix):].startswith("encoder.down.")), default=-1)
        if levels == 0:
            raise KreaLiteError(f"{path} has no VAE encoder (encoder.down.* tensors); pass the whole ae.safetensors "
                                "as --vae")
        # the converter reads only the number of levels from the config
        self.config = {"down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels}
        self.dtypes = dict(sorted(part.dtypes.items()))

    def native_info(self):
        return {"tensor_types": self.dtypes, "converter": "diffusers convert_ldm_vae_checkpoint"}

    def tensor_names(self):
        return list(read_vae(self.path, self.config)[0])

    def iter_tensors(self):
        state, _ = read_vae(self.path, self.config)
        for name in list(state):
            t = state.pop(name)
            yield name, t.to(torch.bfloat16) if t.is_floating_point() else t


def reader_for(path: Path, component: str):
    """The reader for `component` from a single file, chosen by its header (formats.sniff_file)."""
    part = sniff_file(path).part(component)
    if component == "transformer":
        return BflFile(path) if part.layout == "bf16" else TransformerReader(path)
    return {"text_encoder_2": T5Reader, "text_encoder": ClipReader, "vae": VaeReader}[component](path)
