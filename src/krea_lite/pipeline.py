"""load_pipeline: reassemble a standard diffusers FluxPipeline from a krea-lite folder.

The quantized transformer and T5 are rebuilt on the meta device and filled with the stored
tensors through each scheme's own library (bitsandbytes' prequantized API, optimum-quanto's
deserialization), so no full-precision copy ever exists and the same path works on CPU and CUDA.
Placement on the GPU (what stays resident, what streams) is decided afterwards by `place`.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import read_manifest, read_tensors, verify_checkpoint
from .errors import KreaLiteError
from .quantize import build_meta
from .schemes import get_scheme


@dataclass(frozen=True)
class LoadInfo:
    """What `load_pipeline` attaches to the pipeline it returns, as `pipe.krea_lite`."""

    path: Path
    manifest: dict
    device: str
    plan: object | None = None  # plan.Plan (None on the CPU)
    placement: object | None = None  # placement.Placement: stats() of the streaming engine, close()
    seconds: dict | None = None  # where loading spent its time: verify, each component, place
    budget: object | None = None  # plan.Budget the process is held to (None: what the card has free)

    def close(self) -> None:
        """Undo the placement now: every component back on the CPU, pinned host memory unpinned."""
        if self.placement is not None:
            self.placement.close()


def load_component(folder: Path, component: str, info: dict) -> nn.Module:
    """Rebuild one quantized component from its folder on the CPU, without a full-precision copy."""
    import json

    config = json.loads((folder / "config.json").read_text())
    model = build_meta(component, config)
    scheme = get_scheme(info["scheme"])
    modules = set(info.get("quantized_modules") or [])
    for name in modules:
        model.set_submodule(name, scheme.make_module(model.get_submodule(name)))
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    for key, tensor in read_tensors(folder, read_manifest(folder.parent)["files"]):
        module = next((m for m in _prefixes(key) if m in modules), None)
        if module is None:
            plain[key] = tensor
        else:
            grouped.setdefault(module, {})[key[len(module) + 1:]] = tensor
    if missing := modules - grouped.keys():
        raise KreaLiteError(f"{folder} lacks the weights of {len(missing)} quantized modules "
                            f"(first: {sorted(missing)[0]!r}); run `krea-lite verify` on the folder")
    for name, stored in grouped.items():
        scheme.load(model.get_submodule(name), stored)
    result = model.load_state_dict(plain, strict=False, assign=True)
    if result.unexpected_keys:
        raise KreaLiteError(f"{folder} has unexpected tensor {result.unexpected_keys[0]!r}; "
                            "it was not written for this architecture")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    from .compat import mark_quantized

    mark_quantized(model, component, info["scheme"], config.get("quantization_config"))
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise KreaLiteError(f"{folder} lacks tensor {still_meta[0]!r}; run `krea-lite verify` on the folder")
    return model.eval().requires_grad_(False)


def _prefixes(key: str):
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        yield ".".join(parts[:i])


def _resolve_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KreaLiteError(f"device {device!r} was asked for but torch sees no CUDA GPU; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise KreaLiteError(f"device {device!r} is not 'cpu' or 'cuda'; use --device cpu, cuda or cuda:N")
    return device


def load_pipeline(path: str | Path, device: str | None = None, vram_gb: float | None = None,
                  width: int = 1024, height: int = 1024, batch: int = 1, verify: str = "quick",
                  compile: bool = False, loras=()):
    """Load a krea-lite folder as a `diffusers.FluxPipeline` placed for a VRAM budget.

    Args:
        path: a folder written by `quantize_pipeline`.
        device: "cuda", "cuda:N" or "cpu"; default CUDA when available.
        vram_gb: the card's memory in GiB: the plan is made for `plan.Budget(vram_gb)` (the card less
            its CUDA context) and this process's allocator on `device` is held to it, exactly as
            `krea-lite generate --vram-gb` does; default: plan for what the card has free, hold nothing.
        width, height, batch: the largest images you will generate (activations are planned for them).
        verify: "quick" (files present, sizes, headers), "full" (also every sha256) or "none".
        compile: regional torch.compile of the transformer's repeated blocks, streamed ones included
            (`compile.compile_transformer`: persistent cache, one line and uncompiled when it cannot run).
        loras: LoRAs to apply (`lora.use_loras` specs: paths, (path, scale) or LoraSpec), loaded before the
            placement is planned, so their factors are counted and kept resident beside streamed blocks.

    Returns:
        A FluxPipeline; `pipe.krea_lite` holds the manifest, the plan and the placement
        (`pipe.krea_lite.close()` undoes the placement and unpins host memory).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel, CLIPTokenizer, T5TokenizerFast

    path = Path(path).expanduser()
    device = _resolve_device(device)
    if device == "cpu" and vram_gb is not None:
        raise KreaLiteError("vram_gb= (--vram-gb) needs a CUDA device; leave it out to run on the CPU")
    from .plan import Budget

    budget = None if vram_gb is None else Budget(vram_gb)  # checked before anything loads
    if verify not in ("quick", "full", "none"):
        raise KreaLiteError(f"verify={verify!r}: use 'quick', 'full' or 'none'")
    seconds, t0 = {}, time.perf_counter()

    def lap(what):
        nonlocal t0
        seconds[what] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()

    if verify == "none":
        manifest = read_manifest(path)
    else:
        manifest = verify_checkpoint(path, full=verify == "full")
    lap("verify")
    comps = manifest["components"]
    transformer = load_component(path / "transformer", "transformer", comps["transformer"])
    lap("transformer")
    text_encoder_2 = load_component(path / "text_encoder_2", "text_encoder_2", comps["text_encoder_2"])
    lap("text_encoder_2")
    pipe = FluxPipeline(
        transformer=transformer, text_encoder_2=text_encoder_2,
        text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=torch.bfloat16,
                                                   use_safetensors=True),
        vae=AutoencoderKL.from_pretrained(path / "vae", torch_dtype=torch.bfloat16, use_safetensors=True),
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
        tokenizer_2=T5TokenizerFast.from_pretrained(path / "tokenizer_2"),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler"),
    )
    lap("clip_vae_tokenizers")
    pipe.krea_lite = LoadInfo(path=path, manifest=manifest, device=device, seconds=seconds, budget=budget)
    from .lora import guard_fuse

    guard_fuse(pipe)  # fuse_lora on a quantized transformer refuses in one line (it would requantize)
    if loras:
        from .lora import use_loras

        use_loras(pipe, loras)
        lap("loras")
    if compile:  # before placing: the streaming hooks then wrap the compiled forwards, outside the graphs
        from .compile import compile_transformer

        compile_transformer(pipe.transformer, device=device)
    if device != "cpu":
        from .plan import measure, plan_for_budget

        if budget is not None:
            budget.enforce(device)
        # no budget given: what this card (not the current device) has free, the CUDA context already taken
        allocator = torch.cuda.mem_get_info(torch.device(device))[0] if budget is None else budget.allocator_bytes
        place(pipe, plan_for_budget(measure(pipe), allocator, width=width, height=height, batch=batch))
        torch.cuda.synchronize(device)
        gc.collect()  # the CPU copies of what moved: release their file mappings now, not at some later step
        lap("place")
    return pipe


def place(pipe, plan) -> None:
    """Apply a placement plan to a loaded pipeline (undoing any earlier one) and record it."""
    from dataclasses import replace

    from .placement import apply_plan

    info = pipe.krea_lite
    if info.placement is not None:
        info.placement.close()
    pipe.krea_lite = replace(info, plan=plan, placement=apply_plan(pipe, plan, info.device))


PLACEMENT_FIELDS = ("streamed_double", "streamed_single", "prefetch", "t5_streamed", "clip_on_gpu", "vae_on_gpu",
                    "vae_tiled")


def fit_adapters(pipe) -> bool:
    """After LoRAs were loaded or deleted on a placed pipeline: plan again with the adapters' bytes (they
    stay resident, never streamed). The same placement is kept when it still fits (the adapters simply
    stay on the GPU beside it); otherwise the pipeline is placed again. Returns whether it was re-placed.
    `lora.use_loras`/`load_lora` call it; call it yourself after `pipe.load_lora_weights`."""
    from dataclasses import replace

    from .plan import adapter_nbytes, plan_for_budget

    info = getattr(pipe, "krea_lite", None)
    if info is None or info.plan is None or info.placement is None or info.placement.closed:
        return False
    plan = info.plan
    now = adapter_nbytes(pipe.transformer)
    if now == plan.sizes.adapters:
        return False
    fresh = plan_for_budget(replace(plan.sizes, adapters=now), plan.budget_bytes, width=plan.width,
                            height=plan.height, batch=plan.batch, conservative=plan.conservative, spread=plan.spread)
    if all(getattr(fresh, f) == getattr(plan, f) for f in PLACEMENT_FIELDS):
        info.placement.plan = fresh
        pipe.krea_lite = replace(info, plan=fresh)
        return False
    why = ("no longer fit the placement" if now > plan.sizes.adapters else "leave room for more resident blocks")
    print(f"krea-lite: LoRA adapters ({now / 2**20:.0f} MiB, resident) {why}; placing the pipeline again "
          f"({len(fresh.streamed_double) + len(fresh.streamed_single)} blocks streamed)", flush=True)
    place(pipe, fresh)
    return True


def with_oom_fallback(pipe, call):
    """`call()`; after a CUDA out-of-memory error, re-place `pipe` once with a more conservative plan
    (`Plan.shrink`) and call again. What `generate` uses for every image; use it around your own `pipe(...)`.

    Args:
        pipe: a pipeline from `load_pipeline`.
        call: a function of no arguments that runs the pipeline, e.g. `lambda: pipe(prompt)`.
    """
    info = getattr(pipe, "krea_lite", None)
    try:
        return call()
    except torch.OutOfMemoryError:
        if info is None or info.plan is None:
            raise
        retry = True  # outside the except block, so the failed pass's tensors can be freed
    if retry:
        _fall_back(pipe)
        return call()


def _fall_back(pipe) -> None:
    plan = pipe.krea_lite.plan
    if plan.conservative:
        raise KreaLiteError("out of GPU memory even with the conservative plan; pass a smaller vram_gb (--vram-gb) "
                            "or generate smaller images")
    torch.cuda.empty_cache()
    smaller = plan.shrink()
    print(f"krea-lite: out of GPU memory; retrying once with a more conservative plan "
          f"(predicted peak {smaller.peak_bytes / 2**30:.2f} GiB instead of {plan.peak_bytes / 2**30:.2f})",
          flush=True)
    place(pipe, smaller)
    torch.cuda.empty_cache()
