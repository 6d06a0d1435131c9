"""krea-lite bench, the child: one cell, one process (torch and diffusers are imported here only).

`python -m krea_lite.bench --cell JSON` reaches `_child_main` through `runner.run`; it writes the
cell's result JSON as it goes, so a crash still leaves the phase it died in and what was measured.
"""

from __future__ import annotations

import faulthandler
import json
import os
import subprocess
import threading
import time
from pathlib import Path

from .matrix import GiB

ABORT_ENV = "KREA_LITE_BENCH_ABORT"  # tests: a child whose cell id contains this value calls os.abort()


class _RssPoller:
    """Peak resident set size of this process, polled every 20 ms in a daemon thread.

    `mark()` ends the load phase: the peak so far is the load peak, and polling starts over for the
    generation phase (steps and the end-to-end image), where RssAnon (memory not backed by a file, i.e.
    not page cache that safetensors maps) is tracked too.
    """

    def __init__(self):
        import psutil

        self.proc, self.peak, self.anon, self.load_peak = psutil.Process(), 0, 0, None
        self._stop, self._lock = threading.Event(), threading.Lock()  # a sample must not straddle mark()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.02)

    def _sample(self):
        with self._lock:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            if self.load_peak is not None:
                self.anon = max(self.anon, _rss_anon())

    def mark(self) -> None:
        self._sample()
        with self._lock:
            self.load_peak, self.peak, self.anon = self.peak, 0, 0

    def stop(self) -> dict:
        self._stop.set()
        self.thread.join()
        self._sample()
        if self.load_peak is None:
            return {"host_rss_peak_gib": round(self.peak / GiB, 3)}
        return {"host_rss_load_peak_gib": round(self.load_peak / GiB, 3),
                "host_rss_gen_peak_gib": round(self.peak / GiB, 3),
                "host_rss_anon_gen_peak_gib": round(self.anon / GiB, 3),
                "host_rss_peak_gib": round(max(self.load_peak, self.peak) / GiB, 3)}


def _rss_anon() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


_RSS: _RssPoller | None = None  # the child's poller, for `_loaded` to mark


def _loaded() -> None:
    if _RSS is not None:
        _RSS.mark()


def _child_main(cell: dict) -> int:
    result: dict = {"metrics": {}, "phase": "start"}

    def save():
        path = Path(cell["result_path"])
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, path)

    faulthandler.enable()  # a segfault prints its Python stack into the cell's log
    if os.environ.get(ABORT_ENV) and os.environ[ABORT_ENV] in cell["id"]:
        os.abort()
    global _RSS
    rss = _RSS = _RssPoller()
    try:
        CELL_KINDS[cell["kind"]](cell, result, save)
        return 0
    except _Skip as e:
        result["skipped"] = str(e)
        return 0
    except BaseException as e:
        msg = str(e).strip().splitlines()
        result["error"] = f"{type(e).__name__}: {msg[0] if msg else ''}"[:400]
        raise
    finally:
        result["metrics"].update(rss.stop())
        _finish(result["metrics"])
        save()


class _Skip(Exception):
    """Raised in a child for a cell that does not apply (recorded as skipped, not as a crash)."""


def _device(cell):
    import torch

    dev = cell.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise _Skip("needs CUDA")
    return torch.device(dev)


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peaks(dev, m: dict, prefix: str) -> None:
    import torch

    if dev.type == "cuda":
        m[f"{prefix}peak_alloc_gib"] = round(torch.cuda.max_memory_allocated(dev) / GiB, 3)
        m[f"{prefix}peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(dev) / GiB, 3)


def _reset_peaks(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def _step_inputs(transformer, cell: dict, dev) -> dict:
    """ANCHORS.md inputs: seeded random latents and text states, timestep 0.5, guidance 3.5, zero ids."""
    import torch

    cfg = transformer.config
    b, tokens, text = cell["batch"], (cell["width"] // 16) * (cell["height"] // 16), cell["text_tokens"]
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev, torch.bfloat16)

    kw = dict(hidden_states=rnd(b, tokens, cfg.in_channels),
              encoder_hidden_states=rnd(b, text, cfg.joint_attention_dim),
              pooled_projections=rnd(b, cfg.pooled_projection_dim),
              timestep=torch.full((b,), 0.5, device=dev, dtype=torch.bfloat16),
              img_ids=torch.zeros(tokens, 3, device=dev, dtype=torch.bfloat16),
              txt_ids=torch.zeros(text, 3, device=dev, dtype=torch.bfloat16), return_dict=False)
    if cfg.guidance_embeds:
        kw["guidance"] = torch.full((b,), 3.5, device=dev, dtype=torch.float32)  # as FluxPipeline passes it
    return kw


def _time_steps(transformer, cell: dict, dev, result: dict, save, placement=None) -> None:
    """Median of `steps` synchronized forwards after `warmup`; peaks over warm-up and timed steps.

    With the streaming engine's `placement`, also the bytes it actually copied per timed step.
    """
    import numpy as np
    import torch

    result["phase"] = "step"
    save()
    m = result["metrics"]
    kw = _step_inputs(transformer, cell, dev)
    streamers = list(getattr(placement, "streamers", {}).values())
    for st in streamers:  # CUDA events around each wait for a copy: how long the GPU sat idle on PCIe
        st.profile = True
    _reset_peaks(dev)
    times = []
    with torch.inference_mode():
        for i in range(cell["warmup"] + cell["steps"]):
            _sync(dev)
            t0 = time.perf_counter()
            out = transformer(**kw)[0]
            _sync(dev)
            if i >= cell["warmup"]:
                times.append(time.perf_counter() - t0)
            if i == cell["warmup"] - 1 and placement is not None:
                placement.stats(reset=True)
            if i == cell["warmup"]:
                path = Path(cell["scratch"]) / f"{cell['key']}.step.npy"
                np.save(path, out.float().cpu().numpy())
                m["step_npy"] = str(path)
    if placement is not None:
        st = {k: v for k, v in placement.stats().items() if k != "on_demand"}
        m["copied_gib_per_step"] = round(sum(v["bytes_copied"] for v in st.values()) / len(times) / GiB, 4)
        m["stream_misses"] = sum(v["misses"] for v in st.values())
        m["copy_wait_ms_per_step"] = round(sum(v.get("wait_ms", 0.0) for v in st.values()) / len(times), 3)
    for st in streamers:
        st.profile = False
    m["step_times_s"] = [round(t, 5) for t in times]
    m["s_per_step"] = round(float(np.median(times)), 5)
    _peaks(dev, m, "step_")
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        m["device_used_gib"] = round((total - free) / GiB, 3)  # includes the CUDA context, outside the cap
    save()


def _e2e(pipe, cell: dict, dev, result: dict, save) -> None:
    """One image (batch) end to end: text encode, all steps, VAE decode to PIL; the final latent kept.
    `e2e_steps` 0: no end-to-end image."""
    import numpy as np
    import torch

    if not cell.get("e2e_steps"):
        return
    result["phase"] = "e2e"
    save()
    m = result["metrics"]
    final = {}

    # per-phase peaks: text encoding (until the transformer's first call), the steps, the VAE decode
    def encoded(_module, _args):
        _peaks(dev, m, "e2e_encode_")
        _reset_peaks(dev)
        first_call.remove()

    def keep(_pipe, i, _t, kw):
        final["latents"] = kw["latents"]
        if i == cell["e2e_steps"] - 1:
            _peaks(dev, m, "e2e_denoise_")
            _reset_peaks(dev)
        return {}

    pipe.set_progress_bar_config(disable=True)
    first_call = pipe.transformer.register_forward_pre_hook(encoded)
    _reset_peaks(dev)
    _sync(dev)
    t0 = time.perf_counter()
    with torch.inference_mode():
        images = pipe(prompt=cell["prompt"], num_images_per_prompt=cell["batch"],
                      num_inference_steps=cell["e2e_steps"], guidance_scale=cell["guidance"],
                      width=cell["width"], height=cell["height"],
                      generator=torch.Generator().manual_seed(cell["seed"]), output_type="pil",
                      callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"]).images
    _sync(dev)
    m["e2e_s"] = round(time.perf_counter() - t0, 3)
    _peaks(dev, m, "e2e_decode_")
    _finish(m, ("e2e_encode_", "e2e_denoise_", "e2e_decode_"), into="e2e_")
    base = Path(cell["scratch"]) / cell["key"]
    np.save(f"{base}.latent.npy", final["latents"].float().cpu().numpy())
    m["latent_npy"] = f"{base}.latent.npy"
    m["images"] = []
    for i, im in enumerate(images):
        im.save(f"{base}.e2e{i}.png")
        m["images"].append(f"{base}.e2e{i}.png")
    save()


def _finish(m: dict, phases=("load_", "step_", "e2e_"), into: str = "") -> None:
    """The peaks of several phases as one: by default load, steps and e2e, the headline numbers."""
    for kind in ("alloc", "reserved"):
        vals = [m[k] for p in phases if (k := f"{p}peak_{kind}_gib") in m]
        if vals:
            m[f"{into}peak_{kind}_gib"] = max(vals)


def _cap(dev, budget_gib: float | None, m: dict) -> None:
    """Hold this process to a card of `budget_gib` GiB before anything allocates on the GPU: exactly what
    `krea-lite generate --vram-gb` and `load_pipeline(vram_gb=)` enforce (`plan.Budget`: the card less its
    CUDA context), for krea-lite cells and anchors alike."""
    import torch

    from ..plan import Budget

    if budget_gib is None or dev.type != "cuda":
        return
    total = torch.cuda.get_device_properties(dev).total_memory
    if budget_gib * GiB > total:
        raise _Skip(f"budget {budget_gib:g} GiB exceeds the card's {total / GiB:.1f} GiB")
    budget = Budget(budget_gib)
    budget.enforce(dev)
    m["cap_fraction"] = round(budget.allocator_bytes / total, 5)
    m["cap_allocator_gib"] = round(budget.allocator_bytes / GiB, 3)


def _cell_env(cell: dict, result: dict, save) -> None:
    """Card, driver, CUDA, and the pinned host->device copy bandwidth (ANCHORS.md's first row)."""
    import torch

    m = result["metrics"]
    m.update(torch=torch.__version__, cuda=torch.cuda.is_available(), cuda_version=torch.version.cuda,
             cpu_count=os.cpu_count())
    try:
        import psutil

        m["host_ram_gib"] = round(psutil.virtual_memory().total / GiB, 1)
    except ImportError:
        pass
    if not torch.cuda.is_available():
        return
    props = torch.cuda.get_device_properties(0)
    m.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GiB, 2),
             capability=f"{props.major}.{props.minor}")
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        m["driver"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        m["driver"] = None
    m["h2d_gbps"] = _h2d_gbps()


def _h2d_gbps(device="cuda") -> float:
    """Pinned host -> device copy bandwidth, GB/s: 512 MiB, five copies after one warm-up."""
    import torch

    n = 512 << 20
    src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    gbps = round(5 * n / (time.perf_counter() - t0) / 1e9, 2)
    del src, dst
    torch.cuda.empty_cache()
    return gbps


def _cell_prepare(cell: dict, result: dict, save) -> None:
    if cell["op"] == "synthetic":
        from ..synthetic import write_synthetic

        # no BFL single file: the bench reads the diffusers folders, and it would cost 24 GB of disk
        write_synthetic(Path(cell["out"]), size=cell["size"], seed=0, single_file=False)
        return
    from ..errors import KreaLiteError
    from ..quantize import QuantizeConfig, quantize_pipeline

    try:  # the same scheme for T5 where it has one, else the default
        config = QuantizeConfig(transformer=cell["scheme"], text_encoder=cell["scheme"])
    except (KreaLiteError, ValueError):
        config = QuantizeConfig(transformer=cell["scheme"])
    quantize_pipeline(cell["source"], Path(cell["out"]), config, progress=False)


def _cell_krea(cell: dict, result: dict, save) -> None:
    """A krea-lite folder through load_pipeline at a budget: load, steps, one image."""
    import torch
    from diffusers import AutoencoderKL, FluxPipeline  # noqa: F401  what load_pipeline imports, imported
    from transformers import CLIPTextModel, T5TokenizerFast  # noqa: F401  before the clock, as the anchors do

    from ..pipeline import load_pipeline

    m = result["metrics"]
    dev = _device(cell)
    _cap(dev, cell["budget_gib"], m)
    result["phase"] = "load"
    save()  # a crash from here on is reported in this phase
    _reset_peaks(dev)
    t0 = time.perf_counter()
    pipe = load_pipeline(cell["model"], device=str(dev), vram_gb=cell["budget_gib"], width=cell["width"],
                         height=cell["height"], batch=cell["batch"])
    _sync(dev)
    m["load_s"] = round(time.perf_counter() - t0, 2)
    _loaded()
    _peaks(dev, m, "load_")
    if dev.type == "cuda":
        m["loaded_alloc_gib"] = round(torch.cuda.memory_allocated(dev) / GiB, 3)  # weights (+ slots) at rest
    m["load_seconds"] = pipe.krea_lite.seconds
    plan = getattr(pipe.krea_lite, "plan", None)
    m["plan"] = _plan_summary(plan) if plan is not None else None
    m["streamed_gib"] = (m["plan"] or {}).get("streamed_gib", 0.0)
    save()
    _time_steps(pipe.transformer, cell, dev, result, save, getattr(pipe.krea_lite, "placement", None))
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    _e2e(pipe, cell, dev, result, save)


def _plan_summary(plan) -> dict:
    """The plan's scalars, predicted peaks and streamed bytes per step, to set beside the measured ones."""
    import dataclasses

    raw = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)} if dataclasses.is_dataclass(plan) \
        else dict(vars(plan))
    out = {k: v for k, v in raw.items() if isinstance(v, (int, float, str, bool)) or v is None}
    try:  # plan.Plan: each streamed block is copied once per step
        out.update(n_streamed_double=len(plan.streamed_double), n_streamed_single=len(plan.streamed_single),
                   streamed_gib=round(plan.streamed_bytes / GiB, 4),
                   predicted_gib={name: round(n / GiB, 3) for name, n in plan.phase_bytes},
                   predicted_peak_phase=plan.peak_phase)
    except (AttributeError, TypeError, IndexError, ValueError):
        pass
    return out


def _cell_anchor(cell: dict, result: dict, save) -> None:
    """What diffusers gives today, taken the way ANCHORS.md took it (under the cell's cap, if any)."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel

    m, name = result["metrics"], cell["name"]
    dev = _device(cell)
    _cap(dev, cell.get("budget_gib"), m)
    bf16 = torch.bfloat16
    result["phase"] = "load"
    save()  # a crash from here on is reported in this phase
    _reset_peaks(dev)
    t0 = time.perf_counter()
    pipe = None
    if name.startswith("bf16"):
        tr = FluxTransformer2DModel.from_pretrained(cell["source"], subfolder="transformer", torch_dtype=bf16)
    else:  # our bnb folders are in diffusers' format: its BitsAndBytesConfig loads them (onto the GPU)
        tr = FluxTransformer2DModel.from_pretrained(cell["nf4"], subfolder="transformer", torch_dtype=bf16)
    if name == "bf16_resident":
        tr.to(dev)
    elif name.endswith("group_leaf_stream"):
        tr.enable_group_offload(onload_device=dev, offload_device=torch.device("cpu"), offload_type="leaf_level",
                                use_stream=True)
    elif name == "nf4_group_block_stream":
        tr.enable_group_offload(onload_device=dev, offload_device=torch.device("cpu"), offload_type="block_level",
                                num_blocks_per_group=1, use_stream=True)
    elif name == "nf4_model_cpu_offload":
        pipe = FluxPipeline.from_pretrained(cell["nf4"], transformer=tr, torch_dtype=bf16)
        pipe.enable_model_cpu_offload(device=dev)
    _sync(dev)
    m["load_s"] = round(time.perf_counter() - t0, 2)
    _loaded()
    _peaks(dev, m, "load_")
    save()
    _time_steps(tr, cell, dev, result, save)
    if pipe is not None:
        _e2e(pipe, cell, dev, result, save)


def _cell_ref(cell: dict, result: dict, save) -> None:
    """The fidelity reference: the plain diffusers bf16 pipeline of the source, one image."""
    import torch
    from diffusers import FluxPipeline

    m = result["metrics"]
    dev = _device(cell)
    result["phase"] = "load"
    save()  # a crash from here on is reported in this phase
    t0 = time.perf_counter()
    pipe = FluxPipeline.from_pretrained(cell["source"], torch_dtype=torch.bfloat16)
    # FLUX bf16 needs ~34 GB of weights: resident where the card has room, else diffusers' model offload.
    if dev.type == "cuda" and torch.cuda.get_device_properties(dev).total_memory < 48 * GiB:
        pipe.enable_model_cpu_offload(device=dev)
        m["offload"] = "model_cpu_offload"
    else:
        pipe.to(dev)
    m["load_s"] = round(time.perf_counter() - t0, 2)
    _loaded()
    save()
    _e2e(pipe, cell, dev, result, save)


# Per-step ratio targets against the resident step, NF4 at 1024^2 (issue "Streaming that keeps the model whole").
RATIO_TARGETS = {8.0: 1.05, 6.0: 1.08, 4.0: 1.10}
# The 8-bit-matmul schemes at 6 and 4 GiB: the step within 5% of its physical limit (issue "Faster than bf16").
LIMIT_TARGETS = {6.0: 1.05, 4.0: 1.05}
# --against: this scheme's step over another's at the same card (issue "Start from the files users already have")
AGAINST_TARGETS = {("gguf", "nf4"): 1.15}


def ratio_targets(cell: dict) -> tuple[dict, str]:
    """(targets per card, what they bound): the NF4 ratios for a plain NF4 cell, the physical-limit ones for
    fp8mm/int8mm; none for other cells (LoRA cells have their own targets, on the LoRA overhead)."""
    if cell.get("loras"):
        return {}, ""
    if cell["name"] == "nf4" and not cell.get("compile"):
        return RATIO_TARGETS, "ratio"
    if cell["name"] in ("fp8mm", "int8mm"):
        return LIMIT_TARGETS, "vs_physical_limit"
    return {}, ""


def _cell_ratio(cell: dict, result: dict, save) -> None:
    """Interleaved ratios, one process, one load: the resident placement and the placement of each card
    take turns, `rounds` times (the order reversed every other round), `warmup` + `steps` steps each, so
    that drift of the machine hits every configuration alike. Each card is held to exactly what the
    product enforces (`plan.Budget`). A ratio is a round's median capped step over the same round's
    median resident step; reported as the median with min-max over rounds, and flagged when the spread
    is wider than the margin to its target. Per configuration also: GPU time waiting on copies, the
    allocator's retries (cudaFree + retry near the cap), host CPU time per step."""
    import numpy as np
    import torch

    from ..compile import compile_counters
    from ..lora import active_loras, fused_side_branch
    from ..pipeline import load_pipeline, place
    from ..plan import Budget, measure, plan_for_budget

    m = result["metrics"]
    dev = _device(cell)
    result["phase"] = "load"
    save()
    loras = _bench_loras(cell)
    pipe = load_pipeline(cell["model"], device=str(dev), width=cell["width"], height=cell["height"],
                         batch=cell["batch"], compile=bool(cell.get("compile")), loras=loras)
    _loaded()
    if dev.type == "cuda":
        m["h2d_gbps"] = _h2d_gbps(dev)
    adapters = [r.adapter for r in active_loras(pipe)]
    m["loras"] = [{"file": Path(p).name, "rank": cell.get("lora_rank")} for p in loras]
    # --against: other schemes' folders (eager, no LoRA) take their turns at every card too, variant "@scheme"
    pipes = {"": pipe} | {f"@{name}": load_pipeline(path, device=str(dev), width=cell["width"], height=cell["height"],
                                                    batch=cell["batch"])
                          for name, path in (cell.get("against") or {}).items()}
    sizes = {v: measure(p) for v, p in pipes.items()}
    kw = _step_inputs(pipe.transformer, cell, dev)
    # each card runs without LoRA and, when the cell has LoRAs, with the first one and with all of them
    variants = [""] + ([f"+lora{n}{f}" for n in sorted({1, len(adapters)})
                        for f in ("", "fused")[:1 + bool(cell.get("lora_fused"))]] if adapters else [])
    variants += [v for v in pipes if v]
    configs = [(card, v) for card in [None, *cell["budgets"]] for v in variants]
    runs = {f"{c}{v}": [] for c, v in configs}
    counters0 = None
    result["phase"] = "rounds"
    save()
    first_out = {}
    for r in range(cell["rounds"]):
        for card, variant in (configs if r % 2 == 0 else configs[::-1]):
            which = variant if variant.startswith("@") else ""
            p = pipes[which]
            for other in pipes.values():  # one placement on the card at a time
                if other is not p and getattr(other.krea_lite.placement, "closed", True) is False:
                    other.krea_lite.close()
            if adapters and not which:
                if variant:
                    pipe.enable_lora()
                    n = int(variant.removeprefix("+lora").removesuffix("fused"))
                    pipe.set_adapters(adapters[:n], [1.0] * n)
                    fused_side_branch(pipe, enable=variant.endswith("fused"))
                else:
                    pipe.disable_lora()  # loaded, switched off: peft's layers pass the base output through
            if dev.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0, dev.index or 0)
            budget = None if card is None else Budget(card)
            place(p, plan_for_budget(sizes[which], None if budget is None else budget.allocator_bytes,
                                     width=cell["width"], height=cell["height"], batch=cell["batch"],
                                     spread=bool(cell.get("spread"))))
            if budget is not None and dev.type == "cuda":
                budget.enforce(dev)
            placement = p.krea_lite.placement
            for st in placement.streamers.values():
                st.profile = True
            _reset_peaks(dev)
            times, cpu = [], []
            with torch.inference_mode():
                for i in range(cell["warmup"] + cell["steps"]):
                    if i == cell["warmup"]:
                        placement.stats(reset=True)
                        if counters0 is None and r == cell["rounds"] - 1:  # everything ran at least once before
                            counters0 = compile_counters()
                        retries = torch.cuda.memory_stats(dev).get("num_alloc_retries", 0) if dev.type == "cuda" else 0
                    _sync(dev)
                    t0, c0 = time.perf_counter(), time.process_time()
                    out = p.transformer(**kw)[0]
                    _sync(dev)
                    if i >= cell["warmup"]:
                        times.append(time.perf_counter() - t0)
                        cpu.append(time.process_time() - c0)
            st = [v for k, v in placement.stats().items() if k != "on_demand"]
            run = {"round": r, "s_per_step": float(np.median(times)), "step_times_s": [round(t, 5) for t in times],
                   "cpu_s_per_step": round(float(np.median(cpu)), 5),
                   "copy_wait_ms_per_step": round(sum(v.get("wait_ms", 0.0) for v in st) / len(times), 3),
                   "copied_gib_per_step": round(sum(v["bytes_copied"] for v in st) / len(times) / GiB, 4),
                   "streamed": [len(placement.plan.streamed_double), len(placement.plan.streamed_single)],
                   "prefetch": placement.plan.prefetch}
            if dev.type == "cuda":
                run["alloc_retries"] = torch.cuda.memory_stats(dev).get("num_alloc_retries", 0) - retries
                run["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(dev) / GiB, 3)
                if budget is not None:
                    run["under_cap"] = torch.cuda.max_memory_reserved(dev) <= budget.allocator_bytes
            key, resident_key = f"{card}{variant}", f"None{variant}"
            if key in first_out:
                run["equals_resident"] = (bool(torch.equal(out, first_out[resident_key]))
                                          if resident_key in first_out else None)
            else:
                first_out[key] = out.clone()
                if key != resident_key and resident_key in first_out:
                    run["equals_resident"] = bool(torch.equal(out, first_out[resident_key]))
            runs[key].append(run)
            print(f"[ratio] round {r} card {card}{variant}: {run['s_per_step']:.4f} s/step, wait "
                  f"{run['copy_wait_ms_per_step']} ms, retries {run.get('alloc_retries')}", flush=True)
            save()
    if dev.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0, dev.index or 0)
    if counters0 is not None:  # graphs traced during the last round: recompiles after every config warmed up
        m["recompiles_last_round"] = compile_counters()["graphs"] - counters0["graphs"]
    if cell.get("compile"):
        m["compile"] = {k: v for k, v in (pipe.krea_lite.seconds or {}).items() if "compile" in k}
    if adapters:
        m["lora_switch"] = _lora_switch_times(pipe, cell, dev, sizes[""])
    for p in pipes.values():
        p.krea_lite.close()
    m["runs"] = runs
    m["ratios"] = ratio_summary(runs, cell["budgets"], m.get("h2d_gbps"), *ratio_targets(cell))
    for v in variants[1:]:
        if v.startswith("@"):  # this scheme's step over the other scheme's at the same card, per round
            m["ratios"][f"vs{v}"] = {str(c): _per_round(runs[str(c)], runs[f"{c}{v}"])
                                     for c in [None, *cell["budgets"]]}
            m["ratios"][f"vs{v}"]["target"] = AGAINST_TARGETS.get((cell["name"], v[1:]))
            m[f"ratios{v}"] = ratio_summary({k.removesuffix(v): x for k, x in runs.items() if k.endswith(v)},
                                            cell["budgets"], m.get("h2d_gbps"), {}, "")
        else:  # LoRA overhead: the same card with and without the LoRAs, per round
            m["ratios"][f"lora{v}"] = {str(c): _per_round(runs[f"{c}{v}"], runs[str(c)])
                                       for c in [None, *cell["budgets"]]}
    save()


def _lora_switch_times(pipe, cell: dict, dev, sizes) -> dict:
    """Seconds to load a LoRA file onto the loaded pipeline and to switch to another (checks, peft layers,
    the move to the GPU and any re-placement included), per card: the cell's LoRAs and two rank-8 ones
    (~65 MB on the full-size model), after every adapter was removed."""
    import torch

    from ..lora import fused_side_branch, use_loras
    from ..pipeline import place
    from ..plan import Budget, plan_for_budget
    from ..synthetic_lora import write_lora

    folder = Path(cell.get("lora_dir") or "/tmp/krea-lite-bench-loras")
    size = "full" if pipe.transformer.config.num_layers == 19 else "tiny"
    small = []
    for seed in (100, 101):
        path = folder / f"lora-{size}-r8-s{seed}.safetensors"
        if not path.exists():
            write_lora(path, "diffusers", size=size, rank=8, seed=seed)
        small.append(path)
    big = _bench_loras(cell)[:2]
    fused_side_branch(pipe, enable=False)
    pipe.enable_lora()
    out = {"files_mb": {p.name: round(p.stat().st_size / 1e6, 1) for p in [*small, *big]}}
    for card in [None, *cell["budgets"][:1]]:
        if dev.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, dev.index or 0)
        use_loras(pipe, [])
        budget = None if card is None else Budget(card)
        place(pipe, plan_for_budget(sizes, None if budget is None else budget.allocator_bytes, width=cell["width"],
                                    height=cell["height"], batch=cell["batch"]))
        if budget is not None and dev.type == "cuda":
            budget.enforce(dev)
        row = {}
        for what, files in (("rank8", small), (f"rank{cell.get('lora_rank')}", big)):
            for i, label in enumerate(("load", "switch")):
                _sync(dev)
                t0 = time.perf_counter()
                use_loras(pipe, [(files[i], 1.0)])
                _sync(dev)
                row[f"{what}_{label}_s"] = round(time.perf_counter() - t0, 3)
            use_loras(pipe, [])
        out[str(card)] = row
    if dev.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0, dev.index or 0)
    return out


def _per_round(runs: list, base: list) -> dict:
    import numpy as np

    by_round = {r["round"]: r["s_per_step"] for r in base}
    rs = [r["s_per_step"] / by_round[r["round"]] for r in runs if r["round"] in by_round]
    return {"ratio_median": round(float(np.median(rs)), 4), "ratio_min": round(min(rs), 4),
            "ratio_max": round(max(rs), 4), "rounds": len(rs)} if rs else {}


def _bench_loras(cell: dict) -> list:
    """The cell's synthetic LoRA files (rank `lora_rank` on every attention and MLP linear), written once."""
    n = int(cell.get("loras") or 0)
    if not n:
        return []
    from ..synthetic_lora import write_lora

    config = json.loads((Path(cell["model"]) / "transformer" / "config.json").read_text())
    size = "full" if config.get("num_layers") == 19 else "tiny"  # the synthetic sizes (synthetic.FULL / TINY)
    folder = Path(cell.get("lora_dir") or "/tmp/krea-lite-bench-loras")
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for seed in range(n):
        path = folder / f"lora-{size}-r{cell['lora_rank']}-s{seed}.safetensors"
        if not path.exists():
            write_lora(path, "diffusers", size=size, rank=cell["lora_rank"], seed=seed)
        out.append(path)
    return out




def ratio_summary(runs: dict, budgets: list, h2d_gbps: float | None = None, targets: dict | None = None,
                  bounds: str = "ratio") -> dict:
    """Per card: the per-round ratios to the same round's resident step, median and min-max, the target and
    whether the spread is wider than the margin to it. With the host-to-device bandwidth: the physical
    limit of the step, max(resident step, streamed bytes / bandwidth), and the step's efficiency against it.
    `targets` (card -> bound, default RATIO_TARGETS) bound `bounds`: "ratio" or "vs_physical_limit"."""
    import numpy as np

    resident = {r["round"]: r["s_per_step"] for r in runs["None"]}
    out = {"resident_s_per_step": round(float(np.median(list(resident.values()))), 5)}
    for card in budgets:
        rs = [r["s_per_step"] / resident[r["round"]] for r in runs[str(card)] if r["round"] in resident]
        if not rs:
            continue
        med, lo, hi = float(np.median(rs)), min(rs), max(rs)
        target = (RATIO_TARGETS if targets is None else targets).get(float(card))
        row = {"ratio_median": round(med, 4), "ratio_min": round(lo, 4), "ratio_max": round(hi, 4), "rounds": len(rs),
               "s_per_step": round(float(np.median([r["s_per_step"] for r in runs[str(card)]])), 5),
               "peak_reserved_gib": max((r.get("peak_reserved_gib", 0) for r in runs[str(card)]), default=None),
               "under_cap": all(r.get("under_cap", True) for r in runs[str(card)]),
               "equals_resident": all(r.get("equals_resident", True) is not False for r in runs[str(card)]),
               "copy_wait_ms_per_step": max(r.get("copy_wait_ms_per_step", 0.0) for r in runs[str(card)]),
               "alloc_retries": sum(r.get("alloc_retries", 0) for r in runs[str(card)])}
        if h2d_gbps:
            copied = float(np.median([r.get("copied_gib_per_step", 0.0) for r in runs[str(card)]]))
            copy_s = copied * GiB / (h2d_gbps * 1e9)
            limit = max(out["resident_s_per_step"], copy_s)
            row.update(copy_s_per_step=round(copy_s, 5), physical_limit_s=round(limit, 5),
                       vs_physical_limit=round(row["s_per_step"] / limit, 4),
                       bound="copy" if copy_s > out["resident_s_per_step"] else "compute")
        if target is not None and bounds == "ratio":
            row.update(target=target, met=med <= target, spread_wider_than_margin=(hi - lo) > (target - med))
        elif target is not None and "vs_physical_limit" in row:
            row.update(target=target, target_on="vs_physical_limit", met=row["vs_physical_limit"] <= target)
        out[str(card)] = row
    return out


CELL_KINDS = {"env": _cell_env, "prepare": _cell_prepare, "krea": _cell_krea, "anchor": _cell_anchor,
              "ref": _cell_ref, "ratio": _cell_ratio}
