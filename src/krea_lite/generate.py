"""generate: prompts in, PNG files out, with every setting in the PNG's text metadata."""

from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import KreaLiteError


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
        if not isinstance(self.steps, int) or self.steps <= 0:
            raise KreaLiteError(f"--steps {self.steps} must be a positive integer")
        for name in ("width", "height"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0 or v % 16:
                raise KreaLiteError(f"--{name} {v} must be a positive multiple of 16 (e.g. 1024)")
        if not math.isfinite(self.guidance):
            raise KreaLiteError(f"--guidance {self.guidance} must be a finite number (the model card uses 4.5)")
        if not isinstance(self.max_sequence_length, int) or not 0 < self.max_sequence_length <= 512:
            raise KreaLiteError(f"--max-sequence-length {self.max_sequence_length} must be between 1 and 512")
        if not isinstance(self.num_images, int) or self.num_images <= 0:
            raise KreaLiteError(f"--num-images {self.num_images} must be a positive integer")


@dataclass(frozen=True)
class Generated:
    path: Path
    prompt: str
    seed: int
    seconds: float
    seconds_per_step: float  # steady state: the steps after the first (which includes warm-up)
    peak_vram_gib: float | None


def out_folder(path: str | Path) -> Path:
    """`path` as the folder for the PNGs; one line if something that is not a folder is in the way."""
    path = Path(path).expanduser()
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise KreaLiteError(f"--out {path}: {p} is a file, not a folder; give a folder for the images")
    return path


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KreaLiteError(f"prompt file {path} does not exist") from None
    except UnicodeDecodeError:
        raise KreaLiteError(f"prompt file {path} is not UTF-8 text; save it as UTF-8 with one prompt per line") from None
    except OSError as e:
        raise KreaLiteError(f"prompt file {path} cannot be read: {e.strerror}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise KreaLiteError(f"prompt file {path} holds no prompt; write one prompt per line")
    return prompts


def _one_image(pipe, prompt: str, seed: int, config: GenerateConfig, embeds, device: torch.device):
    """One pipeline call; returns (image, seconds per step, (prompt_embeds, pooled_prompt_embeds))."""
    if embeds is None:
        prompt_embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None,
                                                      max_sequence_length=config.max_sequence_length)
        embeds = (prompt_embeds, pooled)
    stamps = []

    def on_step(_pipe, _step, _t, kwargs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())
        return kwargs

    start = time.perf_counter()
    image = pipe(
        prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[1], num_inference_steps=config.steps,
        guidance_scale=config.guidance, width=config.width, height=config.height,
        generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=on_step,
    ).images[0]
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else time.perf_counter() - start
    return image, per_step, embeds


def _fall_back(pipe) -> None:
    """After a CUDA out-of-memory error: re-place the pipeline with a more conservative plan, once."""
    from .pipeline import place

    plan = pipe.krea_lite.plan
    if plan.conservative:
        raise KreaLiteError("out of GPU memory even with the conservative plan; pass a smaller --vram-gb "
                            "or generate smaller images")
    torch.cuda.empty_cache()
    smaller = plan.shrink()
    print(f"krea-lite: out of GPU memory; retrying once with a more conservative plan "
          f"(predicted peak {smaller.peak_bytes / 2**30:.2f} GiB instead of {plan.peak_bytes / 2**30:.2f})",
          flush=True)
    place(pipe, smaller)
    torch.cuda.empty_cache()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "image"


def generate(pipe, prompts: list[str], config: GenerateConfig, out_dir: str | Path) -> list[Generated]:
    """Generate `config.num_images` images per prompt into `out_dir` as PNGs.

    Args:
        pipe: a FluxPipeline from `load_pipeline`.
        prompts: the prompts; each must be non-empty.
        config: sampling settings. Image k of every prompt uses seed `config.seed + k`, drawn on the
            CPU, so the same seed gives the same image on any machine with the same kernels.
        out_dir: the folder for the PNGs (created if needed).

    Returns:
        One `Generated` record per image.
    """
    from PIL.PngImagePlugin import PngInfo

    from .lora import lora_metadata

    for p in prompts:
        if not p or not p.strip():
            raise KreaLiteError("the prompt is empty; give a text prompt such as \"a red fox in snow\"")
    out_dir = out_folder(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = getattr(pipe, "krea_lite", None)
    manifest_hash = None
    schemes = {}
    if info is not None:
        manifest_hash = hashlib.sha256((info.path / "krea_lite.json").read_bytes()).hexdigest()
        schemes = {c: v["scheme"] for c, v in info.manifest["components"].items() if c in ("transformer", "text_encoder_2")}
    device = torch.device(getattr(info, "device", "cpu"))
    cuda = device.type == "cuda"
    results = []
    for i, prompt in enumerate(prompts):
        embeds = None  # the prompt is encoded once, for all of its images
        for k in range(config.num_images):
            seed = config.seed + k
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            try:
                image, per_step, embeds = _one_image(pipe, prompt, seed, config, embeds, device)
            except torch.OutOfMemoryError:
                if info is None or info.plan is None:
                    raise
                retry = True  # outside the except block, so the failed pass's tensors can be freed
            else:
                retry = False
            if retry:
                _fall_back(pipe)
                image, per_step, embeds = _one_image(pipe, prompt, seed, config, None, device)
            seconds = time.perf_counter() - start
            meta = PngInfo()
            settings = {"prompt": prompt, "seed": seed, **{k2: v for k2, v in asdict(config).items()
                                                            if k2 not in ("seed", "num_images")}}
            settings.update({f"scheme_{c}": s for c, s in schemes.items()})
            if manifest_hash:
                settings["model_manifest_sha256"] = manifest_hash
            settings.update(lora_metadata(pipe))  # LoRA (#12): each active LoRA's file, sha256 and scale
            settings["software"] = "krea-lite"
            for key, value in settings.items():
                meta.add_text(key, str(value))
            path = out_dir / f"{i:03d}-{_slug(prompt)}-seed{seed}.png"
            image.save(path, pnginfo=meta)
            peak = torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None
            results.append(Generated(path, prompt, seed, seconds, per_step, peak))
    return results
