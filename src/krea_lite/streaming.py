"""apply_plan: put a FluxPipeline's weights where a `plan.Plan` says, and stream the rest just in time.

Resident parts move with the libraries' own `.to()` (bitsandbytes moves its quant state, optimum-quanto
re-packs for the device) and are then checked: every tensor a forward reads must be on the device.
(diffusers' group offloading crashes on NF4 because it moves the packed weight but leaves `absmax` and
`code` on the CPU; `leaf_tensors` is the one list of "what a forward reads" used everywhere here.)

A streamed block list works like this:
- once, at `apply_plan`: each streamed block is brought into the form the device computes with, its
  tensors are packed into one region of a single pinned host buffer (host RAM = 1x the quantized bytes;
  `cudaHostRegister` pins it at its exact size, where `pin_memory()` would round up to a power of two),
  and the block is "parked": its tensors become zero-stride views of a 16-byte buffer.
- `prefetch` GPU slot buffers, each the size of one block, are allocated once. The first `prefetch`
  blocks become "twins": their tensors are views into the slots, so a slot holds whichever block was
  copied into it last and its twin computes with those bytes.
- the ModuleList entry of every streamed block becomes a `StreamedBlock`. Calling it waits for the copy
  of block k into its slot (a CUDA event), runs the twin, records an event, and queues the copy of block
  k + prefetch into the same slot on a side stream, ordered after that event. Nothing is allocated per
  step; the copy is one `copy_` of the block's packed bytes from pinned memory.
The twin runs the same kernels on bit-identical bytes, so streamed output equals resident output
exactly. On a CPU device the same code runs synchronously, so the bookkeeping is testable without a GPU.

CLIP, T5 and the VAE can instead live on the CPU and be moved onto the GPU when their forward starts,
one at a time (a component moves off when another starts). A streamed T5 keeps block 0 (which alone
holds the relative attention bias) with its embedding, and streams blocks 1.. through two slots that
exist only while T5 runs.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .errors import KreaLiteError
from .plan import T5_SLOTS, VAE_TILE_PX, Plan
from .schemes import _bnb

ALIGN = 256  # bytes: each tensor starts 256-aligned in a packed buffer. cuBLASLt picks kernels by pointer
# alignment up to 256 B (torch's _getAlignment), as the caching allocator's 512-aligned blocks give: same kernels.
_PARK_BYTES = 16  # one element of the widest dtype: parked tensors are stride-0 views of it


def _each_leaf(module: nn.Module):
    """Yield (module name, tensor) for every plain tensor a forward of `module` reads (may repeat)."""

    def flat(t):
        if t is None:
            return
        if hasattr(type(t), "__tensor_flatten__"):  # tensor subclass (optimum-quanto): inner tensors hold the bytes
            for name in t.__tensor_flatten__()[0]:
                yield from flat(getattr(t, name))
        else:
            yield t

    def quant_state(qs):  # bitsandbytes 4-bit: absmax, code, offset; with double quant a nested state2
        while qs is not None:
            for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
                yield from flat(t)
            qs = getattr(qs, "state2", None)

    for name, m in module.named_modules():
        for t in [*m._parameters.values(), *m._buffers.values()]:
            yield from ((name, x) for x in flat(t))
            yield from ((name, x) for x in quant_state(getattr(t, "quant_state", None)))
            for attr in ("CB", "SCB"):  # bitsandbytes Int8Params before the first forward
                yield from ((name, x) for x in flat(getattr(t, attr, None)))
        yield from ((name, x) for x in quant_state(getattr(m, "quant_state", None)))
        state = getattr(m, "state", None)
        if state is not None and hasattr(state, "SCB"):  # bitsandbytes MatmulLtState after the first forward
            yield from ((name, x) for x in (*flat(state.CB), *flat(state.SCB)))


def leaf_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every plain tensor a forward of `module` reads, each once, in a fixed order.

    Parameters and buffers; bitsandbytes 4-bit quant states (absmax, code, offset, nested state2);
    LLM.int8 CB/SCB wherever bitsandbytes keeps them (weight or module.state); the inner tensors of
    tensor subclasses such as optimum-quanto's (via `__tensor_flatten__`, recursively).

    Args:
        module: any nn.Module.
    """
    seen, out = set(), []
    for _, t in _each_leaf(module):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


@dataclass(frozen=True)
class _Entry:
    offset: int  # bytes from the start of the block's buffer
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class _Layout:
    """Where each of a module's leaf tensors lives inside one contiguous byte buffer."""

    entries: tuple[_Entry, ...]
    nbytes: int


def _round_up(n: int, k: int = ALIGN) -> int:
    return -(-n // k) * k


def _layout(tensors: list[torch.Tensor]):
    """The packed layout of `tensors` and the copies that fill it: [(storage, start, nbytes, offset)].

    Tensors whose bytes overlap (int8 weight and CB) share one region and keep sharing it; every other
    tensor gets its own region, in order. So the layout depends only on the tensors, not on where they
    happen to live (fresh storages, or views into an earlier packed buffer).
    """
    groups, member, by_storage = [], [], {}  # group: [lo, hi, storage]; member[j]: group of tensors[j]
    for t in tensors:
        es = t.element_size()
        start = t.storage_offset() * es
        end = start + ((1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))) * es if t.numel() else 0)
        st = t.untyped_storage()
        same = by_storage.setdefault(st._cdata, [])
        hits = [g for g in same if start < g[1] and g[0] < end]
        if not hits:
            groups.append([start, end, st])
            same.append(groups[-1])
            member.append(groups[-1])
            continue
        keep = hits[0]
        keep[0], keep[1] = min(start, *(g[0] for g in hits)), max(end, *(g[1] for g in hits))
        member = [keep if any(m is g for g in hits) else m for m in member] + [keep]
        groups = [g for g in groups if g is keep or all(g is not h for h in hits)]
        same[:] = [g for g in same if g is keep or all(g is not h for h in hits)]
    base, copies, offset = {}, [], 0
    for g in groups:
        lo, hi, st = g
        lo -= lo % ALIGN
        base[id(g)] = offset - lo
        if hi > lo:
            copies.append((st, lo, hi - lo, offset))
        offset += _round_up(max(hi - lo, 0))
    entries = tuple(_Entry(base[id(g)] + t.storage_offset() * t.element_size(), t.dtype, tuple(t.shape),
                           tuple(t.stride())) for t, g in zip(tensors, member, strict=True))
    return _Layout(entries, offset), copies


def nbytes(tensors: list[torch.Tensor]) -> int:
    """Bytes `tensors` take packed (shared storage counted once, 256-byte aligned regions)."""
    return _layout(tensors)[0].nbytes


def _bytes(storage, start: int, n: int) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, start, (n,), (1,))


def _view(buf: torch.Tensor, e: _Entry) -> torch.Tensor:
    es = e.dtype.itemsize
    return torch.empty(0, dtype=e.dtype, device=buf.device).set_(
        buf.untyped_storage(), (buf.storage_offset() + e.offset) // es, e.size, e.stride)


def _bind(tensors: list[torch.Tensor], layout: _Layout, buf: torch.Tensor) -> None:
    """Re-point every tensor (in place: every holder of it sees the change) into `buf`."""
    for t, e in zip(tensors, layout.entries, strict=True):
        t.data = _view(buf, e)


def _pack(module: nn.Module, buf: torch.Tensor) -> _Layout:
    """Copy the module's tensors into `buf` (same device) and re-point them there; their old storage is freed."""
    tensors = leaf_tensors(module)
    layout, copies = _layout(tensors)
    if buf.numel() < layout.nbytes:
        raise KreaLiteError(f"internal: a {layout.nbytes}-byte module does not fit a {buf.numel()}-byte buffer")
    for st, start, n, offset in copies:
        buf[offset:offset + n].copy_(_bytes(st, start, n))
    _bind(tensors, layout, buf)
    return layout


def _park(tensors: list[torch.Tensor], park: torch.Tensor) -> None:
    """Point every tensor at a stride-0 view of the tiny `park` buffer: same shapes, no memory."""
    for t in tensors:
        t.data = torch.empty(0, dtype=t.dtype, device=park.device).set_(
            park.untyped_storage(), 0, tuple(t.shape), (0,) * t.dim())


def _canonicalize(module: nn.Module) -> None:
    """Bring bitsandbytes layers into the one form the engine and `leaf_tensors` rely on.

    4-bit: the weight's quant state is the module's, not repacked for CPU/AVX512, with its own `code`
    tensors (bitsandbytes shares one global nested code map between all layers it quantized).
    int8: CB/SCB in `module.state` (what the first forward does), CB the weight's own storage, SCB on
    the weight's device (nn.Module.to moves the weight, not `state`).
    """
    bnb = _bnb()
    done = set()
    for m in module.modules():
        if isinstance(m, bnb.nn.Linear4bit) and getattr(m.weight, "quant_state", None) is not None:
            w = m.weight
            if getattr(w.quant_state, "packing_format_for_cpu", False):
                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

                w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
            m.quant_state = qs = w.quant_state
            while qs is not None and id(qs) not in done:
                done.add(id(qs))
                qs.code = qs.code.clone()
                if qs.absmax.device != w.device:
                    qs.to(w.device)
                qs = qs.state2
        elif isinstance(m, bnb.nn.Linear8bitLt) and m.weight.dtype == torch.int8:
            if getattr(m.weight, "CB", None) is not None:
                m.init_8bit_state()
            m.state.CB = m.weight.data
            if m.state.SCB is not None and m.state.SCB.device != m.weight.device:
                m.state.SCB = m.state.SCB.to(m.weight.device)


def _move(module: nn.Module, device: torch.device) -> None:
    """Move with the libraries' own conversions, then fix what nn.Module.to misses (bitsandbytes state)."""
    nn.Module.to(module, device)  # not ModelMixin.to / PreTrainedModel.to: they refuse bnb models
    _canonicalize(module)


def _require_on(module: nn.Module, device: torch.device, what: str) -> None:
    for name, t in _each_leaf(module):
        if t.device != device:
            raise KreaLiteError(f"{what}.{name} still has a {tuple(t.shape)} tensor on {t.device} after moving to "
                                f"{device}; its quantization library did not move it (please report this)")


def _device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise KreaLiteError(f"device {device} was asked for but torch sees no CUDA GPU")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _host_buffer(n: int, pin: bool) -> tuple[torch.Tensor, weakref.finalize | None]:
    buf = torch.empty(n, dtype=torch.uint8)
    if not pin or n == 0:
        return buf, None
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(buf.data_ptr(), n, 0)
    if int(err) != 0:
        raise KreaLiteError(f"could not pin {n / 2**30:.2f} GiB of host memory for streaming (cudaHostRegister "
                            f"error {int(err)}); free some RAM or raise the memory lock limit (ulimit -l)")
    return buf, weakref.finalize(buf, cudart.cudaHostUnregister, buf.data_ptr())


class StreamedBlock(nn.Module):
    """Stands in for a streamed block in its ModuleList. Holds no tensors; see `_Streamer`."""

    def __init__(self, streamer: _Streamer, pos: int, index: int):
        super().__init__()
        self._streamer, self.pos, self.index = streamer, pos, index

    def forward(self, *args, **kwargs):
        return self._streamer.run(self.pos, args, kwargs)

    def extra_repr(self) -> str:
        return f"{self._streamer.name}[{self.index}], streamed through {self._streamer.p} slots"


class _Streamer:
    """Streams `blocks[i] for i in indices` through `slots` buffers on `device` (see the module docstring).

    Block `indices[pos]` is called "pos" below. In steady state the slots hold the blocks about to run,
    in order; after block pos runs, its slot receives block (pos + slots) % n, i.e. the wrap-around
    prefetches the first blocks of the next step while the rest of this one computes. A call for a
    block that is not in a slot (first call after `release`, or calls out of order) reloads all slots
    from it ("miss").
    """

    def __init__(self, name: str, blocks: nn.ModuleList, indices, device: torch.device, slots: int,
                 profile: bool = False):
        self.name, self.blocks, self.indices, self.device = name, blocks, list(indices), device
        self.n, self.p, self.cuda, self.profile = len(self.indices), min(slots, len(self.indices)), \
            device.type == "cuda", profile
        if self.n == 0 or slots < 1:
            raise KreaLiteError(f"internal: streaming {name} needs blocks and at least one slot")
        self.twins, self.parked, self.slots = [], {}, []
        self.holds, self.where = [-1] * self.p, {}
        self.copied_bytes = self.copies = self.misses = 0
        self._waits, self._unchecked = [], set(range(self.p))
        self._park = torch.zeros(_PARK_BYTES, dtype=torch.uint8, device=device)
        if self.cuda:
            self.stream = torch.cuda.Stream(device)
            self.copied = [torch.cuda.Event() for _ in range(self.p)]
            self.computed = [torch.cuda.Event() for _ in range(self.p)]
        self.host = self._unpin = self.layout = None
        try:
            for pos, i in enumerate(self.indices):
                self._take(pos, i)
        except BaseException:
            self.remove()
            raise

    def _take(self, pos: int, i: int) -> None:
        block = self.blocks[i]
        if isinstance(block, StreamedBlock):
            raise KreaLiteError(f"{self.name}[{i}] is already streamed; call remove() on the earlier placement")
        _move(block, self.device)  # the form the device computes with (quanto re-packs int4 per device)
        _require_on(block, self.device, f"{self.name}[{i}]")
        if not self.cuda:  # bitsandbytes would repack 4-bit weights in place on their first CPU forward
            bnb = _bnb()
            for m in block.modules():
                if isinstance(m, bnb.nn.Linear4bit):
                    m.support_avx512bf16_for_cpu = False
        tensors = leaf_tensors(block)
        ours = [b for b in (self.host, self._park, *self.slots) if b is not None]
        for t in tensors:
            if t.numel() and any(b.data_ptr() <= t.data_ptr() < b.data_ptr() + b.numel() for b in ours):
                raise KreaLiteError(f"{self.name}[{i}] shares a tensor with another streamed block; streaming "
                                    "needs every block to own its tensors")
        layout, _ = _layout(tensors)
        signature = (tuple(type(m).__qualname__ for m in block.modules()), layout)
        if self.layout is None:
            self.layout, self._signature, self.stride = layout, signature, _round_up(layout.nbytes)
            self.host, self._unpin = _host_buffer(self.n * self.stride, pin=self.cuda)
        elif signature != self._signature:
            raise KreaLiteError(f"{self.name}[{i}] is laid out differently from {self.name}[{self.indices[0]}] "
                                "(other layers, schemes or shapes); keep it resident")
        buf = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)
        _pack(block, buf)  # the block now lives in one device buffer ...
        self._pack_of(pos).copy_(buf)  # ... and, once and for all, in pinned host memory
        if pos < self.p:
            self.twins.append(block)
            self.slots.append(buf)
            self.holds[pos], self.where[pos] = pos, pos
        else:
            _park(tensors, self._park)
            self.parked[pos] = block
        self.blocks[i] = StreamedBlock(self, pos, i)

    def _pack_of(self, pos: int) -> torch.Tensor:
        return self.host[pos * self.stride: pos * self.stride + self.layout.nbytes]

    def run(self, pos: int, args, kwargs):
        if not self.slots:
            self._acquire()
        k = self.where.get(pos)
        if k is None:
            k = self._warm(pos)
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            if self.profile:
                before = torch.cuda.Event(enable_timing=True)
                before.record(compute)
            compute.wait_event(self.copied[k])
            if self.profile:
                after = torch.cuda.Event(enable_timing=True)
                after.record(compute)
                self._waits.append((before, after))
        out = self.twins[k](*args, **kwargs)
        if k in self._unchecked:
            self._verify(k)
        if self.cuda:
            self.computed[k].record(compute)
        nxt = (pos + self.p) % self.n
        if nxt not in self.where:
            self._load(k, nxt)
        return out

    def _load(self, k: int, pos: int) -> None:
        if self.holds[k] >= 0:
            del self.where[self.holds[k]]
        self.holds[k], self.where[pos] = pos, k
        src = self._pack_of(pos)
        if self.cuda:
            self.stream.wait_event(self.computed[k])  # the last compute that read slot k is done
            with torch.cuda.stream(self.stream):
                self.slots[k].copy_(src, non_blocking=True)
            self.copied[k].record(self.stream)
        else:
            self.slots[k].copy_(src)
        self.copied_bytes += src.numel()
        self.copies += 1

    def _warm(self, pos: int) -> int:
        self.misses += 1
        self.holds, self.where = [-1] * self.p, {}
        for k in range(self.p):
            self._load(k, (pos + k) % self.n)
        return 0

    def _verify(self, k: int) -> None:
        """After a twin's first forward: did a library re-point a weight (then later copies would miss it)?"""
        self._unchecked.discard(k)
        tensors, slot = leaf_tensors(self.twins[k]), self.slots[k]
        ok = len(tensors) == len(self.layout.entries) and all(
            t.numel() == 0 or t.data_ptr() == slot.data_ptr() + e.offset
            for t, e in zip(tensors, self.layout.entries, strict=True))
        if not ok:
            raise KreaLiteError(f"a layer of {self.name} replaced its weights during its first forward, so it "
                                "cannot be streamed; keep these blocks resident")

    def _sync(self) -> None:
        if self.cuda:  # later work on the compute stream (and memory it reuses) comes after pending copies
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def _acquire(self) -> None:
        with torch.inference_mode(False):  # slots may be made inside a forward; they must outlive inference mode
            self.slots = [torch.empty(self.layout.nbytes, dtype=torch.uint8, device=self.device)
                          for _ in range(self.p)]
            for twin, slot in zip(self.twins, self.slots, strict=True):
                _bind(leaf_tensors(twin), self.layout, slot)
        if self.cuda:  # the side stream writes the new slots: order it after compute that used that memory
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self.holds, self.where = [-1] * self.p, {}

    def release(self) -> None:
        """Free the GPU slots (the twins are parked); the next call allocates them again."""
        if not self.slots:
            return
        self._sync()
        for twin in self.twins:
            _park(leaf_tensors(twin), self._park)
        self.slots, self.holds, self.where = [], [-1] * self.p, {}

    def remove(self) -> None:
        """Put every block back into its ModuleList as an ordinary module: on the CPU, in the libraries'
        own CPU form (undoing `_move`), or, on a CPU device, in a buffer of its own."""
        self._sync()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for pos, i in enumerate(self.indices[:len(self.twins) + len(self.parked)]):
            block = self.twins[pos] if pos < len(self.twins) else self.parked[pos]
            buf = torch.empty(self.layout.nbytes, dtype=torch.uint8, device=self.device)
            buf.copy_(self._pack_of(pos))
            _bind(leaf_tensors(block), self.layout, buf)
            if self.cuda:
                _move(block, torch.device("cpu"))
            self.blocks[i] = block
        self.twins, self.parked, self.slots = [], {}, []
        if self._unpin is not None:
            self._unpin()
        self.host = self._unpin = None

    def stats(self, reset: bool = False) -> dict:
        out = {"bytes_copied": self.copied_bytes, "copies": self.copies, "misses": self.misses,
               "slots": self.p, "slot_bytes": self.layout.nbytes, "blocks": self.n}
        if self._waits:
            torch.cuda.synchronize(self.device)
            ms = [a.elapsed_time(b) for a, b in self._waits]
            out.update(wait_ms=sum(ms), waits_over_0_1ms=sum(m > 0.1 for m in ms), waited_calls=len(ms))
        if reset:
            self.copied_bytes = self.copies = self.misses = 0
            self._waits = []
        return out


class _OnDemand:
    """Components kept on the CPU and moved onto the GPU when their forward starts; at most one at a time."""

    def __init__(self, device: torch.device):
        self.device, self.members, self.loaded = device, {}, None
        self.moves, self.seconds = 0, 0.0

    def add(self, name: str, module: nn.Module, streamer: _Streamer | None = None) -> None:
        _move(module, torch.device("cpu"))
        self.members[name] = (module, streamer)

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
            self._swap(name)

    def _swap(self, name: str) -> None:
        start = time.perf_counter()
        if self.loaded is not None:
            module, streamer = self.members[self.loaded]
            if streamer is not None:
                streamer.release()
            _move(module, torch.device("cpu"))
            self.loaded = None
        if name in self.members:
            module, _ = self.members[name]
            _move(module, self.device)
            _require_on(module, self.device, name)
            self.loaded = name
            self.moves += 1
        self.seconds += time.perf_counter() - start


class Placement:
    """What `apply_plan` did: `stats()` for profiling, `remove()` to undo it."""

    def __init__(self, pipe, plan: Plan, device: torch.device):
        self.pipe, self.plan, self.device = pipe, plan, device
        self.streamers: dict[str, _Streamer] = {}
        self.on_demand = _OnDemand(device)
        self._hooks, self._tiling_was = [], None

    def stats(self, reset: bool = False) -> dict:
        """Per streamed list: bytes copied, copies, misses (and with profile=True, ms the compute stream
        waited on copies); on-demand moves and their seconds. Counters are cumulative unless reset."""
        out = {name: s.stats(reset) for name, s in self.streamers.items()}
        out["on_demand"] = {"moves": self.on_demand.moves, "seconds": round(self.on_demand.seconds, 3),
                            "on_gpu": self.on_demand.loaded}
        if reset:
            self.on_demand.moves, self.on_demand.seconds = 0, 0.0
        return out

    def remove(self) -> None:
        """Undo `apply_plan`: blocks back in their ModuleLists, hooks removed, every component on the CPU."""
        with torch.inference_mode(False), torch.no_grad():
            self._remove()

    def _remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.on_demand.use("")  # evicts whatever is loaded
        for s in self.streamers.values():
            s.remove()
        self.streamers = {}
        cpu = torch.device("cpu")
        for name in ("transformer", "text_encoder_2", "text_encoder", "vae"):
            if (m := getattr(self.pipe, name, None)) is not None:
                _move(m, cpu)
        if self._tiling_was is not None:
            vae = self.pipe.vae
            vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = self._tiling_was
        self._tiling_was = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


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
        A `Placement`: `stats()` (bytes copied, waits), `remove()` (undo, back to the CPU).
    """
    device = _device(device)
    _check_matches(pipe, plan)
    placement = Placement(pipe, plan, device)
    try:
        with torch.inference_mode(False), torch.no_grad():
            _place(pipe, plan, placement, profile)
    except BaseException:
        placement.remove()
        raise
    return placement


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
        for attr, idx in (("transformer_blocks", plan.streamed_double),
                          ("single_transformer_blocks", plan.streamed_single)):
            if idx:
                placement.streamers[attr] = _Streamer(f"transformer.{attr}", getattr(tr, attr), idx, device,
                                                      plan.prefetch, profile)
        _move(tr, device)
        _require_on(tr, device, "transformer")
    if t5 is not None:
        if plan.t5_streamed:
            s = _Streamer("text_encoder_2.encoder.block", t5.encoder.block, range(1, len(t5.encoder.block)),
                          device, T5_SLOTS, profile)
            s.release()
            placement.streamers["text_encoder_2"] = s
            on_demand.add("text_encoder_2", t5, s)
        else:
            _move(t5, device)
            _require_on(t5, device, "text_encoder_2")
    for name, on_gpu in (("text_encoder", plan.clip_on_gpu), ("vae", plan.vae_on_gpu)):
        if (m := getattr(pipe, name, None)) is None:
            continue
        if on_gpu:
            _move(m, device)
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
