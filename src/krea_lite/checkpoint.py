"""The self-describing output folder: sharded safetensors, the manifest, atomic publishing, verify.

A krea-lite folder is a plain diffusers pipeline folder plus `krea_lite.json`, the manifest: format
version, the scheme of every component and which modules stayed unquantized (and why), the source,
library versions, and the size and sha256 of every file. The manifest is written last; the folder
is renamed into place only after it, so an interrupted conversion never leaves a folder that loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import KreaLiteError

MANIFEST = "krea_lite.json"
FORMAT = "krea-lite"
FORMAT_VERSION = 1
SHARD_BYTES = 2 << 30  # 2 GiB: bounds the host RAM a conversion holds before writing a shard
_PENDING = MANIFEST + ".pending"  # the manifest's name between the folder's rename and its own
_TMP_TAG = ".krea-tmp-"
KILL_AT_ENV = "KREA_LITE_TEST_KILL_AT"  # fault tests only: see _kill_point


def _kill_point(stage: str) -> None:
    """Fault-test hook: with KREA_LITE_TEST_KILL_AT=<stage> the process SIGKILLs itself here.

    Stages: "shard" (first shard written), "manifest" (manifest written, folder not yet renamed),
    "rename" (folder renamed, manifest not yet). tests/test_faults.py checks that none of them
    leaves a folder that verifies or loads.
    """
    if os.environ.get(KILL_AT_ENV) == stage:
        os.kill(os.getpid(), signal.SIGKILL)


def sha256_file(path: Path, chunk: int = 16 << 20, stop: threading.Event | None = None) -> str | None:
    """The file's sha256 (hex); None if `stop` was set before the end (a hash running beside other work)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if stop is not None and stop.is_set():
                return None
            h.update(block)  # releases the GIL: a hashing thread runs beside the conversion
    return h.hexdigest()


class ShardWriter:
    """Writes tensors to `<prefix>-0000i-of-0000n.safetensors` shards of at most SHARD_BYTES.

    Names and index follow diffusers/transformers: one shard is `<prefix>.safetensors` with no
    index; several get `<prefix>.safetensors.index.json` with a weight_map.
    """

    def __init__(self, folder: Path, prefix: str, shard_bytes: int = SHARD_BYTES):
        self.folder, self.prefix, self.shard_bytes = folder, prefix, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, self.folder / f".shard-{len(self.shards)}", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0
        _kill_point("shard")

    def close(self) -> list[Path]:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            final = [self.folder / f"{self.prefix}.safetensors"]
        else:
            final = [self.folder / f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, path in enumerate(final):
            os.replace(self.folder / f".shard-{i}", path)
        if n > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {name: path.name for path, names in zip(final, self.shards, strict=True) for name in names},
            }
            (self.folder / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return final


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of one component folder (sharded or not)."""
    return sorted(folder.glob("*.safetensors"))


def read_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a component folder, one file at a time, on the CPU."""
    from safetensors import safe_open

    for path in weight_files(folder):
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    # safetensors may hand out views at any byte offset; some CPU kernels (quanto's
                    # int8 matmul, torch._weight_int8pack_mm) segfault on unaligned data.
                    yield name, tensor if tensor.data_ptr() % 64 == 0 else tensor.clone()
        except Exception as e:  # SafetensorError, OSError: a damaged file
            raise KreaLiteError(f"{path} cannot be read ({e}); run `krea-lite verify` on the folder") from e


def check_safetensors_header(path: Path) -> None:
    """Cheap structural check: the header parses and the data section matches the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise KreaLiteError(f"{path} is truncated (no safetensors header); re-create or re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 << 20:
            raise KreaLiteError(f"{path} has a corrupted safetensors header; re-create or re-download it")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise KreaLiteError(f"{path} has a corrupted safetensors header; re-create or re-download it") from None
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):  # valid JSON, wrong structure
        raise KreaLiteError(f"{path} has a corrupted safetensors header; re-create or re-download it") from None
    if 8 + n + end != size:
        raise KreaLiteError(
            f"{path} is {size} bytes but its header describes {8 + n + end}: truncated or padded; re-create it"
        )


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("krea-lite", "torch", "diffusers", "transformers", "bitsandbytes", "optimum-quanto", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_manifest(folder: Path, manifest: dict) -> None:
    """Hash every file of `folder` into `manifest["files"]` and write it (as pending) last, flushed."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files}
    with open(folder / _PENDING, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())


def _is_leftover(out: Path) -> bool:
    return out.exists() and (out / _PENDING).exists() and not (out / MANIFEST).exists()


def refuse_overlap(out: Path, protect: tuple[Path, ...]) -> None:
    """One line if `out` is, contains or lies inside one of the `protect` paths (the user's source)."""
    out = out.resolve()
    for p in protect:
        p = p.resolve()
        if out == p or out in p.parents or p in out.parents:
            raise KreaLiteError(f"--out {out} overlaps the source {p}; choose a folder outside the source")


def refuse_existing(out: Path, force: bool) -> None:
    """One line if `out` exists and may not be replaced (leftovers of a killed run do not count).

    `force` replaces only what krea-lite wrote (a folder with a manifest) or an empty folder, never
    other files a mistyped --out points at."""
    if not out.exists() or _is_leftover(out):
        return
    if not force:
        raise KreaLiteError(f"{out.resolve()} already exists; pass --force to replace it or choose another --out")
    if not out.is_dir() or not ((out / MANIFEST).is_file() or not any(out.iterdir())):
        raise KreaLiteError(f"{out.resolve()} exists and is not a krea-lite folder (no {MANIFEST}); --force only "
                            "replaces those: choose another --out or remove it yourself")


@contextmanager
def atomic_folder(out: Path, force: bool, protect: tuple[Path, ...] = ()):
    """Yield a temporary sibling folder; on success it replaces `out` (publish), on failure it vanishes.

    Leftovers of killed runs (temporary siblings, a folder whose manifest is still pending) are
    removed first. `force` replaces an existing `out`, unless it is or contains a `protect` path.
    """
    out = out.resolve()
    refuse_overlap(out, protect)
    for stale in out.parent.glob(f".{out.name}{_TMP_TAG}*"):
        shutil.rmtree(stale, ignore_errors=True)
    if _is_leftover(out):
        shutil.rmtree(out)  # killed between the folder's rename and the manifest's: ours, unusable
    refuse_existing(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}{_TMP_TAG}{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
        if not (tmp / _PENDING).exists():
            raise RuntimeError("atomic_folder: the manifest was not written")
        _kill_point("manifest")
        old = out.parent / f".{out.name}{_TMP_TAG}old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        _kill_point("rename")
        os.replace(out / _PENDING, out / MANIFEST)
        _fsync_dir(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(folder: Path) -> dict:
    """Parse and sanity-check the manifest of a krea-lite folder."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise KreaLiteError(f"{folder} is not a folder; pass the folder written by `krea-lite quantize`")
    path = folder / MANIFEST
    if not path.exists():
        raise KreaLiteError(
            f"{folder} has no {MANIFEST}: not a krea-lite folder, or an interrupted conversion; "
            "run `krea-lite quantize` again"
        )
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KreaLiteError(f"{path} is not valid JSON ({e}); re-create the folder with `krea-lite quantize`") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise KreaLiteError(f"{path} is not a krea-lite manifest; re-create the folder with `krea-lite quantize`")
    version = manifest.get("format_version")
    if type(version) is int and version > FORMAT_VERSION:
        raise KreaLiteError(
            f"{path} has format_version {version}, newer than this krea-lite reads ({FORMAT_VERSION}); "
            "upgrade krea-lite (pip install -U krea-lite)"
        )
    if type(version) is not int or version < 1:
        raise KreaLiteError(f"{path} has an unknown format_version {version!r} (this krea-lite reads "
                            f"{FORMAT_VERSION} and older); re-create the folder with `krea-lite quantize`")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise KreaLiteError(f"{path} lists no files; re-create the folder with `krea-lite quantize`")
    if not isinstance(manifest.get("components", {}), dict):
        raise KreaLiteError(f"{path} has a malformed 'components' entry; re-create the folder with `krea-lite quantize`")
    root = folder.resolve()
    for rel, info in files.items():
        p = (folder / rel).resolve()
        if Path(rel).is_absolute() or root not in p.parents:
            raise KreaLiteError(f"{path} names {rel!r}, a path outside the folder; refusing to use it")
        if not (isinstance(info, dict) and type(info.get("size")) is int and isinstance(info.get("sha256"), str)):
            raise KreaLiteError(f"{path} has no valid size and sha256 for {rel!r}; re-create the folder")
    return manifest


def _check_components(folder: Path, manifest: dict) -> None:
    """Every component that model_index.json names must be described by the manifest."""
    index_path = folder / "model_index.json"
    try:
        index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KreaLiteError(f"{index_path} cannot be read ({e}); re-create the folder") from e
    for comp, value in index.items():
        if isinstance(value, list) and value[:1] != [None] and comp not in manifest.get("components", {}):
            raise KreaLiteError(f"{folder / MANIFEST} does not describe component {comp!r} that model_index.json "
                                "names; re-create the folder with `krea-lite quantize`")


def verify_checkpoint(folder: str | Path, full: bool = True) -> dict:
    """Check a krea-lite folder against its manifest and return the manifest.

    Args:
        folder: the folder written by `quantize_pipeline`.
        full: also recompute every file's sha256 (slow: reads every byte). Without it, only
            presence, sizes, safetensors headers and config/scheme consistency are checked.

    Raises:
        KreaLiteError naming the first problem found.
    """
    folder = Path(folder).expanduser()
    manifest = read_manifest(folder)
    components = manifest.get("components", {})
    for comp in components:
        if not (folder / comp).is_dir():
            raise KreaLiteError(f"{folder / comp} is missing: component {comp!r} is in the manifest; "
                                "copy the whole folder again or re-create it")
    for rel, info in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            raise KreaLiteError(f"{path} is missing (listed in {MANIFEST}); re-create the folder")
        if path.stat().st_size != info["size"]:
            raise KreaLiteError(
                f"{path} is {path.stat().st_size} bytes, the manifest says {info['size']}: damaged; re-create the folder"
            )
        if path.suffix == ".safetensors":
            check_safetensors_header(path)
    _check_components(folder, manifest)
    for comp, info in components.items():
        backend = info.get("backend")
        if backend is None:
            continue
        cfg_path = folder / comp / "config.json"
        try:
            qc = json.loads(cfg_path.read_text()).get("quantization_config")
        except (OSError, json.JSONDecodeError) as e:
            raise KreaLiteError(f"{cfg_path} cannot be read ({e}); re-create the folder") from e
        if (backend == "bitsandbytes") != (qc is not None and qc.get("quant_method") == "bitsandbytes"):
            raise KreaLiteError(f"{cfg_path} does not match the manifest's scheme {info.get('scheme')!r} for {comp} "
                                "(files from different conversions?); re-create the folder with `krea-lite quantize`")
    if full:
        for rel, info in manifest["files"].items():
            if sha256_file(folder / rel) != info["sha256"]:
                raise KreaLiteError(f"{folder / rel} does not match its sha256 in {MANIFEST}: damaged; re-create it")
    return manifest
