"""quantize_pipeline: stream the source's tensors in, write a self-contained quantized pipeline out.

Only one source tensor (plus at most one output shard) is in host memory at a time: the models are
built on the meta device for their names and shapes, and every Linear weight is quantized as it
streams past. The transformer and T5 are quantized; CLIP, the VAE, tokenizers and scheduler are
copied byte for byte.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import (
    ShardWriter,
    atomic_folder,
    check_out_parent,
    library_versions,
    os_error,
    out_lock,
    refuse_existing,
    refuse_overlap,
    write_manifest,
)
from .errors import KreaLiteError
from .schemes import get_scheme
from .w8a8 import Linear8

# Linears that stay bf16 by default. They are ~0.3% of the transformer's weights but every token
# and the whole conditioning pass through them: the patch and text embedders (first layers), the
# timestep/guidance/pooled-text embedders, and the final adaLN + projection (last layers). The
# per-block modulation linears (norm1.linear, ~27% of the weights) ARE quantized: keeping them would
# add ~6 GiB. Their effect on real images is unmeasured here (no real weights); override with --keep.
TRANSFORMER_KEEP = ("x_embedder", "context_embedder", "time_text_embed.*", "norm_out.linear", "proj_out")
# diffusers' bitsandbytes loader skips every Linear whose *local* name is in llm_int8_skip_modules,
# so keeping the top-level `proj_out` (3072x64) would also keep all 38 `single_transformer_blocks.*.proj_out`
# (3.6 GB): for folders plain diffusers must load, the final projection is quantized too.
TRANSFORMER_KEEP_BNB = tuple(p for p in TRANSFORMER_KEEP if p != "proj_out")
# transformers never bnb-quantizes T5's FFN output `wo` (T5's _keep_in_fp32_modules), so a bnb
# folder that plain transformers must load has to keep it bf16 too. optimum-quanto has no such rule.
T5_KEEP_BNB = ("encoder.block.*.layer.1.DenseReluDense.wo",)
KEEP_REASON = {
    "transformer": "embedders and final layers touch every token/conditioning and are tiny",
    "text_encoder_2": "plain transformers keeps T5 `wo` unquantized for bitsandbytes (_keep_in_fp32_modules)",
}
# The 8-bit-activation schemes keep T5's `wo` too, for their own reasons.
W8A8_T5_KEEP_REASON = ("T5 casts `wo`'s input to `wo`'s weight dtype (fp8 would destroy it), and that input "
                       "carries T5's largest activation outliers (per-token 8-bit would clip them)")
QUANTIZED = {"transformer": "diffusion_pytorch_model", "text_encoder_2": "model"}
DEFAULT_SCHEME = "nf4"  # for a component whose source stores plain floats
AUTO = "auto"  # --transformer auto: see QuantizeConfig
COPIED = ("text_encoder", "vae", "tokenizer", "tokenizer_2", "scheduler")


@dataclass(frozen=True)
class QuantizeConfig:
    """What `quantize_pipeline` makes.

    Args:
        transformer: scheme for the FLUX transformer (see `krea_lite.schemes.SCHEMES`); None: what a
            single-file source stores, kept as it is (GGUF, ComfyUI fp8, Forge NF4), else "nf4"; "auto":
            the 8-bit-matmul scheme the quantizing GPU runs natively (`w8a8.native_scheme`: fp8mm on
            compute capability 8.9+, int8mm on 8.0+, else nf4), or a single file's own form.
        text_encoder: scheme for the T5-XXL text encoder (CLIP-L is small and stays bf16); None as above.
        keep: module-name patterns (fnmatch) left in bf16, replacing the defaults of both
            components; a pattern that matches nothing in either is an error.
        base: for a single-file source, where the other components come from (repo id or folder).
        t5, clip, vae: single files for T5-XXL, CLIP-L and the VAE (ComfyUI's t5xxl_fp16 /
            t5xxl_fp8_e4m3fn(_scaled), clip_l, ae.safetensors), instead of the base's weights; the
            configs still come from the base (or the source folder).
        revision: hub revision for a repo id source.
        device: where quantization runs ("cuda" or "cpu"); default cuda when available.
    """

    transformer: str | None = None
    text_encoder: str | None = None
    keep: tuple[str, ...] | None = None
    base: str | None = None
    revision: str | None = None
    device: str | None = None
    t5: str | None = None
    clip: str | None = None
    vae: str | None = None

    @property
    def files(self) -> dict[str, str]:
        """{component: single file} for the components given as files."""
        given = {"text_encoder_2": self.t5, "text_encoder": self.clip, "vae": self.vae}
        return {c: str(p) for c, p in given.items() if p is not None}

    def __post_init__(self):
        for name in (self.transformer if self.transformer != AUTO else None, self.text_encoder):
            if name is not None:
                get_scheme(name)
        if self.device not in (None, "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise KreaLiteError(f"device {self.device!r} is not 'cpu' or 'cuda'; use --device cpu, cuda or cuda:N")


def build_meta(component: str, config: dict) -> nn.Module:
    """The component's model with every tensor on the meta device (no memory)."""
    if component == "transformer":
        from diffusers import FluxTransformer2DModel

        with torch.device("meta"):
            return FluxTransformer2DModel.from_config(config)
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config.from_dict({k: v for k, v in config.items() if k != "quantization_config"})
    with torch.device("meta"):
        return T5EncoderModel(cfg)


def keep_patterns(component: str, scheme_name: str, override: tuple[str, ...] | None) -> tuple[str, ...]:
    if scheme_name == "bf16":
        return ()
    if override is not None:
        return override
    backend = get_scheme(scheme_name).backend
    if component == "transformer":
        return TRANSFORMER_KEEP_BNB if backend == "bitsandbytes" else TRANSFORMER_KEEP
    return T5_KEEP_BNB if backend in ("bitsandbytes", "krea-lite") else ()


def _keep_reason(component: str, scheme, kept: list[str]) -> str | None:
    if not kept:
        return None
    return W8A8_T5_KEEP_REASON if component != "transformer" and scheme.backend == "krea-lite" else KEEP_REASON[component]


def split_linears(model: nn.Module, patterns: tuple[str, ...]) -> tuple[list[str], list[str], set[str]]:
    """(quantized, kept) Linear names, and the patterns that matched nothing (a Linear8 is quantized already)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, Linear8)]
    kept = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    unused = {p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)}
    return [n for n in names if n not in kept], kept, unused


def _expected(model: nn.Module) -> tuple[dict[str, torch.Size], dict[str, str]]:
    """Shapes of every stored tensor, and alias -> canonical name for tied parameters."""
    shapes, canonical, by_id = {}, {}, {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        first = by_id.setdefault(id(t), name)
        canonical[name] = first
        shapes[name] = t.shape
    return shapes, canonical


def scheme_for(src, component: str, asked: str | None) -> tuple[str, bool]:
    """(scheme name, native): the scheme asked for, else what the source's file stores, else nf4;
    `native` when the stored form is copied as it is (no second quantization)."""
    reader = src.reader(component)
    stored = reader.native_scheme if reader is not None else None
    name = asked or stored or DEFAULT_SCHEME
    return name, stored is not None and name == stored


def _check_tensor(who, component: str, name: str, shape, dtype, shapes: dict) -> None:
    """`who`: the source id or single file named in the error."""
    if name not in shapes:
        raise KreaLiteError(f"{who}: {component} tensor {name!r} is not part of FLUX.1's {component}; "
                            "is this the right model?")
    if tuple(shape) != tuple(shapes[name]):
        raise KreaLiteError(f"{who}: {component} tensor {name!r} has shape {tuple(shape)}, config.json "
                            f"expects {tuple(shapes[name])}; the weights do not match the config")
    if dtype is not None and not dtype.is_floating_point:
        raise KreaLiteError(f"{who}: {component} tensor {name!r} has dtype {dtype}; expected floating "
                            "point weights (bf16/fp16/fp32/fp8)")


def _convert(src, component: str, scheme, native: bool, patterns, out: Path, device: str, bar) -> dict:
    config = src.config(component)
    model = build_meta(component, config)
    quantized, kept, unused = split_linears(model, patterns)
    if scheme.name == "bf16":
        quantized, kept = [], []
    targets = set(quantized)
    shapes, canonical = _expected(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    writer = ShardWriter(out, QUANTIZED[component])
    seen, stored_quantized = set(), []
    reader = src.reader(component)
    who = reader.path if reader is not None else src.id
    if native:  # the source's own stored form, copied: no second quantization
        for name, value in reader.iter_native():
            if isinstance(value, dict):
                if name not in linears:
                    raise KreaLiteError(f"{who}: {component} holds a quantized {name!r}, which is not a Linear "
                                        f"of FLUX.1's {component}; is this the right model?")
                _check_tensor(who, component, f"{name}.weight", scheme.logical_shape(value), None, shapes)
                for key, t in value.items():
                    writer.add(f"{name}.{key}", t)
                stored_quantized.append(name)
                seen.add(canonical[f"{name}.weight"])
                bar.update(sum(t.numel() * t.element_size() for t in value.values()))
                continue
            _check_tensor(who, component, name, value.shape, value.dtype, shapes)
            writer.add(name, value.to(torch.bfloat16))
            seen.add(canonical[name])
            bar.update(value.numel() * value.element_size())
        done = set(stored_quantized)
        quantized, kept = [n for n in linears if n in done], ([n for n in linears if n not in done] if done else [])
    else:
        for name, t in src.iter_tensors(component):
            _check_tensor(who, component, name, t.shape, t.dtype, shapes)
            module, _, leaf = name.rpartition(".")
            if leaf == "weight" and module in targets:
                for key, value in scheme.quantize(t.to(device=device, dtype=torch.bfloat16)).items():
                    writer.add(f"{module}.{key}", value)
            else:
                writer.add(name, t.to(torch.bfloat16))
            seen.add(canonical[name])
            bar.update(t.numel() * t.element_size())
    missing = sorted({canonical[n] for n in shapes} - seen)
    if missing:
        raise KreaLiteError(f"{who}: {component} is missing {len(missing)} tensors (first: {missing[0]!r}); "
                            "the download is incomplete or this is not FLUX.1")
    writer.close()
    skip = [m for m in kept if m != "proj_out"] if native and scheme.backend == "bitsandbytes" else kept
    qc = scheme.library_config(skip, component) if quantized else None
    (out / "config.json").write_text(json.dumps({**config, **({"quantization_config": qc} if qc else {})}, indent=2))
    stored_in = reader.native_scheme if reader is not None else None
    return {
        "scheme": scheme.name,
        "backend": scheme.backend if quantized else None,
        "description": scheme.description,
        "quantized_modules": quantized,
        "kept_modules": kept,
        "keep_patterns": [] if native else list(patterns),
        "keep_reason": ("as stored in the source file" if native and kept else
                        _keep_reason(component, scheme, kept)),
        "unused_patterns": [] if native else sorted(unused),
        # where the weights came from, and whether quantized weights were quantized once more
        "source_format": reader.format if reader is not None else "diffusers",
        "stored_as": "native" if native else ("converted" if stored_in else "quantized"),
        "requantized": bool(stored_in) and not native and scheme.name != "bf16",
        **({"native": reader.native_info()} if native else {}),
        **({"requires": scheme.requires()} if quantized and scheme.requires() else {}),
        "source_bytes": sum(p.stat().st_size for p in src.files(component)),
        "bytes": sum(p.stat().st_size for p in out.iterdir()),
    }


def _copy_component(src_dir: Path, dst: Path) -> dict:
    if not src_dir.is_dir():
        raise KreaLiteError(f"{src_dir} is missing; the source is not a complete FLUX pipeline")
    files = [p for p in src_dir.iterdir() if p.is_file() and p.suffix not in (".bin", ".pt", ".pth", ".ckpt")]
    has_bin = any(p.suffix in (".bin", ".pt", ".pth", ".ckpt") for p in src_dir.iterdir())
    if has_bin and not any(p.suffix == ".safetensors" for p in files):
        raise KreaLiteError(f"{src_dir} holds only pickle weights (.bin/.pt); krea-lite reads safetensors only")
    dst.mkdir(parents=True)
    for p in files:
        shutil.copyfile(p, dst / p.name)  # copies, never moves: the source stays untouched
    size = sum(p.stat().st_size for p in files)
    return {"scheme": "copied", "backend": None, "source_bytes": size, "bytes": size}


def _copied_shapes(component: str, config: dict) -> dict[str, torch.Size]:
    """Tensor shapes of CLIP-L (CLIPTextModel, names without `text_model.`) or the VAE, for `config`."""
    if component == "vae":
        from diffusers import AutoencoderKL

        with torch.device("meta"):
            model = AutoencoderKL.from_config(config)
    else:
        from transformers import CLIPTextConfig, CLIPTextModel

        with torch.device("meta"):
            model = CLIPTextModel(CLIPTextConfig.from_dict(config))
    return {n: t.shape for n, t in model.state_dict().items() if not n.endswith("position_ids")}


def _write_component(src, component: str, dst: Path) -> dict:
    """A copied component (CLIP, VAE) whose weights come from a single file: config.json from the base
    folder, the file's tensors (as bf16, under diffusers names) as a diffusers safetensors component."""
    from .source import WEIGHTS

    reader = src.reader(component)
    who = reader.path
    shapes = _copied_shapes(component, src.config(component))
    dst.mkdir(parents=True)
    shutil.copyfile(src.root / component / "config.json", dst / "config.json")
    writer = ShardWriter(dst, WEIGHTS[component])
    seen = set()
    for name, t in reader.iter_tensors():
        key = name.removeprefix("text_model.") if component == "text_encoder" else name
        _check_tensor(who, component, key, t.shape, t.dtype, shapes)
        writer.add(name, t.to(torch.bfloat16))
        seen.add(key)
    if missing := sorted(set(shapes) - seen):
        raise KreaLiteError(f"{reader.path}: {component} is missing {len(missing)} tensors (first: {missing[0]!r}); "
                            "the file is incomplete or not FLUX.1's")
    writer.close()
    return {"scheme": "converted", "backend": None, "source_format": reader.format,
            **({"source_tensors": info} if (info := reader.native_info()) else {}),
            "source_bytes": sum(p.stat().st_size for p in reader.files),
            "bytes": sum(p.stat().st_size for p in dst.iterdir())}


def _estimate_bytes(src, config: QuantizeConfig) -> int:
    """Bytes the folder will take: a kept native form as stored; otherwise every weight of the component
    (counted on the meta model, whatever the source stores) at the scheme's bits; copied files as they are,
    single-file CLIP/VAE in bf16."""
    total = 0
    for component, asked in (("transformer", config.transformer), ("text_encoder_2", config.text_encoder)):
        name, native = scheme_for(src, component, asked)
        if native:
            total += sum(p.stat().st_size for p in src.files(component))
            continue
        numel = sum(t.numel() for t in build_meta(component, src.config(component)).state_dict().values())
        total += int(numel * get_scheme(name).bits / 8)
    for component in COPIED:
        if (reader := src.reader(component)) is not None:
            total += 2 * sum(p.stat().st_size for p in reader.files)  # fp8 -> bf16 at most doubles
            continue
        d = src.root / component
        total += sum(p.stat().st_size for p in d.iterdir() if p.is_file()) if d.is_dir() else 0
    return total


def _device_name(device: str) -> str:
    if not str(device).startswith("cuda"):
        return "the CPU"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def quantize_pipeline(source: str | Path, out: str | Path, config: QuantizeConfig | None = None,
                      force: bool = False, progress: bool = True) -> Path:
    """Convert a FLUX.1 Krea [dev] source into a quantized, self-describing pipeline folder.

    Args:
        source: a Hugging Face repo id, a local diffusers pipeline folder, or the single-file
            `flux1-krea-dev.safetensors` (other components then come from `config.base`).
        out: the folder to create. It appears atomically, manifest last.
        config: schemes and options (`QuantizeConfig`); default NF4 for transformer and T5.
        force: replace an existing `out` (never one that overlaps the source).
        progress: show tqdm progress bars.

    Returns:
        The path of the finished folder.
    """
    config = config or QuantizeConfig()
    out = Path(out).expanduser()
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():  # before any download
        raise KreaLiteError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu")
    local = tuple(Path(p).expanduser() for p in (source, config.base, *config.files.values())
                  if p and Path(p).expanduser().exists())
    refuse_overlap(out, local)  # before any download: a local source (or base) and --out must not overlap
    check_out_parent(out)
    with out_lock(out):  # one run per --out: a second one fails here instead of replacing the first
        return _quantize_locked(source, out, config, device, force, progress)


def _quantize_locked(source, out: Path, config: QuantizeConfig, device: str, force: bool, progress: bool) -> Path:
    from .progress import progress_bar
    from .source import resolve_source

    refuse_existing(out, force)
    src = resolve_source(str(source), base=config.base, revision=config.revision, files=config.files)
    chosen = None
    if config.transformer == AUTO:
        from dataclasses import replace

        from .w8a8 import native_scheme

        reader = src.reader("transformer")
        if reader is not None and reader.native_scheme:
            name, why = reader.native_scheme, f"the source file stores {reader.native_scheme}; kept as it is"
        else:
            name, why = native_scheme(device)
        chosen = f"--transformer auto on {_device_name(device)}: {why}"
        print(f"krea-lite: --transformer auto chose {name} ({why})", flush=True)
        config = replace(config, transformer=name)
    protect = (src.root,) + tuple(p for _, r in src.readers for p in r.files)
    for component, asked in (("transformer", config.transformer), ("text_encoder_2", config.text_encoder)):
        name, native = scheme_for(src, component, asked)
        if get_scheme(name).backend == "gguf" and not native:
            raise KreaLiteError(f"--{'transformer' if component == 'transformer' else 'text-encoder'} gguf keeps the "
                                "blocks of a FLUX .gguf source; it cannot quantize other weights: choose another scheme")
        if native and config.keep is not None:
            raise KreaLiteError(f"--keep applies when krea-lite quantizes; {src.files(component)[0].name} is kept as "
                                f"it stores its {component} ({name}): drop --keep, or pass --transformer/--text-encoder "
                                "SCHEME to convert it")
    needed = _estimate_bytes(src, config)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.resolve().parent).free
    if free < needed * 1.05:
        raise KreaLiteError(f"{out.resolve().parent} has {_size(free)} free; the conversion needs about "
                            f"{_size(needed * 1.05)}: free some space or choose another --out")
    if config.keep is not None:
        matched = set()
        for component in QUANTIZED:
            model = build_meta(component, src.config(component))
            matched |= set(config.keep) - split_linears(model, config.keep)[2]
        if unmatched := sorted(set(config.keep) - matched):
            raise KreaLiteError(f"--keep pattern {unmatched[0]!r} matches no Linear module of the transformer or T5")

    started = time.perf_counter()
    # A single-file source is hashed for the manifest while the conversion runs, not in a second pass
    # over its 24 GB afterwards; a failed conversion stops the hash.
    source_info, stop = {}, threading.Event()

    def describe():
        try:
            source_info.update(src.describe(stop))
        except Exception:  # noqa: BLE001  describe() runs again below, in the caller's thread, and raises there
            pass

    hasher = threading.Thread(target=describe, daemon=True, name="krea-lite-sha256")
    hasher.start()
    try:
        with atomic_folder(out, force=force, protect=protect) as tmp:
            components = {}
            total = sum(p.stat().st_size for c in QUANTIZED for p in src.files(c))
            with progress_bar(total=total, unit="B", unit_scale=True, desc="quantize", disable=not progress) as bar:
                for component, asked in (("transformer", config.transformer),
                                         ("text_encoder_2", config.text_encoder)):
                    scheme_name, native = scheme_for(src, component, asked)
                    patterns = keep_patterns(component, scheme_name, config.keep)
                    components[component] = _convert(src, component, get_scheme(scheme_name), native, patterns,
                                                     tmp / component, device, bar)
                    if component == "transformer" and chosen:
                        components[component]["chosen_by"] = chosen
            for component in COPIED:
                components[component] = (_write_component(src, component, tmp / component)
                                         if src.reader(component) is not None
                                         else _copy_component(src.root / component, tmp / component))
            shutil.copyfile(src.root / "model_index.json", tmp / "model_index.json")
            hasher.join()
            if not source_info:  # the hash thread failed (the file vanished or cannot be read)
                source_info.update(src.describe())  # raises the error here, in the caller's thread
            write_manifest(tmp, {
                "source": source_info,
                "components": components,
                "libraries": library_versions(),
                "quantize_seconds": round(time.perf_counter() - started, 1),
            })
    except OSError as e:
        if (line := os_error(e, out)) is not None:
            raise line from e
        raise
    finally:
        stop.set()
    return out
