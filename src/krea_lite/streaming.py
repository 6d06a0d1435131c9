"""The block streamer: blocks of a ModuleList that live in pinned host memory and run on the GPU.

Every streamed block stays the real module in its ModuleList; what changes is where its tensors point.
- once, at placement: the block is brought into the form the device computes with, and its tensors are
  packed into its own region of one pinned host buffer (host RAM = 1x the quantized bytes; see
  `compat.pinned_empty`). That region is the block's home: between calls its tensors point there, so
  `state_dict()`, `named_modules()`, adapters and hooks see the block as it is.
- `p` GPU slots, each the size of one block, are allocated once; block `pos` always runs in slot
  `pos % p`, through views made once per slot.
- a diffusers `ModelHook` on each block: `pre_forward` makes the compute stream wait for the copy of the
  block into its slot (a CUDA event) and points the block's tensors at the slot's views; `post_forward`
  records an event, points them home again, and queues on a side stream, ordered after that event, the
  copy of the next block that uses the same slot (`pos + p`, wrapping to the first blocks of the next
  step). Nothing is allocated per step; a copy is one `copy_` of the block's packed bytes.
The block runs its own kernels on bit-identical bytes, so streamed output equals resident output exactly.
On a CPU device the same code runs synchronously, so the bookkeeping is testable without a GPU.

A tensor of a block that is not at home when `pre_forward` runs was replaced after placement (e.g.
`fuse_lora` on a bf16 base): if it has the same dtype and shape its new bytes are written into the
block's home and the slot is reloaded; otherwise streaming refuses in one line. Tensors added to a block
after placement (LoRA factors) are not streamed: `adopt_new_tensors` keeps them resident on the device.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from . import compat
from .errors import KreaLiteError
from .packing import Layout, bind, is_adapter, layout_of, leaf_tensors, pack, round_up, view_of

HOOK_NAME = "krea_lite_streaming"


class _StreamHook(compat.model_hook_base()):
    """Brings one streamed block's weights into its GPU slot around its forward (see the module docstring)."""

    def __init__(self, streamer: BlockStreamer, pos: int):
        super().__init__()
        self._streamer, self.pos = weakref.ref(streamer), pos

    def _get(self) -> BlockStreamer:
        streamer = self._streamer()
        if streamer is None:
            raise KreaLiteError("this block was streamed by a placement that was dropped without close(); keep the "
                                "Placement (pipe.krea_lite.placement) alive, or close() it to get the block back")
        return streamer

    @torch.compiler.disable  # runs eagerly: a regional compile of the block compiles only its forward
    def pre_forward(self, module, *args, **kwargs):
        self._get().enter(self.pos)
        return args, kwargs

    @torch.compiler.disable
    def post_forward(self, module, output):
        self._get().leave(self.pos)
        return output


class BlockStreamer:
    """Streams `blocks[i] for i in indices` through `slots` buffers on `device`.

    Block `indices[pos]` is called "pos" below; it runs in slot `pos % p`. After block pos runs, its slot
    receives the next block that uses it. A call for a block that is not in its slot (the first call
    after `release`, or calls out of order) copies it there first ("miss").
    """

    def __init__(self, name: str, blocks: nn.ModuleList, indices, device: torch.device, slots: int,
                 profile: bool = False):
        self.name, self.blocks, self.indices, self.device = name, blocks, list(indices), device
        self.n, self.cuda, self.profile = len(self.indices), device.type == "cuda", profile
        self.p = min(slots, self.n)
        if self.n == 0 or slots < 1:
            raise KreaLiteError(f"internal: streaming {name} needs blocks and at least one slot")
        self.tensors: list[list[torch.Tensor]] = []  # per pos: the block's leaf tensors
        self.home: list[list[torch.Tensor]] = []  # per pos: views of its home region, one per tensor
        self.home_ptrs: list[list[int]] = []
        self.slots: list[torch.Tensor] = []
        self.slot_views: list[list[torch.Tensor]] = []  # per slot: views, one per tensor
        self.holds = [-1] * self.p  # which pos each slot holds (or is being copied)
        self.copied_bytes = self.copies = self.misses = self.refreshed = 0
        self._waits, self._unverified = [], set(range(self.n))
        self.layout: Layout | None = None
        self.host = self._unpin = None
        if self.cuda:
            self.stream = torch.cuda.Stream(device)
            self.copied = [torch.cuda.Event() for _ in range(self.p)]
            self.computed = [torch.cuda.Event() for _ in range(self.p)]
        try:
            for pos, i in enumerate(self.indices):
                self._take(pos, i)
            for pos, i in enumerate(self.indices):
                compat.add_model_hook(self.blocks[i], _StreamHook(self, pos), HOOK_NAME)
            self._acquire()
        except BaseException:
            self.remove()
            raise

    # --- placement -------------------------------------------------------------------------------

    def _take(self, pos: int, i: int) -> None:
        block = self.blocks[i]
        if compat.get_model_hook(block, HOOK_NAME) is not None:
            raise KreaLiteError(f"{self.name}[{i}] is already streamed; close the earlier placement first")
        compat.move(block, self.device)  # the form the device computes with (quanto re-packs int4 per device)
        _require_on(block, self.device, f"{self.name}[{i}]")
        if not self.cuda:
            compat.keep_cpu_layout(block)
        tensors = leaf_tensors(block, adapters=False)  # LoRA factors stay resident (adopt_new_tensors)
        if self.host is not None:
            lo, hi = self.host.data_ptr(), self.host.data_ptr() + self.host.numel()
            if any(t.numel() and lo <= t.data_ptr() < hi for t in tensors):
                raise KreaLiteError(f"{self.name}[{i}] shares a tensor with another streamed block; streaming "
                                    "needs every block to own its tensors")
        layout, _ = layout_of(tensors)
        # the base layers' classes (a peft wrapper counts as the layer it wraps): a LoRA on some blocks only
        # leaves their streamed bytes alike
        signature = (tuple(type(getattr(m, "base_layer", m)).__qualname__ for n, m in block.named_modules()
                           if not is_adapter(n) and n.rpartition(".")[2] != "base_layer"), layout)
        if self.layout is None:
            self.layout, self._signature, self.stride = layout, signature, round_up(layout.nbytes)
            self.host, self._unpin = compat.pinned_empty(self.n * self.stride, pin=self.cuda)
        elif signature != self._signature:
            raise KreaLiteError(f"{self.name}[{i}] is laid out differently from {self.name}[{self.indices[0]}] "
                                "(other layers, schemes or shapes); keep it resident")
        home = self._home_of(pos)
        if self.cuda:
            buf = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)
            pack(block, buf, adapters=False)  # the block in one device buffer, then once and for all in pinned host memory
            home.copy_(buf)
            bind(tensors, layout, home)
            del buf
        else:
            pack(block, home, adapters=False)
        self.tensors.append(tensors)
        self.home.append([view_of(home, e) for e in layout.entries])
        self.home_ptrs.append([v.data_ptr() for v in self.home[-1]])

    def _home_of(self, pos: int) -> torch.Tensor:
        return self.host[pos * self.stride: pos * self.stride + self.layout.nbytes]

    def _acquire(self) -> None:
        with torch.inference_mode(False):  # slots may be made inside a forward; they must outlive inference mode
            self.slots = [torch.empty(self.layout.nbytes, dtype=torch.uint8, device=self.device)
                          for _ in range(self.p)]
            self.slot_views = [[view_of(s, e) for e in self.layout.entries] for s in self.slots]
        if self.cuda:  # the side stream writes the new slots: order it after compute that used that memory
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self.holds = [-1] * self.p
        for k in range(self.p):  # prefetch the first block of every slot
            self._load(k, k)

    # --- the hot path ----------------------------------------------------------------------------

    def enter(self, pos: int) -> None:
        """Before block pos runs: its bytes in its slot, its tensors pointing there."""
        if not self.slots:
            self._acquire()
        k = pos % self.p
        if self.holds[k] != pos:
            self.misses += 1
            self._load(k, pos)
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
        stale = None
        for j, (t, v, ptr) in enumerate(zip(self.tensors[pos], self.slot_views[k], self.home_ptrs[pos],
                                            strict=True)):
            if t.data_ptr() != ptr:
                stale = stale or []
                stale.append((j, t.data))
            t.data = v
        if stale:
            self._refresh(pos, k, stale)

    def leave(self, pos: int) -> None:
        """After block pos ran: its tensors home again, the next user of its slot on its way."""
        k = pos % self.p
        if self.cuda:
            self.computed[k].record(torch.cuda.current_stream(self.device))
        if pos in self._unverified:
            self._verify(pos, k)
        for t, v in zip(self.tensors[pos], self.home[pos], strict=True):
            t.data = v
        nxt = pos + self.p if pos + self.p < self.n else k
        if self.holds[k] != nxt:
            self._load(k, nxt)

    def _load(self, k: int, pos: int) -> None:
        self.holds[k] = pos
        src = self._home_of(pos)
        if self.cuda:
            self.stream.wait_event(self.computed[k])  # the last compute that read slot k is done
            with torch.cuda.stream(self.stream):
                self.slots[k].copy_(src, non_blocking=True)
            self.copied[k].record(self.stream)
        else:
            self.slots[k].copy_(src)
        self.copied_bytes += src.numel()
        self.copies += 1

    # --- what can change a streamed block after placement --------------------------------------------

    def _refresh(self, pos: int, k: int, stale: list[tuple[int, torch.Tensor]]) -> None:
        """Tensors of block pos were replaced since placement: write their new bytes into its home and
        reload its slot (the views keep the same layout, so only same dtype and shape can be taken)."""
        entries = self.layout.entries
        for j, new in stale:
            e = entries[j]
            if new.dtype != e.dtype or tuple(new.shape) != e.size:
                raise KreaLiteError(
                    f"a tensor of {self.name}[{self.indices[pos]}] was replaced after placement by one of another "
                    f"dtype or shape ({tuple(new.shape)} {new.dtype}, was {e.size} {e.dtype}); a streamed block "
                    "cannot take that: place the pipeline again (krea_lite.pipeline.place) after changing weights")
            self.home[pos][j].copy_(new)
        self.refreshed += 1
        self._sync()
        self._load(k, pos)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.copied[k])

    def adopt_new_tensors(self) -> int:
        """Tensors added to streamed blocks after placement (adapters) stay resident: move every tensor
        a block reads that is not one of its streamed tensors onto the device. Returns how many moved."""
        moved = 0
        for pos, i in enumerate(self.indices):
            ours = {id(t) for t in self.tensors[pos]}
            for m in self.blocks[i].modules():
                for store in (m._parameters, m._buffers):
                    for t in store.values():
                        if t is not None and id(t) not in ours and t.device != self.device:
                            with torch.no_grad():
                                t.data = t.data.to(self.device)
                            moved += 1
        return moved

    def _verify(self, pos: int, k: int) -> None:
        """After a block's first forward: did a library re-point a weight (then later copies would miss it)?"""
        self._unverified.discard(pos)
        slot = self.slots[k]
        lo, hi = slot.data_ptr(), slot.data_ptr() + slot.numel()
        now = {id(t) for t in leaf_tensors(self.blocks[self.indices[pos]])}
        if not all(id(t) in now and (t.numel() == 0 or lo <= t.data_ptr() < hi) for t in self.tensors[pos]):
            raise KreaLiteError(f"a layer of {self.name} replaced its weights during its first forward, so it "
                                "cannot be streamed; keep these blocks resident")

    # --- lifetime --------------------------------------------------------------------------------

    def _sync(self) -> None:
        if self.cuda:  # later work on the compute stream (and memory it reuses) comes after pending copies
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def release(self) -> None:
        """Free the GPU slots (every block is at home); the next call allocates them again."""
        if not self.slots:
            return
        self._sync()
        self.slots, self.slot_views, self.holds = [], [], [-1] * self.p

    def remove(self) -> None:
        """Make every block an ordinary module again, on the CPU, in the libraries' own CPU form (undoing
        `compat.move`), with its own memory; then unpin the host buffer."""
        self._sync()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for i in self.indices:
            compat.remove_model_hook(self.blocks[i], HOOK_NAME)
        for pos, tensors in enumerate(self.tensors):
            block = self.blocks[self.indices[pos]]
            buf = torch.empty(self.layout.nbytes, dtype=torch.uint8, device=self.device)
            buf.copy_(self._home_of(pos))
            bind(tensors, self.layout, buf)
            if self.cuda:
                compat.move(block, torch.device("cpu"))
        self.tensors, self.home, self.home_ptrs, self.slots, self.slot_views = [], [], [], [], []
        if self._unpin is not None:
            self._unpin()
        self.host = self._unpin = None

    def stats(self, reset: bool = False) -> dict:
        out = {"bytes_copied": self.copied_bytes, "copies": self.copies, "misses": self.misses,
               "slots": self.p, "slot_bytes": self.layout.nbytes if self.layout else 0, "blocks": self.n,
               "refreshed": self.refreshed}
        if self._waits:
            torch.cuda.synchronize(self.device)
            ms = [a.elapsed_time(b) for a, b in self._waits]
            out.update(wait_ms=sum(ms), waits_over_0_1ms=sum(m > 0.1 for m in ms), waited_calls=len(ms))
        if reset:
            self.copied_bytes = self.copies = self.misses = self.refreshed = 0
            self._waits = []
        return out


def _require_on(module: nn.Module, device: torch.device, what: str) -> None:
    from .packing import each_leaf

    for name, t in each_leaf(module):
        if t.device != device:
            raise KreaLiteError(f"{what}.{name} still has a {tuple(t.shape)} tensor on {t.device} after moving to "
                                f"{device}; its quantization library did not move it (please report this)")
