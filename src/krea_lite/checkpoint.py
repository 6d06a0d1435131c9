"""The self-describing output folder: sharded safetensors, the manifest, atomic publishing, verify.

A krea-lite folder is a plain diffusers pipeline folder plus `krea_lite.json`, the manifest: format
version, the scheme of every component and which modules stayed unquantized (and why), the source,
library versions, and the size and sha256 of every file. The manifest is written last; the folder
is renamed into place only after it, so an interrupted conversion never leaves a folder that loads.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import torch

from .errors import KreaLiteError

MANIFEST = "krea_lite.json"
FORMAT = "krea-lite"
FORMAT_VERSION = 1
SHARD_BYTES = 2 << 30  # 2 GiB: bounds the host RAM a conversion holds before writing a shard
_PENDING = MANIFEST + ".pending"  # the manifest's name between the folder's rename and its own
_TMP_TAG = ".krea-tmp-"
_LOCK_TAG = ".krea-lite-lock"  # `.<out name>.krea-lite-lock` beside an output folder while a run writes it
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


def _umask() -> int:
    """The process umask, read without changing it where the kernel tells it (Linux >= 4.7)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # elsewhere: set and restore (no other thread of ours creates files meanwhile)
    os.umask(old)
    return old


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, with the permissions of a normal file write and a full disk as an OSError.

    Args:
        tensors: name -> tensor, as for `safetensors.torch.save_file`.
        path: the file to write.
        metadata: the header's `__metadata__`.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as e:  # an I/O error comes back as "... (os error 28)": make it the OSError it is
        if m := re.search(r"\(os error (\d+)\)", str(e)):
            code = int(m.group(1))
            raise OSError(code, os.strerror(code), str(path)) from e
        raise
    # save_file writes a 0600 temporary file and renames it: give the file what open() would (0666 & ~umask)
    os.chmod(path, 0o666 & ~_umask())


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
        save_safetensors(self.pending, self.folder / f".shard-{len(self.shards)}", metadata={"format": "pt"})
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


def read_tensors(folder: Path, files: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the listed safetensors files of a component folder, one file at a time, on the CPU.

    Args:
        folder: a component folder (`transformer/`, `text_encoder_2/`, ...) of a krea-lite folder.
        files: the manifest's file list (`manifest["files"]`: paths relative to the krea-lite folder,
            the parent of `folder`). Only this component's `.safetensors` among them are read, so a
            file that is in the folder but not in the manifest is never loaded.
    """
    from safetensors import safe_open

    paths = [folder.parent / rel for rel in sorted(files)
             if PurePosixPath(rel).parent.as_posix() == folder.name and rel.endswith(".safetensors")]
    if not paths:
        raise KreaLiteError(f"{folder.parent / MANIFEST} lists no .safetensors file in {folder.name}/; "
                            "run `krea-lite verify` on the folder")
    for path in paths:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    # safetensors may hand out views at any byte offset; some CPU kernels (quanto's
                    # int8 matmul, torch._weight_int8pack_mm) segfault on unaligned data.
                    yield name, tensor if tensor.data_ptr() % 64 == 0 else tensor.clone()
        except Exception as e:  # SafetensorError, OSError: a damaged file
            raise KreaLiteError(f"{path} cannot be read ({e}); run `krea-lite verify` on the folder") from e


def check_safetensors_header(path: Path) -> set[str]:
    """Cheap structural check: the header parses and the data section matches the file size.

    Returns the names of the tensors the header describes."""
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
    return {k for k in header if k != "__metadata__"}


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


# ---------------------------------------------------------------------------------------------------
# Where a command writes: the parent must be a writable folder, one run at a time, OS errors as one line.


def check_out_parent(out: Path, option: str = "--out") -> None:
    """One line if `out` cannot be created: it lies under a file, or its nearest existing folder is
    read-only or not writable by this user. Creates nothing (runs before any download)."""
    out = Path(out).expanduser().absolute()
    for above in out.parents:
        if os.path.lexists(above):
            if not above.is_dir():
                raise KreaLiteError(f"{option} {out} lies under {above}, which is a file, not a folder; "
                                    f"choose another {option}")
            if not os.access(above, os.W_OK | os.X_OK):  # also False on a read-only mount, even for root
                raise KreaLiteError(f"cannot write in {above} (read-only or no permission); choose another {option}")
            return


@contextmanager
def out_lock(out: Path, option: str = "--out"):
    """Hold `.<name>.krea-lite-lock` beside `out` while writing it: a second run to the same `out` fails
    in one line instead of replacing the first run's work (and its temporary folder).

    The lock is a `flock`, which the kernel releases when its process dies, so the file a killed run
    leaves behind blocks nobody; it is removed on exit. Parent folders created here are removed again
    if `out` was not written.
    """
    import fcntl

    out = Path(out).expanduser().absolute()
    check_out_parent(out, option)
    created = [p for p in (out.parent, *out.parent.parents) if not os.path.lexists(p)]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KreaLiteError(f"cannot create {e.filename or out.parent} ({e.strerror}); choose another {option}") from None
    lock = out.parent / f".{out.name}{_LOCK_TAG}"
    try:
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise KreaLiteError(f"cannot write in {out.parent} ({e.strerror}); choose another {option}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise KreaLiteError(f"another krea-lite run (pid {holder}) is writing {out} right now; wait for it "
                                    f"to finish or choose another {option}") from None
            try:  # the previous holder may have removed the file after we opened it: lock the one on disk
                if os.path.samestat(os.fstat(fd), os.stat(lock)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            try:
                os.unlink(lock)  # while still holding it: a waiting run then locks a fresh file
            except FileNotFoundError:
                pass
            os.close(fd)
    finally:
        if not out.exists():
            for p in created:  # deepest first; only folders this call created, and only while empty
                try:
                    p.rmdir()
                except OSError:
                    break


def os_error(e: OSError, out: Path, option: str = "--out") -> KreaLiteError | None:
    """The one line for an OSError met while writing `out` (disk full, read-only, no permission); None
    for other errors. Whatever was half-written has been removed by then."""
    out = Path(out).expanduser().absolute()
    where = Path(e.filename).absolute() if e.filename else None
    ours = where is None or where == out.parent or out.parent in where.parents
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return KreaLiteError(f"disk full while writing {out}: nothing was kept; free space and run again")
    if e.errno == errno.EROFS and ours:
        return KreaLiteError(f"{out.parent} is on a read-only file system; nothing was written: choose another {option}")
    if e.errno in (errno.EACCES, errno.EPERM):
        if ours:
            return KreaLiteError(f"permission denied writing {where or out}; nothing was kept: choose another {option}")
        return KreaLiteError(f"permission denied reading {where}; make it readable for this user")
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------
# Reading and verifying a folder.


class CheckpointProblems(KreaLiteError):
    """`verify_checkpoint` found problems: `problems` holds every one, a line each; the message is the
    first (and how many more there are)."""

    def __init__(self, folder: Path, problems: list[str]):
        self.folder, self.problems = folder, problems
        more = (f" (and {len(problems) - 1} more: `krea-lite verify {folder}` lists them all)"
                if len(problems) > 1 else "")
        super().__init__(problems[0] + more)


def _written_by(manifest: dict) -> str:
    """Who wrote the manifest, for messages: another krea-lite version, or this one (then it was edited)."""
    from importlib.metadata import PackageNotFoundError, version

    libraries = manifest.get("libraries")
    writer = libraries.get("krea-lite") if isinstance(libraries, dict) else None
    try:
        ours = version("krea-lite")
    except PackageNotFoundError:
        ours = None
    if not isinstance(writer, str):
        return "it names no krea-lite version"
    if writer == ours:
        return f"it was written by this krea-lite ({ours}) and edited or damaged since"
    return f"it was written by krea-lite {writer}"


def _link_outside(folder: Path, rel: str) -> Path | None:
    """The first symbolic link on the way from `folder` to `rel`, when the path leaves the folder through it."""
    root, p = folder.resolve(), folder
    for part in PurePosixPath(rel).parts:
        p = p / part
        if p.is_symlink():
            target = p.resolve()
            if target != root and root not in target.parents:
                return p
    return None


def _parse_manifest(folder: Path) -> tuple[dict, dict[str, str]]:
    """The manifest and the problem of each bad file entry (rel -> line); problems that leave nothing
    to check raise."""
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
    except OSError as e:
        raise KreaLiteError(f"{path} cannot be read ({e.strerror}); make it readable for this user") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise KreaLiteError(f"{path} is not a krea-lite manifest; re-create the folder with `krea-lite quantize`")
    version = manifest.get("format_version")
    if type(version) is int and version > FORMAT_VERSION:
        from . import __version__

        raise KreaLiteError(
            f"{path} has format_version {version} ({_written_by(manifest)}); this krea-lite ({__version__}) reads "
            f"up to {FORMAT_VERSION}: update krea-lite from where you installed it, or re-create the folder with "
            "this one (`krea-lite quantize`)"
        )
    if type(version) is not int or version < 1:
        raise KreaLiteError(f"{path} has an unknown format_version {version!r} (this krea-lite reads "
                            f"{FORMAT_VERSION} and older); re-create the folder with `krea-lite quantize`")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise KreaLiteError(f"{path} lists no files; re-create the folder with `krea-lite quantize`")
    if not isinstance(manifest.get("components", {}), dict):
        raise KreaLiteError(f"{path} has a malformed 'components' entry; re-create the folder with `krea-lite quantize`")
    bad = {}
    root = folder.resolve()
    for rel, info in files.items():
        pure = PurePosixPath(rel)
        if pure.is_absolute() or Path(rel).is_absolute() or ".." in pure.parts or not pure.parts:
            bad[rel] = f"{path} names {rel!r}, a path outside the folder; refusing to use it"
        elif link := _link_outside(folder, rel):
            bad[rel] = (f"{link} is a symbolic link to {link.resolve()}, outside {root}; krea-lite reads only "
                        "files inside the folder: replace the link with a copy of the file (cp -L)")
        elif not (isinstance(info, dict) and type(info.get("size")) is int and isinstance(info.get("sha256"), str)):
            bad[rel] = f"{path} has no valid size and sha256 for {rel!r}; re-create the folder"
    return manifest, bad


def read_manifest(folder: Path) -> dict:
    """Parse and sanity-check the manifest of a krea-lite folder (no file is read but the manifest).

    Args:
        folder: the folder written by `quantize_pipeline`.

    Raises:
        KreaLiteError (a `CheckpointProblems` listing every bad file entry).
    """
    manifest, bad = _parse_manifest(folder)
    if bad:
        raise CheckpointProblems(Path(folder).expanduser(), list(bad.values()))
    return manifest


# What loading needs of each component: the files it reads beside the weights.
_MODELS = ("transformer", "text_encoder_2", "text_encoder", "vae")  # config.json + safetensors
_QUANTIZED = ("transformer", "text_encoder_2")  # rebuilt by krea-lite from the manifest's scheme
_CONFIG = {**{c: "config.json" for c in _MODELS}, "scheduler": "scheduler_config.json"}
_NEEDED = ("transformer", "text_encoder_2", "text_encoder", "vae", "tokenizer", "tokenizer_2", "scheduler")
_FROM_PRETRAINED = tuple(c for c in _NEEDED if c not in _QUANTIZED)  # diffusers/transformers pick their files


def _component_problems(folder: Path, manifest: dict) -> list[str]:
    """The manifest describes every component that model_index.json names and loading needs, with a
    scheme this krea-lite knows."""
    from .schemes import SCHEMES

    where = folder / MANIFEST
    index_path = folder / "model_index.json"
    try:
        index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"{index_path} cannot be read ({e}); re-create the folder"]
    named = [c for c, v in index.items() if isinstance(v, list) and v[:1] != [None]] if isinstance(index, dict) else []
    components = manifest.get("components", {})
    problems = []
    for comp in dict.fromkeys([*named, *_NEEDED]):
        if comp not in components:
            why = "that model_index.json names" if comp in named else "that loading needs"
            problems.append(f"{where} does not describe component {comp!r} {why}; "
                            "re-create the folder with `krea-lite quantize`")
    for comp, info in components.items():
        if not isinstance(info, dict):
            problems.append(f"{where} has a malformed entry for component {comp!r}; re-create the folder")
            continue
        scheme = info.get("scheme")
        if comp not in _QUANTIZED:
            continue
        if scheme not in SCHEMES:
            problems.append(f"{where} gives {comp} the scheme {scheme!r}, which this krea-lite does not know "
                            f"({', '.join(SCHEMES)}; {_written_by(manifest)}): re-create the folder with "
                            "`krea-lite quantize`")
            continue
        modules = info.get("quantized_modules") or []
        if not (isinstance(modules, list) and all(isinstance(m, str) for m in modules)):
            problems.append(f"{where} has a malformed quantized_modules list for {comp}; re-create the folder")
        elif info.get("backend") not in (None, SCHEMES[scheme].backend) or (modules and info.get("backend") is None):
            problems.append(f"{where} gives {comp} the backend {info.get('backend')!r}, which does not match its "
                            f"scheme {scheme!r}; re-create the folder with `krea-lite quantize`")
    return problems


def _config_problems(folder: Path, manifest: dict, bad: set[str]) -> list[str]:
    """Every config file loading reads is listed, present and a JSON object, and agrees with the scheme;
    no unlisted file lies where diffusers/transformers may pick it up."""
    problems = []
    components, listed = manifest.get("components", {}), manifest["files"]
    for comp in _FROM_PRETRAINED:
        if comp in components and (folder / comp).is_dir():
            for p in sorted((folder / comp).iterdir()):
                if p.is_file() and f"{comp}/{p.name}" not in listed and not p.name.startswith("."):
                    problems.append(f"{p} is not listed in {MANIFEST}, and loading {comp} may read it; remove it "
                                    "or re-create the folder")
    for comp, name in _CONFIG.items():
        path, rel = folder / comp / name, f"{comp}/{name}"
        if comp not in components or not (folder / comp).is_dir() or rel in bad:
            continue  # reported already: a missing component, a bad manifest entry or a damaged file
        if rel not in listed:
            problems.append(f"{path} is not listed in {MANIFEST} but loading reads it; re-create the folder")
            continue
        if not path.is_file():
            continue  # reported as a missing file
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            problems.append(f"{path} cannot be read as JSON ({e}); re-create the folder")
            continue
        if not isinstance(config, dict):
            problems.append(f"{path} is not a JSON object; re-create the folder")
            continue
        info = components[comp]
        backend = info.get("backend") if isinstance(info, dict) else None
        if comp in _QUANTIZED and backend is not None:
            qc = config.get("quantization_config")
            if (backend == "bitsandbytes") != (isinstance(qc, dict) and qc.get("quant_method") == "bitsandbytes"):
                problems.append(f"{path} does not match the manifest's scheme {info.get('scheme')!r} for {comp} "
                                "(files from different conversions?); re-create the folder with `krea-lite quantize`")
    return problems


def _file_problems(folder: Path, manifest: dict, skip: set[str], full: bool) -> tuple[dict[str, str], dict[str, set]]:
    """Presence, size, header (and sha256) of every listed file (rel -> its problem); the tensor names
    of each sound .safetensors file (rel -> names)."""
    problems, names = {}, {}
    missing_dirs = {c for c in manifest.get("components", {}) if not (folder / c).is_dir()}
    for rel, info in manifest["files"].items():
        path = folder / rel
        if rel in skip or PurePosixPath(rel).parts[0] in missing_dirs:
            continue  # a bad entry, or inside a missing component folder: reported once already
        if not path.is_file():
            problems[rel] = f"{path} is missing (listed in {MANIFEST}); re-create the folder"
            continue
        size = path.stat().st_size
        if size != info["size"]:
            problems[rel] = f"{path} is {size} bytes, the manifest says {info['size']}: damaged; re-create the folder"
            continue
        try:
            if path.suffix == ".safetensors":
                names[rel] = check_safetensors_header(path)
            if full and sha256_file(path) != info["sha256"]:
                problems[rel] = f"{path} does not match its sha256 in {MANIFEST}: damaged; re-create it"
                names.pop(rel, None)
        except KreaLiteError as e:
            problems[rel] = str(e)
        except OSError as e:
            problems[rel] = f"{path} cannot be read ({e.strerror}); make it readable for this user"
    return problems, names


def _weight_problems(folder: Path, manifest: dict, names: dict[str, set]) -> list[str]:
    """Each model component lists weights, and the quantized ones hold every quantized module."""
    problems = []
    components, listed = manifest.get("components", {}), manifest["files"]
    for comp in _MODELS:
        if comp not in components or not (folder / comp).is_dir():
            continue
        files = [rel for rel in listed if PurePosixPath(rel).parent.as_posix() == comp and rel.endswith(".safetensors")]
        if not files:
            problems.append(f"{folder / MANIFEST} lists no .safetensors file in {comp}/; re-create the folder")
            continue
        info = components[comp]
        if comp not in _QUANTIZED or not all(rel in names for rel in files) or not isinstance(info, dict):
            continue  # an unreadable file was reported already
        stored = {n.rsplit(".", k)[0] for rel in files for n in names[rel] for k in range(1, n.count(".") + 1)}
        modules = info.get("quantized_modules") or []
        if isinstance(modules, list) and (lacking := sorted(m for m in modules if isinstance(m, str)
                                                            and m not in stored)):
            problems.append(f"{folder / comp} lacks the weights of {len(lacking)} quantized modules (first: "
                            f"{lacking[0]!r}) in the files {MANIFEST} lists; re-create the folder")
    return problems


def check_checkpoint(folder: str | Path, full: bool = True) -> tuple[dict, list[str]]:
    """Every problem of a krea-lite folder, without stopping at the first.

    Args:
        folder: the folder written by `quantize_pipeline`.
        full: also recompute every file's sha256 (slow: reads every byte).

    Returns:
        (manifest, problems): one line per problem, empty when the folder is fine. Raises
        KreaLiteError only when the manifest itself cannot be used (missing, not JSON, newer format).
    """
    folder = Path(folder).expanduser()
    manifest, bad = _parse_manifest(folder)
    problems = list(bad.values())
    for comp in manifest.get("components", {}):
        if not (folder / comp).is_dir():
            problems.append(f"{folder / comp} is missing: component {comp!r} is in the manifest; "
                            "copy the whole folder again or re-create it")
    problems += _component_problems(folder, manifest)
    found, names = _file_problems(folder, manifest, set(bad), full)
    problems += found.values()
    problems += _config_problems(folder, manifest, set(bad) | set(found))
    problems += _weight_problems(folder, manifest, names)
    return manifest, list(dict.fromkeys(problems))


def verify_checkpoint(folder: str | Path, full: bool = True) -> dict:
    """Check a krea-lite folder against its manifest and return the manifest.

    Checks what loading relies on: the manifest (format, file entries, a known scheme and a
    description for every component), every listed file (present, size, safetensors header, and
    with `full` its sha256), the config files loading reads, and that the listed weights hold every
    quantized module.

    Args:
        folder: the folder written by `quantize_pipeline`.
        full: also recompute every file's sha256 (slow: reads every byte). Without it, only
            presence, sizes, safetensors headers and config/scheme consistency are checked.

    Raises:
        CheckpointProblems (a KreaLiteError) with every problem found; its message is the first.
    """
    manifest, problems = check_checkpoint(folder, full=full)
    if problems:
        raise CheckpointProblems(Path(folder).expanduser(), problems)
    return manifest
