"""Tensor discovery and packing: every plain tensor a module's forward reads, laid out in one byte buffer.

`leaf_tensors` is the one list of "what a forward reads" used everywhere (the planner's sizes, the
streaming engine's copies, the checks that a move reached every tensor): parameters, buffers,
bitsandbytes quant states and int8 scales, and the inner tensors of tensor subclasses such as
optimum-quanto's. `_layout`/`_pack`/`_bind` put those tensors into one contiguous buffer and point them
at it, so a block can be copied with one `copy_`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import KreaLiteError

ALIGN = 256  # bytes: each tensor starts 256-aligned in a packed buffer. cuBLASLt picks kernels by pointer
# alignment up to 256 B (torch's _getAlignment), as the caching allocator's 512-aligned blocks give: same kernels.


ADAPTER_PREFIX = "lora_"  # peft's adapter containers: lora_A, lora_B, lora_embedding_A/B, lora_magnitude_vector


def is_adapter(name: str) -> bool:
    """Whether the module at dotted path `name` belongs to a peft LoRA adapter (its factors, not its base)."""
    return any(part.startswith(ADAPTER_PREFIX) for part in name.split("."))


def each_leaf(module: nn.Module, adapters: bool = True):
    """Yield (module name, tensor) for every plain tensor a forward of `module` reads (may repeat);
    `adapters=False` leaves out the tensors of peft LoRA adapters (see `is_adapter`)."""

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
        if not adapters and is_adapter(name):
            continue
        for t in [*m._parameters.values(), *m._buffers.values()]:
            yield from ((name, x) for x in flat(t))
            yield from ((name, x) for x in quant_state(getattr(t, "quant_state", None)))
            for attr in ("CB", "SCB"):  # bitsandbytes Int8Params before the first forward
                yield from ((name, x) for x in flat(getattr(t, attr, None)))
        yield from ((name, x) for x in quant_state(getattr(m, "quant_state", None)))
        state = getattr(m, "state", None)
        if state is not None and hasattr(state, "SCB"):  # bitsandbytes MatmulLtState after the first forward
            yield from ((name, x) for x in (*flat(state.CB), *flat(state.SCB)))


def leaf_tensors(module: nn.Module, adapters: bool = True) -> list[torch.Tensor]:
    """Every plain tensor a forward of `module` reads, each once, in a fixed order.

    Parameters and buffers; bitsandbytes 4-bit quant states (absmax, code, offset, nested state2);
    LLM.int8 CB/SCB wherever bitsandbytes keeps them (weight or module.state); the inner tensors of
    tensor subclasses such as optimum-quanto's (via `__tensor_flatten__`, recursively).

    Args:
        module: any nn.Module.
        adapters: include peft LoRA adapters' factors (False: the base weights only, what streams).
    """
    seen, out = set(), []
    for _, t in each_leaf(module, adapters):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


@dataclass(frozen=True)
class Entry:
    offset: int  # bytes from the start of the block's buffer
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class Layout:
    """Where each of a module's leaf tensors lives inside one contiguous byte buffer."""

    entries: tuple[Entry, ...]
    nbytes: int


def round_up(n: int, k: int = ALIGN) -> int:
    return -(-n // k) * k


def layout_of(tensors: list[torch.Tensor]):
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
        offset += round_up(max(hi - lo, 0))
    entries = tuple(Entry(base[id(g)] + t.storage_offset() * t.element_size(), t.dtype, tuple(t.shape),
                           tuple(t.stride())) for t, g in zip(tensors, member, strict=True))
    return Layout(entries, offset), copies


def nbytes(tensors: list[torch.Tensor]) -> int:
    """Bytes `tensors` take packed (shared storage counted once, 256-byte aligned regions)."""
    return layout_of(tensors)[0].nbytes


def _bytes(storage, start: int, n: int) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, start, (n,), (1,))


def view_of(buf: torch.Tensor, e: Entry) -> torch.Tensor:
    es = e.dtype.itemsize
    return torch.empty(0, dtype=e.dtype, device=buf.device).set_(
        buf.untyped_storage(), (buf.storage_offset() + e.offset) // es, e.size, e.stride)


def bind(tensors: list[torch.Tensor], layout: Layout, buf: torch.Tensor) -> None:
    """Re-point every tensor (in place: every holder of it sees the change) into `buf`."""
    for t, e in zip(tensors, layout.entries, strict=True):
        t.data = view_of(buf, e)


def pack(module: nn.Module, buf: torch.Tensor, adapters: bool = True) -> Layout:
    """Copy the module's tensors (`adapters`: see `leaf_tensors`) into `buf` (same device) and re-point them
    there; their old storage is freed."""
    tensors = leaf_tensors(module, adapters)
    layout, copies = layout_of(tensors)
    if buf.numel() < layout.nbytes:
        raise KreaLiteError(f"internal: a {layout.nbytes}-byte module does not fit a {buf.numel()}-byte buffer")
    for st, start, n, offset in copies:
        buf[offset:offset + n].copy_(_bytes(st, start, n))
    bind(tensors, layout, buf)
    return layout
