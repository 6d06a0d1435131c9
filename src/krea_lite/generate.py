"""generate: prompts in, image files out (PNG, WebP or JPEG), with every setting in the file's metadata."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import string
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import KreaLiteError
from .pipeline import with_oom_fallback

# Ranges of the inputs, checked before anything loads (README "Generating" lists them).
MAX_STEPS = 1000  # the model card uses 28; the scheduler's tables grow with the steps
MIN_SIDE, MAX_SIDE = 16, 4096  # pixels per side, multiples of 16 (VAE x8, 2x2 patches); 4096^2 = 65536 tokens
MAX_IMAGES = 1000  # --num-images, per prompt
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2^64 - 1; image k of a prompt uses seed + k
MAX_PROMPTS = 10_000  # lines of a --prompts file
MAX_PROMPT_FILE_BYTES = 1 << 20  # 1 MiB: a prompt file larger than this is not a prompt file
# --format: Pillow format and how the settings are stored (PNG text chunks; EXIF UserComment as JSON).
FORMATS = {"png": "PNG", "webp": "WEBP", "jpg": "JPEG"}
LOSSY_QUALITY = 95  # WebP and JPEG
DEFAULT_NAME = "{i:03d}-{prompt}-seed{seed}"
NAME_FIELDS = {
    "n": "image number in this run, from 0",
    "i": "prompt number (line of --prompts, blank lines skipped), from 0",
    "k": "image number of this prompt, from 0",
    "prompt": "the prompt's first 40 characters, lower case, [a-z0-9-] only",
    "seed": "the image's seed",
    "steps": "denoising steps",
    "guidance": "guidance",
    "width": "width in pixels",
    "height": "height in pixels",
    "model": "the model folder's name, [a-z0-9-] only",
    "scheme": "the transformer's scheme (nf4, int8, ...)",
}
_EXIF_IFD, _USER_COMMENT, _SOFTWARE = 0x8769, 0x9286, 0x0131
_ASCII = b"ASCII\0\0\0"  # EXIF UserComment character code; the JSON is ASCII (non-ASCII text is \\u-escaped)


def _version() -> str:
    from . import __version__

    return __version__


@dataclass(frozen=True)
class GenerateConfig:
    """Sampling settings; defaults are the FLUX.1 Krea [dev] model card's (28 steps, guidance 4.5)."""

    steps: int = 28
    guidance: float = 4.5
    width: int = 1024
    height: int = 1024
    seed: int = 0
    num_images: int = 1
    max_sequence_length: int = 512  # T5 tokens; FLUX.1 [dev] was trained with 512

    def __post_init__(self):
        if not _is_int(self.steps) or not 1 <= self.steps <= MAX_STEPS:
            raise KreaLiteError(f"--steps {self.steps} must be an integer from 1 to {MAX_STEPS} (the model card uses 28)")
        for name in ("width", "height"):
            v = getattr(self, name)
            if not _is_int(v) or not MIN_SIDE <= v <= MAX_SIDE or v % 16:
                raise KreaLiteError(f"--{name} {v} must be a multiple of 16 from {MIN_SIDE} to {MAX_SIDE} (e.g. 1024)")
        if not isinstance(self.guidance, (int, float)) or not math.isfinite(self.guidance):
            raise KreaLiteError(f"--guidance {self.guidance} must be a finite number (the model card uses 4.5)")
        if not _is_int(self.max_sequence_length) or not 0 < self.max_sequence_length <= 512:
            raise KreaLiteError(f"--max-sequence-length {self.max_sequence_length} must be between 1 and 512")
        if not _is_int(self.num_images) or not 1 <= self.num_images <= MAX_IMAGES:
            raise KreaLiteError(f"--num-images {self.num_images} must be an integer from 1 to {MAX_IMAGES}")
        last = MAX_SEED - self.num_images + 1
        if not _is_int(self.seed) or not 0 <= self.seed <= last:
            raise KreaLiteError(f"--seed {self.seed} must be an integer from 0 to {last} (image k of a prompt uses "
                                "seed+k, at most 2^64-1), or random")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class OutputConfig:
    """How the images are written.

    Args:
        name: file name template without the extension; fields in `NAME_FIELDS`, Python format
            syntax (`{n:03d}`). No "/" : the folder is `out_dir`.
        format: "png", "webp" or "jpg" (see `FORMATS`); every format carries the same settings.
        overwrite: replace an existing file of the same name. Without it an existing file is never
            touched: the new image gets the next free name (`name-2.png`, `name-3.png`, ...).
    """

    name: str = DEFAULT_NAME
    format: str = "png"
    overwrite: bool = False

    def __post_init__(self):
        if self.format not in FORMATS:
            raise KreaLiteError(f"--format {self.format!r}: choose one of {', '.join(FORMATS)}")
        if not isinstance(self.name, str) or not self.name:
            raise KreaLiteError("--name is empty; give a template such as '{n:03d}-{prompt}-{seed}'")
        fields = ", ".join("{" + f + "}" for f in NAME_FIELDS)
        try:
            parsed = list(string.Formatter().parse(self.name))
        except ValueError as e:
            raise KreaLiteError(f"--name {self.name!r} is not a valid template ({e}); fields: {fields}") from None
        for _, field, _, _ in parsed:
            if field is not None and field not in NAME_FIELDS:
                raise KreaLiteError(f"--name {self.name!r} uses {{{field}}}, which is not a field; use {fields}")
        longest = self.file_name({"n": MAX_PROMPTS * MAX_IMAGES, "i": MAX_PROMPTS, "k": MAX_IMAGES,
                                  "prompt": "p" * 40, "seed": MAX_SEED, "steps": MAX_STEPS, "guidance": 4.5,
                                  "width": MAX_SIDE, "height": MAX_SIDE, "model": "m" * 40, "scheme": "qfloat8"})
        if "/" in longest or "\\" in longest or "\0" in longest or longest.startswith("."):
            raise KreaLiteError(f"--name {self.name!r}: a file name may not contain / or \\ nor start with '.' "
                                "(the folder is --out)")
        if len(longest.encode()) > 200:
            raise KreaLiteError(f"--name {self.name!r} gives names of up to {len(longest.encode())} bytes; "
                                "keep them under 200")

    def file_name(self, fields: dict) -> str:
        """The file name (with extension) for one image's `fields`."""
        try:
            stem = self.name.format_map(fields)
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise KreaLiteError(f"--name {self.name!r} cannot be filled in ({e}); e.g. {{n:03d}} needs a number, "
                                "{prompt} text") from None
        return f"{stem}.{self.format}"


@dataclass(frozen=True)
class Generated:
    path: Path
    prompt: str
    seed: int
    seconds: float
    seconds_per_step: float  # steady state: the steps after the first (which includes warm-up); 1 step: that step
    peak_vram_gib: float | None


def out_folder(path: str | Path, check_writable: bool = False) -> Path:
    """`path` as the folder for the images; one line if a file is in the way or (`check_writable`) the
    folder cannot be written. The check creates and removes a probe, so nothing is left behind."""
    import tempfile

    path = Path(path).expanduser()
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise KreaLiteError(f"--out {path}: {p} is a file, not a folder; give a folder for the images")
    if check_writable:
        existing = next(p for p in (path, *path.parents) if p.exists())
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".krea-lite-probe-", dir=existing))
        except OSError as e:
            raise KreaLiteError(f"--out {path}: {existing} cannot be written ({e.strerror}); "
                                "choose a folder you can write to") from None
    return path


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file (at most `MAX_PROMPT_FILE_BYTES`, `MAX_PROMPTS` lines)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PROMPT_FILE_BYTES + 1)  # bounded: /dev/zero or a wrong file is not read to the end
    except FileNotFoundError:
        raise KreaLiteError(f"prompt file {path} does not exist") from None
    except OSError as e:
        raise KreaLiteError(f"prompt file {path} cannot be read: {e.strerror}") from None
    if len(data) > MAX_PROMPT_FILE_BYTES:
        raise KreaLiteError(f"prompt file {path} is larger than {MAX_PROMPT_FILE_BYTES >> 20} MiB; give a text file "
                            "with one prompt per line")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KreaLiteError(f"prompt file {path} is not UTF-8 text; save it as UTF-8 with one prompt per line") from None
    if "\0" in text:
        raise KreaLiteError(f"prompt file {path} holds NUL bytes: not a text file; give one prompt per line")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise KreaLiteError(f"prompt file {path} holds no prompt; write one prompt per line")
    if len(prompts) > MAX_PROMPTS:
        raise KreaLiteError(f"prompt file {path} holds {len(prompts)} prompts; at most {MAX_PROMPTS} per run")
    return prompts


@contextmanager
def _stop_between_steps():
    """While generating in the main thread: the first Ctrl-C lets the current denoising step finish and
    then stops (KeyboardInterrupt, no image is written half-done); a second Ctrl-C stops at once.
    A SIGINT handler other than Python's default is left alone."""
    import signal
    import threading

    asked = {"stop": False}
    previous = signal.getsignal(signal.SIGINT)  # Python's default, or the CLI's (which only notes the Ctrl-C)
    if (threading.current_thread() is not threading.main_thread()
            or (previous is not signal.default_int_handler and not getattr(previous, "krea_lite", False))):
        yield asked
        return

    def on_sigint(signum, frame):
        if asked["stop"]:
            raise KeyboardInterrupt
        asked["stop"] = True
        print("krea-lite: stopping after this step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield asked
    finally:
        signal.signal(signal.SIGINT, previous)


def _one_image(pipe, prompt: str, seed: int, config: GenerateConfig, embeds, device, asked: dict):
    """One pipeline call; returns (image, seconds per step, (prompt_embeds, pooled_prompt_embeds))."""
    import torch

    if embeds is None:
        prompt_embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None,
                                                      max_sequence_length=config.max_sequence_length)
        embeds = (prompt_embeds, pooled)
    if asked["stop"]:
        raise KeyboardInterrupt
    stamps = []

    def on_step(_pipe, _step, _t, kwargs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())
        if asked["stop"]:
            raise KeyboardInterrupt  # between steps: the step that was running has finished
        return kwargs

    start = time.perf_counter()
    image = pipe(
        prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[1], num_inference_steps=config.steps,
        guidance_scale=config.guidance, width=config.width, height=config.height,
        generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=on_step,
    ).images[0]
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else time.perf_counter() - start
    return image, per_step, embeds


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "image"


def _encode(image, fmt: str, settings: dict[str, str]) -> bytes:
    """The image file's bytes with `settings` as metadata: PNG text chunks, or for WebP/JPEG a JSON
    object in EXIF UserComment (what `read_metadata` reads back)."""
    import io

    buf = io.BytesIO()
    if fmt == "png":
        from PIL.PngImagePlugin import PngInfo

        meta = PngInfo()
        for key, value in settings.items():
            meta.add_text(key, value)
        image.save(buf, format="PNG", pnginfo=meta)
    else:
        from PIL import Image

        exif = Image.Exif()
        exif[_SOFTWARE] = f"krea-lite {settings.get('krea_lite_version', '')}".strip()
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _ASCII + json.dumps(settings, ensure_ascii=True).encode("ascii")
        image.save(buf, format=FORMATS[fmt], exif=exif.tobytes(), quality=LOSSY_QUALITY)
    return buf.getvalue()


def read_metadata(path: str | Path) -> dict[str, str]:
    """The settings `generate` stored in an image it wrote (PNG, WebP or JPEG), as strings.

    Args:
        path: an image file written by `generate`.
    """
    from PIL import Image

    with Image.open(path) as image:
        if image.format == "PNG":
            return dict(image.text)
        comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if not isinstance(comment, bytes) or not comment.startswith(_ASCII):
        raise KreaLiteError(f"{path} carries no krea-lite settings (no EXIF UserComment)")
    try:
        return json.loads(comment[len(_ASCII):].decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KreaLiteError(f"{path} has an EXIF UserComment that krea-lite did not write") from None


def _write_new(folder: Path, name: str, data: bytes, replace: bool) -> Path:
    """Write `data` as `folder/name`, whole or not at all. An existing file is replaced only if `replace`;
    otherwise the next free name is taken (`stem-2.ext`, ...), atomically (hard link of a temporary file)."""
    stem, ext = name.rsplit(".", 1)
    tmp = folder / f".{stem[:60]}.krea-tmp-{os.getpid()}.{ext}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        if replace:
            os.replace(tmp, folder / name)
            return folder / name
        for j in range(1, 100_000):
            path = folder / (name if j == 1 else f"{stem}-{j}.{ext}")
            try:
                os.link(tmp, path)  # fails if `path` exists, even when another run creates it meanwhile
            except FileExistsError:
                continue
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                    raise
                if path.exists():  # a file system without hard links: check, then rename (not race-free)
                    continue
                os.replace(tmp, path)
            return path
        raise KreaLiteError(f"{folder} already holds 100000 images named like {name}; choose another --out or --name")
    finally:
        tmp.unlink(missing_ok=True)


def generate(pipe, prompts: list[str], config: GenerateConfig, out_dir: str | Path,
             output: OutputConfig | None = None,
             on_image: Callable[[Generated], None] | None = None) -> list[Generated]:
    """Generate `config.num_images` images per prompt into `out_dir`.

    Args:
        pipe: a FluxPipeline from `load_pipeline`.
        prompts: the prompts; each must be non-empty.
        config: sampling settings. Image k of every prompt uses seed `config.seed + k`, drawn on the
            CPU, so the same seed gives the same image on any machine with the same kernels.
        out_dir: the folder for the images (created if needed).
        output: file names, format, overwriting (`OutputConfig`); default PNG named
            `DEFAULT_NAME`, never replacing an existing file.
        on_image: called with each `Generated` as soon as its file is written.

    Returns:
        One `Generated` record per image. A first Ctrl-C (in the main thread) stops after the current
        denoising step, a second at once; the images already written stay.
    """
    import torch

    output = output or OutputConfig()
    from .lora import lora_metadata

    for p in prompts:
        if not p or not p.strip():
            raise KreaLiteError("the prompt is empty; give a text prompt such as \"a red fox in snow\"")
    out_dir = out_folder(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KreaLiteError(f"cannot create the output folder {out_dir} ({e.strerror}); choose another --out") from None
    info = getattr(pipe, "krea_lite", None)
    common = {}
    schemes = {}
    if info is not None:
        schemes = {c: v["scheme"] for c, v in info.manifest["components"].items() if c in ("transformer", "text_encoder_2")}
        common["model"] = str(Path(info.path).resolve())
        common["model_manifest_sha256"] = hashlib.sha256((info.path / "krea_lite.json").read_bytes()).hexdigest()
    common.update({"software": "krea-lite", "krea_lite_version": _version()})
    device = torch.device(getattr(info, "device", "cpu"))
    cuda = device.type == "cuda"
    results, written = [], set()
    model_slug = _slug(Path(info.path).name) if info is not None else "model"
    with _stop_between_steps() as asked:
        for i, prompt in enumerate(prompts):
            embeds = None  # the prompt is encoded once, for all of its images
            for k in range(config.num_images):
                if asked["stop"]:
                    raise KeyboardInterrupt
                seed = config.seed + k
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                image, per_step, embeds = with_oom_fallback(
                    pipe, lambda p=prompt, s=seed, e=embeds: _one_image(pipe, p, s, config, e, device, asked))
                seconds = time.perf_counter() - start
                settings = {"prompt": prompt, "seed": seed, **{k2: v for k2, v in asdict(config).items()
                                                                if k2 not in ("seed", "num_images")}}
                settings.update({f"scheme_{c}": s for c, s in schemes.items()})
                settings.update(common)
                settings.update(lora_metadata(pipe))  # LoRA (#12): each active LoRA's file, sha256 and scale
                name = output.file_name({
                    "n": len(results), "i": i, "k": k, "prompt": _slug(prompt), "seed": seed, "steps": config.steps,
                    "guidance": config.guidance, "width": config.width, "height": config.height,
                    "model": model_slug, "scheme": schemes.get("transformer", "none")})
                data = _encode(image, output.format, {key: str(v) for key, v in settings.items()})
                # --overwrite replaces files of earlier runs, never an image this run wrote
                replace = output.overwrite and (out_dir / name) not in written
                try:
                    path = _write_new(out_dir, name, data, replace)
                except OSError as e:
                    done = f"{len(results)} image{'s' if len(results) != 1 else ''} written before it"
                    if e.errno == errno.ENOSPC:
                        raise KreaLiteError(f"disk full while writing {out_dir / name} ({done}; nothing partial "
                                            "was kept): free some space or choose another --out") from None
                    raise KreaLiteError(f"cannot write {out_dir / name} ({e.strerror}; {done}); "
                                        "choose a folder you can write to") from None
                written.add(path)
                peak = torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None
                result = Generated(path, prompt, seed, seconds, per_step, peak)
                results.append(result)
                if on_image is not None:
                    on_image(result)
    return results
