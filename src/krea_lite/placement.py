"""apply_plan: put a FluxPipeline's weights where a `plan.Plan` says, and stream the rest just in time.

Resident parts move with the libraries' own `.to()` (bitsandbytes moves its quant state, optimum-quanto
re-packs for the device) and are then checked: every tensor a forward reads must be on the device.
(diffusers' group offloading crashes on NF4 because it moves the packed weight but leaves `absmax` and
`code` on the CPU; `packing.leaf_tensors` is the one list of "what a forward reads" used everywhere.)
Streamed block lists go through `streaming.BlockStreamer`: the blocks stay in the model, their tensors
live in pinned host memory and are copied into GPU slots just before they run.

CLIP, T5 and the VAE can instead live on the CPU and be moved onto the GPU when their forward starts,
one at a time (a component moves off when another starts). A streamed T5 keeps block 0 (which alone
holds the relative attention bias) with its embedding, and streams blocks 1.. through two slots that
exist only while T5 runs.

The placed pipeline stays an ordinary diffusers pipeline, and says what it is: `pipe.hf_device_map` names
where each component lives, so diffusers itself refuses `pipe.to()`, `enable_model_cpu_offload()` and
`enable_sequential_cpu_offload()` (they would undo the placement), and the quantized components carry
the attributes diffusers/transformers use to refuse dtype casts (`compat.mark_quantized`). A guard on the
transformer and T5 refuses, in one line, to run after something moved their resident weights away, and
keeps adapters loaded after placement resident. `Placement.close()` (or `with placement:`) undoes it
all and unpins the host memory.
"""

from __future__ import annotations

import time
import weakref

import torch
from torch import nn

from . import compat
from .errors import KreaLiteError
from .packing import leaf_tensors
from .plan import T5_SLOTS, VAE_TILE_PX, Plan
from .streaming import BlockStreamer, _require_on

COMPONENTS = ("transformer", "text_encoder_2", "text_encoder", "vae")


def _move_except(module: nn.Module, device: torch.device, streamed: set[int]) -> None:
    """`compat.move` every part of `module` except the streamed blocks (ids in `streamed`), which stay home."""
    if id(module) in streamed:
        return
    if not any(id(m) in streamed for m in module.modules()):
        compat.move(module, device)
        return
    compat.move_own(module, device)
    for child in module.children():
        _move_except(child, device, streamed)


def _require_on_except(module: nn.Module, device: torch.device, what: str, streamed: set[int]) -> None:
    if id(module) in streamed:
        return
    if not any(id(m) in streamed for m in module.modules()):
        _require_on(module, device, what)
        return
    for name, child in module.named_children():
        _require_on_except(child, device, f"{what}.{name}", streamed)


class _OnDemand:
    """Components kept on the CPU and moved onto the GPU when their forward starts; at most one at a time."""

    def __init__(self, device: torch.device):
        self.device, self.members, self.loaded = device, {}, None
        self.moves, self.seconds = 0, 0.0
        self.yield_to: list[BlockStreamer] = []  # the transformer's streamers: their slots are freed meanwhile

    def add(self, name: str, module: nn.Module, streamer: BlockStreamer | None = None) -> None:
        self.members[name] = (module, streamer)
        self._move(name, torch.device("cpu"))

    def _move(self, name: str, device: torch.device) -> None:
        module, streamer = self.members[name]
        streamed = {id(streamer.blocks[i]) for i in streamer.indices} if streamer is not None else set()
        _move_except(module, device, streamed)
        if device == self.device:
            _require_on_except(module, device, name, streamed)

    def hook(self, name: str):
        """A forward pre-hook: bring `name` onto the GPU, and its tensor inputs too. diffusers puts a
        component's inputs where the component's weights are (`get_module_execution_device`), which for
        an on-demand component is still the CPU when the call is made."""

        def pre_forward(_module, args, kwargs):
            self.use(name)
            to = self.device

            def move(x):
                return x.to(to) if torch.is_tensor(x) and x.device != to else x

            return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

        return pre_forward

    def use(self, name: str) -> None:
        if self.loaded == name:
            return
        with torch.inference_mode(False):  # called from forward pre-hooks; moved weights must stay normal tensors
            start = time.perf_counter()
            if self.loaded is not None:
                _, streamer = self.members[self.loaded]
                if streamer is not None:
                    streamer.release()
                self._move(self.loaded, torch.device("cpu"))
                self.loaded = None
            if name in self.members:
                for streamer in self.yield_to:  # the transformer is not running: its slots make room (plan._phases)
                    streamer.release()
                self._move(name, self.device)
                self.loaded = name
                self.moves += 1
            self.seconds += time.perf_counter() - start


class _Guard:
    """A forward pre-hook on the transformer and T5: refuse to run a placement that something undid, and keep
    adapters that were loaded after placement (peft's `peft_config` changed) resident beside the stream."""

    def __init__(self, placement: Placement, name: str, module: nn.Module, resident: bool = True):
        self.placement, self.name = weakref.ref(placement), name
        # one resident tensor of each part that is not a block list; none for a component moved in on demand
        self.sentinels = [t for child in module.children() if not isinstance(child, nn.ModuleList)
                          for t in leaf_tensors(child)[:1]] if resident else []
        self.adapters = self._adapters(module)

    @staticmethod
    def _adapters(module) -> tuple:
        return tuple(getattr(module, "peft_config", None) or ())

    def __call__(self, module, args, kwargs):
        placement = self.placement()
        if placement is None or placement.closed:
            return None
        moved = next((t.device for t in self.sentinels if t.device != placement.device), None)
        if moved is not None:
            raise KreaLiteError(
                f"the {self.name}'s weights were moved to {moved} after krea-lite placed them on "
                f"{placement.device} (pipe.to, reset_device_map, another offloading); call pipe.krea_lite.close() "
                "before moving the pipeline yourself, or load it again")
        adapters = self._adapters(module)
        if adapters != self.adapters:
            self.adapters = adapters
            with torch.inference_mode(False), torch.no_grad():
                for owner, streamer in placement.streamers.items():
                    if owner.startswith(self.name):
                        streamer.adopt_new_tensors()
        return None


class Placement:
    """What `apply_plan` did: `stats()` for profiling, `close()` (or `with placement:`) to undo it."""

    def __init__(self, pipe, plan: Plan, device: torch.device):
        self.plan, self.device, self.closed = plan, device, False
        self.components = {n: getattr(pipe, n, None) for n in COMPONENTS}
        self._pipe = weakref.ref(pipe) if _weakrefable(pipe) else (lambda: pipe)
        self.streamers: dict[str, BlockStreamer] = {}
        self.on_demand = _OnDemand(device)
        self._hooks, self._tiling_was, self._device_map_was = [], None, None

    def stats(self, reset: bool = False) -> dict:
        """Per streamed list: bytes copied, copies, misses (and with profile=True, ms the compute stream
        waited on copies); on-demand moves and their seconds. Counters are cumulative unless reset."""
        out = {name: s.stats(reset) for name, s in self.streamers.items()}
        out["on_demand"] = {"moves": self.on_demand.moves, "seconds": round(self.on_demand.seconds, 3),
                            "on_gpu": self.on_demand.loaded}
        if reset:
            self.on_demand.moves, self.on_demand.seconds = 0, 0.0
        return out

    def __enter__(self) -> Placement:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Undo `apply_plan`: hooks removed, every component an ordinary module on the CPU, the pinned host
        memory unpinned now. Safe to call twice."""
        if self.closed:
            return
        with torch.inference_mode(False), torch.no_grad():
            self._close()
        self.closed = True

    def _close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.on_demand.use("")  # evicts whatever is loaded
        cpu = torch.device("cpu")
        streamed = {id(s.blocks[i]) for s in self.streamers.values() for i in s.indices}
        for m in self.components.values():  # the resident parts first: removing a streamer borrows GPU memory
            if m is not None:
                _move_except(m, cpu, streamed)
        for s in self.streamers.values():
            s.remove()
        self.streamers = {}
        for m in self.components.values():
            if m is not None:
                compat.move(m, cpu)
        if self._tiling_was is not None:
            vae = self.components["vae"]
            vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = self._tiling_was
        self._tiling_was = None
        pipe = self._pipe()
        if pipe is not None and self._device_map_was is not None:
            pipe.hf_device_map = self._device_map_was[0]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def device_map(self) -> dict[str, str]:
        """Where each component lives, in `hf_device_map`'s form (component name -> device)."""
        on_demand = set(self.on_demand.members)
        out = {}
        for name, m in self.components.items():
            if m is None:
                continue
            if name in on_demand:
                out[name] = "cpu"  # moved onto the GPU while it runs
            else:
                out[name] = str(self.device)
        return out


def _weakrefable(obj) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


def _check_matches(pipe, plan: Plan) -> None:
    s = plan.sizes
    tr, t5 = getattr(pipe, "transformer", None), getattr(pipe, "text_encoder_2", None)
    found = (len(tr.transformer_blocks) if tr is not None else 0,
             len(tr.single_transformer_blocks) if tr is not None else 0,
             len(t5.encoder.block) if t5 is not None else 0)
    wanted = (len(s.transformer_blocks), len(s.single_transformer_blocks), len(s.t5_blocks))
    if found != wanted:
        raise KreaLiteError(f"the plan was made for a model with {wanted} (double, single, T5) blocks, this pipeline "
                            f"has {found}; make the plan from measure(pipe)")


def apply_plan(pipe, plan: Plan, device, profile: bool = False) -> Placement:
    """Place a FluxPipeline's weights as `plan` says; `pipe(...)` then works as a plain FluxPipeline call.

    Args:
        pipe: a FluxPipeline with its components on the CPU (as `load_pipeline` builds it), or any object
            with `transformer`, `text_encoder_2`, `text_encoder`, `vae` attributes (None = absent).
        plan: from `plan.plan_for_budget(plan.measure(pipe), ...)`.
        device: "cuda", "cuda:N", or "cpu" (runs the same bookkeeping synchronously; for tests).
        profile: time how long the GPU waits on each weight copy (adds two CUDA events per streamed
            block call); read it with `Placement.stats()`.

    Returns:
        A `Placement`: `stats()` (bytes copied, waits), `close()` (undo, back to the CPU, unpin).
    """
    device = _device(device)
    _check_matches(pipe, plan)
    compat.check_versions()
    placement = Placement(pipe, plan, device)
    try:
        with torch.inference_mode(False), torch.no_grad():
            _place(pipe, plan, placement, profile)
    except BaseException:
        placement.close()
        raise
    if hasattr(pipe, "hf_device_map"):
        placement._device_map_was = (pipe.hf_device_map,)
        pipe.hf_device_map = placement.device_map()
    return placement


def _device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise KreaLiteError(f"device {device} was asked for but torch sees no CUDA GPU")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _enable_tiling(vae) -> tuple:
    """Tiled decoding in VAE_TILE_PX tiles; returns the settings to restore.

    AutoencoderKL's default tile is its config's sample_size (1024 for FLUX), so `enable_tiling()`
    alone never tiles a 1024x1024 image: measured on an H200, the decode then needed a 512 MiB conv
    buffer and ran out of memory under a 6 GiB cap."""
    was = (bool(getattr(vae, "use_tiling", False)), getattr(vae, "tile_sample_min_size", None),
           getattr(vae, "tile_latent_min_size", None))
    vae.enable_tiling()
    if was[1] is not None:
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        vae.tile_sample_min_size = min(was[1], VAE_TILE_PX)
        vae.tile_latent_min_size = vae.tile_sample_min_size // scale
    return was


def _place(pipe, plan: Plan, placement: Placement, profile: bool) -> None:
    device, on_demand = placement.device, placement.on_demand
    tr = getattr(pipe, "transformer", None)
    t5 = getattr(pipe, "text_encoder_2", None)
    if tr is not None:  # streamed blocks go to pinned host memory first, so the GPU never holds them all
        streamed = set()
        for attr, idx in (("transformer_blocks", plan.streamed_double),
                          ("single_transformer_blocks", plan.streamed_single)):
            if idx:
                s = BlockStreamer(f"transformer.{attr}", getattr(tr, attr), idx, device, plan.prefetch, profile)
                placement.streamers[f"transformer.{attr}"] = s
                streamed |= {id(s.blocks[i]) for i in idx}
        on_demand.yield_to = [s for k, s in placement.streamers.items() if k.startswith("transformer.")]
        _move_except(tr, device, streamed)
        _require_on_except(tr, device, "transformer", streamed)
        placement._hooks.append(tr.register_forward_pre_hook(_Guard(placement, "transformer", tr),
                                                             with_kwargs=True))
    if t5 is not None:
        if plan.t5_streamed:
            s = BlockStreamer("text_encoder_2.encoder.block", t5.encoder.block, range(1, len(t5.encoder.block)),
                              device, T5_SLOTS, profile)
            s.release()
            placement.streamers["text_encoder_2"] = s
            on_demand.add("text_encoder_2", t5, s)
        else:
            compat.move(t5, device)
            _require_on(t5, device, "text_encoder_2")
        placement._hooks.append(t5.register_forward_pre_hook(_Guard(placement, "text_encoder_2", t5, not plan.t5_streamed),
                                                             with_kwargs=True))
    for name, on_gpu in (("text_encoder", plan.clip_on_gpu), ("vae", plan.vae_on_gpu)):
        if (m := getattr(pipe, name, None)) is None:
            continue
        if on_gpu:
            compat.move(m, device)
            _require_on(m, device, name)
        else:
            on_demand.add(name, m)
    vae = getattr(pipe, "vae", None)
    if vae is not None and plan.vae_tiled:
        placement._tiling_was = _enable_tiling(vae)
    if on_demand.members:
        hooked = [("text_encoder", getattr(pipe, "text_encoder", None)), ("text_encoder_2", t5), ("transformer", tr)]
        if vae is not None:  # vae.decode is not a forward: hook the submodules it calls
            hooked += [("vae", getattr(vae, a, None)) for a in ("encoder", "decoder", "quant_conv", "post_quant_conv")]
        for name, m in hooked:
            if m is not None:
                placement._hooks.append(m.register_forward_pre_hook(on_demand.hook(name), with_kwargs=True))
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand back what packing the streamed blocks borrowed
