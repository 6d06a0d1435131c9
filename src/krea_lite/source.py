"""resolve_source: where the weights come from -> a `Source` that yields diffusers-named tensors lazily.

Three kinds of source, one interface:
  - a Hugging Face repo id ("owner/name"): the diffusers component folders are fetched (or found in
    the local cache) with `huggingface_hub.snapshot_download`, never the root single files;
  - a local diffusers pipeline folder (model_index.json naming FluxPipeline + component folders);
  - a BFL/ComfyUI single file (`flux1-krea-dev.safetensors`): the transformer comes from it,
    converted to diffusers names and layouts tensor by tensor; everything else from `base`.

Tensors are read one at a time with `safetensors.safe_open`, so a 24 GB file never sits in RAM.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import KreaLiteError

DEFAULT_REPO = "black-forest-labs/FLUX.1-Krea-dev"
COMPONENTS = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae")
# Weight file prefix per component, as diffusers/transformers name them (`<prefix>.safetensors`, or
# `<prefix>-0000i-of-0000n.safetensors` + `<prefix>.safetensors.index.json` when sharded).
WEIGHTS = {"transformer": "diffusion_pytorch_model", "text_encoder": "model", "text_encoder_2": "model",
           "vae": "diffusion_pytorch_model"}
SYNTHETIC_MARKER = "krea_lite_synthetic.json"  # written by krea_lite.synthetic: random weights
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMFY_PREFIX = "model.diffusion_model."

# ---------------------------------------------------------------------------------------------------
# BFL <-> diffusers names for the FLUX transformer. Each BFL key holds the listed diffusers tensors
# concatenated along dim 0; every part but the last is `hidden` (= num_heads * head_dim) rows long
# (fused qkv: 3 x hidden; single-block linear1: q, k, v, then the 4 x hidden MLP input).
# Mirrors diffusers' convert_flux_transformer_checkpoint_to_diffusers.


def _linear(bfl: str, *diffusers: str) -> list[tuple[str, tuple[str, ...]]]:
    return [(f"{bfl}.{p}", tuple(f"{d}.{p}" for d in diffusers)) for p in ("weight", "bias")]


_GLOBAL = [
    *_linear("img_in", "x_embedder"),
    *_linear("txt_in", "context_embedder"),
    *_linear("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    *_linear("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    *_linear("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    *_linear("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    *_linear("final_layer.linear", "proj_out"),
    *_linear("final_layer.adaLN_modulation.1", "norm_out.linear"),
]
_GUIDANCE = [
    *_linear("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    *_linear("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
]
_DOUBLE = [
    *_linear("img_mod.lin", "norm1.linear"),
    *_linear("txt_mod.lin", "norm1_context.linear"),
    *_linear("img_attn.qkv", "attn.to_q", "attn.to_k", "attn.to_v"),
    *_linear("txt_attn.qkv", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    ("img_attn.norm.query_norm.scale", ("attn.norm_q.weight",)),
    ("img_attn.norm.key_norm.scale", ("attn.norm_k.weight",)),
    ("txt_attn.norm.query_norm.scale", ("attn.norm_added_q.weight",)),
    ("txt_attn.norm.key_norm.scale", ("attn.norm_added_k.weight",)),
    *_linear("img_attn.proj", "attn.to_out.0"),
    *_linear("txt_attn.proj", "attn.to_add_out"),
    *_linear("img_mlp.0", "ff.net.0.proj"),
    *_linear("img_mlp.2", "ff.net.2"),
    *_linear("txt_mlp.0", "ff_context.net.0.proj"),
    *_linear("txt_mlp.2", "ff_context.net.2"),
]
_SINGLE = [
    *_linear("modulation.lin", "norm.linear"),
    *_linear("linear1", "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    ("norm.query_norm.scale", ("attn.norm_q.weight",)),
    ("norm.key_norm.scale", ("attn.norm_k.weight",)),
    *_linear("linear2", "proj_out"),
]
# BFL's final AdaLayerNorm projects to (shift, scale); diffusers' AdaLayerNormContinuous to (scale, shift).
SWAPPED = frozenset({"final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"})


def bfl_layout(num_layers: int, num_single_layers: int, guidance: bool = True) -> dict[str, tuple[str, ...]]:
    """Every BFL key of a FLUX transformer -> the diffusers keys it concatenates (dim 0, in order)."""
    out = dict(_GLOBAL + (_GUIDANCE if guidance else []))
    for i in range(num_layers):
        out.update((f"double_blocks.{i}.{b}", tuple(f"transformer_blocks.{i}.{d}" for d in ds)) for b, ds in _DOUBLE)
    for i in range(num_single_layers):
        out.update((f"single_blocks.{i}.{b}", tuple(f"single_transformer_blocks.{i}.{d}" for d in ds))
                   for b, ds in _SINGLE)
    return out


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift) along dim 0; its own inverse."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a])


def bfl_to_diffusers(key: str, tensor: torch.Tensor, parts: tuple[str, ...], hidden: int):
    """Split one BFL tensor into its diffusers tensors (copies, so none shares the fused storage)."""
    if key in SWAPPED:
        tensor = swap_halves(tensor)
    sizes = [hidden] * (len(parts) - 1) + [tensor.shape[0] - hidden * (len(parts) - 1)]
    return [(name, t.clone()) for name, t in zip(parts, torch.split(tensor, sizes), strict=True)]


def diffusers_to_bfl(key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The inverse of `bfl_to_diffusers`: concatenate the parts (and swap the final adaLN halves)."""
    t = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
    return swap_halves(t) if key in SWAPPED else t


# ---------------------------------------------------------------------------------------------------
# Reading safetensors with one-line errors.


@contextmanager
def open_safetensors(path: Path):
    """`safe_open` on the CPU; a damaged file becomes a KreaLiteError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        f = safe_open(str(path), framework="pt", device="cpu")
    except FileNotFoundError:
        raise KreaLiteError(f"{path} is missing; re-download it") from None
    except (SafetensorError, OSError) as e:
        raise KreaLiteError(f"{path} is truncated or not a safetensors file ({e}); re-download it") from None
    with f:
        yield f


def _as_bf16(t: torch.Tensor) -> torch.Tensor:
    # fp8 / fp16 / fp32 releases all become bf16, the dtype everything downstream works in
    return t.to(torch.bfloat16) if t.is_floating_point() and t.dtype != torch.bfloat16 else t


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise KreaLiteError(f"{path} is missing; the pipeline folder is incomplete (re-download it)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KreaLiteError(f"{path} is not valid JSON ({e}); re-download it") from None
    if not isinstance(data, dict):
        raise KreaLiteError(f"{path} is not a JSON object; re-download it")
    return data


def _weight_files(folder: Path, prefix: str) -> list[Path]:
    index = folder / f"{prefix}.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise KreaLiteError(f"{index} has no weight_map; re-download it")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise KreaLiteError(f"{f} is missing (named in {index.name}); the download is incomplete, re-download it")
        return files
    single = folder / f"{prefix}.safetensors"
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    hint = f" (found {pickles[0]}: krea-lite reads safetensors only)" if pickles else ""
    raise KreaLiteError(f"{folder} has no {prefix}.safetensors nor {index.name}{hint}; re-download the component")


# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SingleFile:
    """The parsed header of a BFL single file: stored key -> diffusers parts, and the hidden size."""

    layout: dict[str, tuple[str, ...]]
    hidden: int


def _read_single_file(path: Path) -> _SingleFile:
    with open_safetensors(path) as f:
        keys = list(f.keys())
        prefix = _COMFY_PREFIX if any(k.startswith(_COMFY_PREFIX) for k in keys) else ""
        # a ComfyUI checkpoint may also carry the VAE and text encoders: only its diffusion model is read
        keys = [k for k in keys if k.startswith(prefix)]
        names = {k[len(prefix):]: k for k in keys}
        if any(n.endswith("scale_weight") or n == "scaled_fp8" for n in names):
            # open_file gives such files to singlefile.TransformerReader; read as plain floats they would lose
            # their scales
            raise KreaLiteError(f"{path} stores ComfyUI 'scaled fp8' weights: open it with source.open_file")
        if "img_in.weight" not in names or not any(n.startswith("double_blocks.") for n in names):
            raise KreaLiteError(f"{path} is not a FLUX transformer single file (no img_in / double_blocks.* "
                                "tensors); pass flux1-krea-dev.safetensors or a diffusers folder")
        hidden = f.get_slice(names["img_in.weight"]).get_shape()[0]

    layout = flux_layout(path, names, "pass flux1-krea-dev.safetensors or a diffusers folder")
    return _SingleFile({names[n]: parts for n, parts in layout.items()}, hidden)


def flux_layout(path: Path, names, instead: str) -> dict[str, tuple[str, ...]]:
    """BFL name -> its diffusers parts, for every name in `names` (the BFL tensor names of a transformer file;
    the block counts are read from them). One line naming `path` when a name is not FLUX's ("`instead`":
    what to pass) or a FLUX tensor is missing."""

    def count(block: str) -> int:  # blocks are numbered from 0; a malformed name fails as unknown below
        return 1 + max((int(i) for n in names if n.startswith(block) and (i := n.split(".")[1]).isdigit()),
                       default=-1)

    expected = bfl_layout(count("double_blocks."), count("single_blocks."),
                          guidance="guidance_in.in_layer.weight" in names)
    if unknown := sorted(set(names) - set(expected)):
        raise KreaLiteError(f"{path} holds {unknown[0]!r}, which is not part of a FLUX transformer; {instead}")
    if missing := sorted(set(expected) - set(names)):
        raise KreaLiteError(f"{path} lacks {missing[0]!r} ({len(missing)} FLUX tensors missing); re-download it")
    return {n: expected[n] for n in sorted(names)}


class Reader:
    """One component's weights from a single file rather than a diffusers folder (BFL, GGUF, ComfyUI, Forge).

    A reader yields the component's tensors under diffusers/transformers names two ways: `iter_tensors`
    as plain bf16 (dequantized, for any scheme to quantize), and, where the file stores Linear weights
    in a form one of krea-lite's schemes keeps (`native_scheme`), `iter_native` as exactly that stored
    form, so a conversion copies them without quantizing a second time.
    """

    format = "?"  # what the manifest calls the file's layout ("bfl", "gguf", ...)
    native_scheme: str | None = None  # a schemes.SCHEMES name its quantized Linears already are; None: floats

    def __init__(self, path: Path):
        self.path = path

    @property
    def files(self) -> list[Path]:
        return [self.path]

    def tensor_names(self) -> list[str]:
        """Diffusers names of the tensors `iter_tensors` yields, in order."""
        raise NotImplementedError

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (diffusers name, bf16 CPU tensor) one at a time."""
        raise NotImplementedError

    def iter_native(self) -> Iterator[tuple[str, torch.Tensor | dict[str, torch.Tensor]]]:
        """Yield (diffusers name, tensor) for a plain tensor, or (Linear module name, {key: tensor}) for a
        Linear stored in `native_scheme`'s form (the keys `Scheme.quantize` returns; its bias comes on its own)."""
        raise NotImplementedError

    def native_info(self) -> dict:
        """What the manifest records about the stored form (e.g. {"tensor_types": {"Q4_K": 304, ...}})."""
        return {}

    def describe(self, stop: threading.Event | None = None) -> dict:
        from .checkpoint import sha256_file

        return {"name": self.path.name, "size": self.path.stat().st_size, "sha256": sha256_file(self.path, stop=stop)}


class BflFile(Reader):
    """The BFL release's single-file transformer (`flux1-krea-dev.safetensors`, or ComfyUI's copy of it)."""

    format = "bfl"

    def __init__(self, path: Path):
        super().__init__(path)
        self.single = _read_single_file(path)  # fails now on a damaged or non-FLUX file

    def tensor_names(self):
        return [n for parts in self.single.layout.values() for n in parts]

    def iter_tensors(self):
        with open_safetensors(self.path) as f:
            for key, parts in self.single.layout.items():
                yield from bfl_to_diffusers(key.removeprefix(_COMFY_PREFIX), _as_bf16(_get(f, self.path, key)),
                                            parts, self.single.hidden)


def _get(f, path: Path, key: str) -> torch.Tensor:
    try:
        return f.get_tensor(key)
    except Exception as e:  # SafetensorError, OSError (file shrank under us), unsupported dtype
        raise KreaLiteError(f"{path}: tensor {key!r} cannot be read ({e}); re-download the file") from None


def open_file(path: Path, component: str = "transformer") -> Reader:
    """The reader for one component's single file, chosen from the file's own header, not its name."""
    path = Path(path).expanduser()
    if not path.is_file():
        what = {"transformer": "transformer", "text_encoder_2": "--t5 (T5-XXL)", "text_encoder": "--clip (CLIP-L)",
                "vae": "--vae"}.get(component, component)
        raise KreaLiteError(f"{path} does not exist; pass the path of an existing {what} file")
    from .formats import is_gguf
    from .gguf_file import GGUFFile
    from .singlefile import reader_for

    if component == "transformer" and is_gguf(path):
        return GGUFFile(path.resolve())
    return reader_for(path.resolve(), component)


@dataclass(frozen=True)
class Source:
    """A resolved FLUX.1 pipeline: where each component's config and weights are.

    `root` is a local diffusers pipeline folder: configs, tokenizers and scheduler always come from it.
    `readers` replaces the weights of some components with single files (`Reader`s): the transformer
    from a BFL single file, for instance; only `root/<component>/config.json` is read for those.
    """

    id: str
    root: Path
    revision: str | None = None
    readers: tuple[tuple[str, Reader], ...] = ()

    def reader(self, component: str) -> Reader | None:
        """The single-file reader of `component`, or None when its weights are in `root`."""
        return dict(self.readers).get(component)

    @property
    def transformer_file(self) -> Path | None:
        r = self.reader("transformer")
        return r.path if r is not None else None

    def config(self, component: str) -> dict:
        """The config.json of transformer / text_encoder / text_encoder_2 / vae."""
        return _read_json(self.root / component / "config.json")

    def files(self, component: str) -> list[Path]:
        """The weight files `iter_tensors(component)` reads."""
        if (r := self.reader(component)) is not None:
            return r.files
        if component not in WEIGHTS:
            raise KreaLiteError(f"{component!r} has no weights; choose one of {', '.join(WEIGHTS)}")
        return _weight_files(self.root / component, WEIGHTS[component])

    def tensor_names(self, component: str) -> list[str]:
        """Diffusers/transformers names of the component's tensors, in `iter_tensors` order."""
        if (r := self.reader(component)) is not None:
            return r.tensor_names()
        names = []
        for path in self.files(component):
            with open_safetensors(path) as f:
                names += list(f.keys())
        return names

    def iter_tensors(self, component: str) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (diffusers name, bf16 CPU tensor) one at a time; fused BFL tensors yield their parts."""
        if (r := self.reader(component)) is not None:
            yield from r.iter_tensors()
            return
        for path in self.files(component):
            with open_safetensors(path) as f:
                for key in f.keys():
                    yield key, _as_bf16(_get(f, path, key))

    def describe(self, stop: threading.Event | None = None) -> dict:
        """What the manifest records: id, revision, and for each single file its name, size and sha256
        (`stop`: give up hashing, e.g. because the conversion running beside it failed)."""
        out: dict = {"id": self.id, "revision": self.revision}
        for component, r in self.readers:
            out[f"{component}_file"] = {**r.describe(stop), **({"format": r.format} if r.format != "bfl" else {})}
        marker = self.root / SYNTHETIC_MARKER
        if marker.is_file():
            out["synthetic"] = _read_json(marker)
        return out


# ---------------------------------------------------------------------------------------------------


def _check_pipeline_folder(root: Path, transformer_weights: bool = True, from_files: tuple[str, ...] = ()) -> None:
    if not any(root.iterdir()):
        raise KreaLiteError(f"{root} is empty; pass a FLUX diffusers folder, a .safetensors file or a repo id")
    index = root / "model_index.json"
    if not index.is_file():
        raise KreaLiteError(f"{root} has no model_index.json: not a diffusers pipeline folder; pass the folder "
                            "holding model_index.json and transformer/, vae/, ...")
    cls = _read_json(index).get("_class_name")
    if cls != "FluxPipeline":
        raise KreaLiteError(f"{index} describes a {cls!r}, not a FluxPipeline; pass a FLUX.1 pipeline")
    for component in COMPONENTS:
        if not (root / component).is_dir():
            raise KreaLiteError(f"{root / component} is missing; the pipeline folder is incomplete (re-download it)")
    for component, prefix in WEIGHTS.items():
        if not (root / component / "config.json").is_file():
            raise KreaLiteError(f"{root / component / 'config.json'} is missing; re-download the component")
        if (component != "transformer" or transformer_weights) and component not in from_files:
            _weight_files(root / component, prefix)


def _allow_patterns(transformer_weights: bool, from_files: tuple[str, ...] = ()) -> list[str]:
    # a component whose weights come from a single file: only its config.json is fetched
    patterns = ["model_index.json"] + [f"{c}/config.json" if c in from_files else f"{c}/*"
                                       for c in COMPONENTS if c != "transformer"]
    return patterns + (["transformer/*"] if transformer_weights else ["transformer/config.json"])


def _snapshot(repo_id: str, revision: str | None, transformer_weights: bool, what: str | None = None,
              instead: str = "pass a local diffusers folder", typed: bool = True,
              from_files: tuple[str, ...] = ()) -> Path:
    """The local snapshot folder of a hub repo (downloaded unless cached); errors as one line.

    `what` names the repo id where the hub has no such repo (default: "<id> is not a folder here
    ..., and as a repo id it"); `instead` is the advice that replaces a download; `typed`: the user
    typed the id (a mistyped path is possible), rather than it being a default."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision!r}" if revision else ""
    what = what or f"{repo_id} is not a folder here (no such path), and as a Hugging Face repo id{at} it"
    check = "check the path or repo id, " if typed else ""
    login = f"accept the licence at https://huggingface.co/{repo_id} and run `hf auth login` or set HF_TOKEN"
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_allow_patterns(transformer_weights,
                                                                                      from_files)))
    except GatedRepoError:
        raise KreaLiteError(f"{repo_id} is gated and this account has no access: {login}") from None
    except RevisionNotFoundError:
        raise KreaLiteError(f"{repo_id} has no revision {revision!r}; check --revision") from None
    except RepositoryNotFoundError:
        raise KreaLiteError(f"{what} was not found on the Hugging Face hub (or is private: run `hf auth login` "
                            f"or set HF_TOKEN); {check or 'check the repo id, '}or {instead}") from None
    except IncompleteSnapshotError:
        raise KreaLiteError(f"the cached download of {repo_id}{at} is incomplete and the hub cannot be reached; "
                            f"connect to finish it, or {instead}") from None
    except LocalEntryNotFoundError:
        raise KreaLiteError(f"{what} is not in the local Hugging Face cache and the hub cannot be reached; "
                            f"{check}connect to download it, or {instead}") from None
    except HFValidationError:
        raise KreaLiteError(f"{repo_id!r} is neither an existing path nor a valid Hugging Face repo id") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise KreaLiteError(f"{repo_id}: the hub refused access (HTTP {status}): {login}") from None
        raise KreaLiteError(f"{repo_id}: the Hugging Face hub answered HTTP {status}; try again later, "
                            f"or {instead}") from None


def _pipeline_root(spec: str, revision: str | None, transformer_weights: bool, what: str | None = None,
                   instead: str = "pass a local diffusers folder", typed: bool = True,
                   from_files: tuple[str, ...] = ()) -> tuple[Path, str | None]:
    """(local pipeline folder, snapshot commit) for a repo id or folder (`what`, `instead`: see `_snapshot`)."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise KreaLiteError(f"{path} is a file, not a folder; pass a diffusers folder, a .safetensors "
                                "single file or a repo id")
        if revision is not None:
            raise KreaLiteError(f"--revision {revision} selects a version of a Hugging Face repo, but {spec} is a "
                                "local folder, used as it is; drop --revision")
        root, commit = path.resolve(), None
    elif _REPO_ID.match(spec):
        root = _snapshot(spec, revision, transformer_weights, what, instead, typed, from_files)
        commit = root.name if re.fullmatch(r"[0-9a-f]{40}", root.name) else revision
    else:
        raise KreaLiteError(f"{spec} does not exist; pass a diffusers folder, a .safetensors single file or a "
                            "Hugging Face repo id (owner/name)")
    _check_pipeline_folder(root, transformer_weights, from_files)
    return root, commit


def resolve_source(spec: str, base: str | None = None, revision: str | None = None,
                   files: dict[str, str] | None = None) -> Source:
    """Find a FLUX.1 pipeline and check it is complete, without reading any weights.

    Args:
        spec: a Hugging Face repo id ("owner/name"), a local diffusers pipeline folder, or a single-file
            transformer (BFL `flux1-krea-dev.safetensors`, ComfyUI fp8_scaled, Forge NF4; told apart by
            the file's header).
        base: for a single file: the repo id or folder the other components (and the transformer's
            config.json) come from; default `DEFAULT_REPO`. Refused for other sources.
        revision: hub branch, tag or commit for a repo id (of `spec`, or of `base` for a single file);
            refused for a local folder.
        files: single files for other components, {"text_encoder_2" | "text_encoder" | "vae": path}
            (ComfyUI's t5xxl_*, clip_l, ae); their configs still come from the pipeline folder.

    Returns:
        A `Source`. Raises KreaLiteError with one line naming the problem.
    """
    spec = str(spec)
    files = {c: str(p) for c, p in (files or {}).items() if p is not None}
    if unknown := sorted(set(files) - {"text_encoder_2", "text_encoder", "vae"}):
        raise KreaLiteError(f"a single file for {unknown[0]!r}: only text_encoder_2 (--t5), text_encoder (--clip) "
                            "and vae (--vae) are read from single files")
    extra = tuple((c, open_file(Path(p), c)) for c, p in files.items())  # each fails now on a wrong file
    from_files = tuple(files)
    path = Path(spec).expanduser()
    if path.is_file() or (not path.exists() and spec.endswith((".safetensors", ".gguf"))):
        reader = open_file(path, "transformer")  # fails now on a damaged or non-FLUX file
        readers = (("transformer", reader), *extra)
        if base is None:  # the user typed no --base: say where the default came from
            what = (f"{path.name} holds only the transformer; the VAE, text encoders and tokenizers come from "
                    f"--base, by default {DEFAULT_REPO}, which")
            root, commit = _pipeline_root(DEFAULT_REPO, revision, transformer_weights=False, what=what,
                                          instead="pass --base with a local diffusers folder of FLUX.1", typed=False,
                                          from_files=from_files)
            return Source(id=spec, root=root, revision=commit, readers=readers)
        base = str(base)
        if Path(base).expanduser().is_file():
            raise KreaLiteError(f"--base {base} is a single file; pass a repo id or diffusers folder for the "
                                "VAE, text encoders and tokenizers")
        at = f" at revision {revision!r}" if revision else ""
        root, commit = _pipeline_root(base, revision, transformer_weights=False,
                                      what=f"--base {base} is not a folder here (no such path), and as a "
                                           f"Hugging Face repo id{at} it", from_files=from_files)
        return Source(id=spec, root=root, revision=commit, readers=readers)
    if base is not None:
        raise KreaLiteError(f"--base {base} is only used with a single-file source (.safetensors); {spec} is a "
                            "whole pipeline with its own components: drop --base")
    root, commit = _pipeline_root(spec, revision, transformer_weights=True, from_files=from_files)
    return Source(id=spec, root=root, revision=commit, readers=extra)
