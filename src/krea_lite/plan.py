"""plan_for_budget: which weights live on the GPU, which stream, for a VRAM budget.

One budget, used alike by `krea-lite generate --vram-gb N`, `load_pipeline(vram_gb=N)` and the bench:
`Budget(card_gib=N)` is a card of N GiB. The CUDA context, cuBLAS workspaces and kernels take
`CUDA_CONTEXT_BYTES` (0.85 GiB) of it outside torch's caching allocator, so the allocator gets N - 0.85
GiB: the planner plans for exactly that, and `Budget.enforce` holds the process to exactly that
(`torch.cuda.set_per_process_memory_fraction`), so --vram-gb 8 on a larger card behaves like an 8 GB card.

A generation has three phases, and the plan must fit the largest of them:
    encode   CLIP, then T5 (text tokens only)
    denoise  the transformer, once per step (the phase that must run at resident speed)
    decode   the VAE
Weights the transformer needs every step are the last to leave the GPU. The planner walks one fixed
list of placements, from "everything resident" to "everything streamed", and takes the first that
fits; so a smaller budget never streams less. In that list, things move off the GPU in the order of
what they cost per image:
    1. T5 streams (it runs once per prompt: ~4 GB over PCIe is ~0.2 s per prompt),
    2. the VAE decodes in tiles,
    3. single blocks stream, from the end of the list: a single block does the same FLOPs as a
       double block with 2.4x fewer bytes (15 d^2 vs 36 d^2 weights), so its copy hides best
       under compute; double blocks, the least compute per byte, stay resident the longest,
    4. CLIP and the VAE are moved onto the GPU only while they run,
    5. double blocks stream, from the end of the list.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import KreaLiteError

GiB = 2**30
TEXT_TOKENS = 512  # FLUX.1 [dev] pads the T5 prompt to 512 tokens

# Activation model, calibrated on an H200 (torch 2.11, diffusers 0.42.1, full-size synthetic NF4 FLUX,
# 2026-11-27): peak allocated minus the weights at rest. Every estimate the planner makes comes from these.
# One transformer step: a fixed part plus a part linear in batch x (image + text) tokens (SDPA attention
# memory is linear). Measured 0.50 GiB at 1024^2 (4096 + 512 tokens) and 0.25 GiB at 512^2 (1024 + 512).
STEP_ACTIVATION_FIXED_BYTES = int(0.15 * GiB)
STEP_ACTIVATION_BYTES_PER_TOKEN = int(0.085 * GiB / 1000)
VAE_DECODE_BYTES_PER_PIXEL = 2.5 * GiB / (1024 * 1024)  # untiled bf16 decode, batch 1 (measured 2.41 GiB at 1024^2)
VAE_TILE_PX = 512  # tiled decode: 512 px tiles (64 latents), 25% overlap (diffusers' default overlap)
VAE_TILED_BYTES = int(0.65 * GiB)  # tiled decode per image with VAE_TILE_PX tiles, any image size (measured 0.64)
ENCODE_ACTIVATION_BYTES = int(0.25 * GiB)  # T5-XXL at 512 tokens (+ CLIP), per prompt (measured 0.25)
# LoRA adapters (peft's unmerged side branch, base(x) + B(A(x)) * scale) hold one more layer output at a
# time: per token, at most the widest Linear output of the transformer (12288 bf16 values, 24 KiB). Counted
# twice for the add's temporary. An estimate from the shapes (not yet a measured peak).
LORA_STEP_BYTES_PER_TOKEN = 2 * 12288 * 2
# A card of N GiB gives torch's allocator less than N: the CUDA context, cuBLAS workspaces and kernels live
# outside it. On the H200 above, device memory used minus peak reserved was 0.68-0.76 GiB with NF4 and
# 0.74-0.84 GiB with bitsandbytes int8 (a lower bound). `--vram-gb` names the card.
CUDA_CONTEXT_BYTES = int(0.85 * GiB)
# What the allocator reserves beyond the estimate: fragmentation (reserved - allocated) and the small tensors
# not modelled (latents, RoPE tables, scheduler state). Measured peak reserved - peak allocated: 0.03-0.06
# GiB with a tiled decode, up to 0.47 GiB with an untiled 1024^2 decode.
MARGIN_BYTES = int(0.4 * GiB)

PREFETCH = 2  # GPU slots per streamed block list: block k computes while block k+1 is copied
PREFETCH_ROOMY = 3  # used when the budget has room for it: one more block of slack for the copies
T5_SLOTS = 2  # T5 runs once per prompt: double buffering is plenty
SHRINK_BLOCKS = 4  # each level of `conservative` streams this many more blocks


@dataclass(frozen=True)
class Sizes:
    """Bytes of every tensor each part's forward reads (see `measure`).

    Block tuples are indexed like the modules: `transformer_blocks[i]` is
    `transformer.transformer_blocks[i]`, `t5_blocks[i]` is `text_encoder_2.encoder.block[i]`.
    A component that is absent has size 0 (and no blocks).
    """

    transformer_blocks: tuple[int, ...]
    single_transformer_blocks: tuple[int, ...]
    t5_blocks: tuple[int, ...]
    transformer_rest: int  # embedders, norm_out, proj_out
    t5_rest: int  # shared embedding, final norm
    text_encoder: int  # CLIP-L
    vae: int
    adapters: int = 0  # LoRA factors in the transformer's blocks: never streamed, resident beside them
    format_version: int = 1

    def __post_init__(self):
        for name in ("transformer_blocks", "single_transformer_blocks", "t5_blocks"):
            v = getattr(self, name)
            if not isinstance(v, tuple) or any(not isinstance(b, int) or b < 0 for b in v):
                raise KreaLiteError(f"Sizes.{name} must be a tuple of byte counts, got {v!r}")
        for name in ("transformer_rest", "t5_rest", "text_encoder", "vae", "adapters"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise KreaLiteError(f"Sizes.{name} must be a byte count, got {v!r}")

    @property
    def transformer(self) -> int:
        return (self.transformer_rest + self.adapters + sum(self.transformer_blocks)
                + sum(self.single_transformer_blocks))

    @property
    def text_encoder_2(self) -> int:
        return self.t5_rest + sum(self.t5_blocks)


def adapter_nbytes(module) -> int:
    """Bytes of the peft LoRA factors under `module` (`Sizes.adapters`), as `measure` counts them."""
    from .packing import leaf_tensors, nbytes

    base = {id(t) for t in leaf_tensors(module, adapters=False)}
    return nbytes([t for t in leaf_tensors(module) if id(t) not in base])


def measure(pipe) -> Sizes:
    """Bytes of every component of a FluxPipeline and of every block of its three block lists.

    Counts every tensor a forward reads, once: parameters, buffers, bitsandbytes quant states and
    int8 scales, optimum-quanto's inner tensors (`packing.leaf_tensors`).

    Args:
        pipe: a FluxPipeline (or any object with `transformer`, `text_encoder_2`, `text_encoder`,
            `vae`; a missing or None component counts 0). Call it before `apply_plan`.
    """
    from .packing import leaf_tensors, nbytes

    def blocks_and_rest(module, lists):
        if module is None:
            return [()] * len(lists), 0, 0
        sizes, inside = [], set()
        for get in lists:  # what a block streams: its base weights, not the LoRA factors beside them
            blocks = get(module)
            sizes.append(tuple(nbytes(leaf_tensors(b, adapters=False)) for b in blocks))
            inside |= {id(t) for b in blocks for t in leaf_tensors(b, adapters=False)}
        rest = nbytes([t for t in leaf_tensors(module, adapters=False) if id(t) not in inside])
        return sizes, rest, adapter_nbytes(module)

    tr, t5 = getattr(pipe, "transformer", None), getattr(pipe, "text_encoder_2", None)
    (double, single), tr_rest, adapters = blocks_and_rest(
        tr, [lambda m: m.transformer_blocks, lambda m: m.single_transformer_blocks])
    (t5_blocks,), t5_rest, _ = blocks_and_rest(t5, [lambda m: m.encoder.block])
    whole = {n: getattr(pipe, n, None) for n in ("text_encoder", "vae")}
    return Sizes(
        transformer_blocks=double, single_transformer_blocks=single, t5_blocks=t5_blocks,
        transformer_rest=tr_rest, t5_rest=t5_rest, adapters=adapters,
        **{n: 0 if m is None else nbytes(leaf_tensors(m)) for n, m in whole.items()},
    )


@dataclass(frozen=True)
class Plan:
    """Where every weight lives. Build it with `plan_for_budget`; apply it with `placement.apply_plan`.

    Blocks not listed as streamed stay resident on the GPU. Streamed blocks live in pinned host
    memory and are copied into `prefetch` GPU slots per list, just before they run.
    """

    sizes: Sizes
    budget_bytes: int | None  # allocator cap; None: no limit
    width: int
    height: int
    batch: int
    streamed_double: tuple[int, ...]  # indices into transformer.transformer_blocks
    streamed_single: tuple[int, ...]  # indices into transformer.single_transformer_blocks
    prefetch: int  # GPU slots per streamed transformer list
    t5_streamed: bool  # False: T5 resident on the GPU; True: on the GPU only while encoding, blocks 1.. streamed
    clip_on_gpu: bool  # False: moved onto the GPU only while encoding
    vae_on_gpu: bool  # False: moved onto the GPU only while decoding
    vae_tiled: bool  # vae.enable_tiling()
    step_activation_bytes: int
    decode_activation_bytes: int
    encode_activation_bytes: int
    margin_bytes: int
    phase_bytes: tuple[tuple[str, int], ...]  # predicted peak of each phase, margin excluded
    conservative: int = 0
    spread: bool = False  # streamed blocks spread through each list (plan_for_budget(spread=True))
    format_version: int = 1

    def __post_init__(self):
        for name, n in (("streamed_double", len(self.sizes.transformer_blocks)),
                        ("streamed_single", len(self.sizes.single_transformer_blocks))):
            idx = getattr(self, name)
            if any(not 0 <= i < n for i in idx) or list(idx) != sorted(set(idx)):
                raise KreaLiteError(f"Plan.{name}={idx} must be sorted, distinct block indices below {n}")
        if self.prefetch < 1:
            raise KreaLiteError(f"Plan.prefetch={self.prefetch} must be at least 1")
        if self.t5_streamed and len(self.sizes.t5_blocks) < 2:
            raise KreaLiteError("Plan.t5_streamed needs a T5 with at least 2 blocks (block 0 stays with the rest)")

    @property
    def resident_double(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.sizes.transformer_blocks)) if i not in self.streamed_double)

    @property
    def resident_single(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.sizes.single_transformer_blocks)) if i not in self.streamed_single)

    @property
    def streamed_bytes(self) -> int:
        """Bytes copied host -> GPU per denoising step: every streamed transformer block, once."""
        return (sum(self.sizes.transformer_blocks[i] for i in self.streamed_double)
                + sum(self.sizes.single_transformer_blocks[i] for i in self.streamed_single))

    @property
    def peak_bytes(self) -> int:
        """The predicted peak of the allocator's use (largest phase), margin excluded."""
        return max(b for _, b in self.phase_bytes)

    @property
    def peak_phase(self) -> str:
        return max(self.phase_bytes, key=lambda p: p[1])[0]

    def shrink(self) -> Plan:
        """A more conservative plan for the same inputs, to retry after a CUDA out-of-memory error:
        one more margin, tiled VAE, `SHRINK_BLOCKS` more streamed blocks. Raises KreaLiteError when
        nothing smaller fits."""
        smaller = plan_for_budget(self.sizes, self.budget_bytes, width=self.width, height=self.height,
                                  batch=self.batch, conservative=self.conservative + 1, spread=self.spread)
        if (smaller.streamed_double, smaller.streamed_single, smaller.vae_tiled) == (
                self.streamed_double, self.streamed_single, self.vae_tiled) and self.conservative:
            raise KreaLiteError(f"out of GPU memory with every block already streamed at a budget of "
                                f"{self.budget_bytes / GiB:.2f} GiB; give a smaller --vram-gb or smaller images")
        return smaller

    def table(self) -> str:
        """A short table: component, where it lives, GiB."""
        s = self.sizes

        def gib(n):
            return f"{n / GiB:6.2f}"

        def span(idx):
            runs, start = [], None
            for a, b in zip(idx, [*idx[1:], None], strict=True):
                start = a if start is None else start
                if b != a + 1:
                    runs.append(f"{start}" if start == a else f"{start}-{a}")
                    start = None
            return ",".join(runs)

        rows = [("transformer (embedders, norm_out)", "gpu", s.transformer_rest)] if s.transformer else []
        if s.adapters:
            rows.append(("LoRA adapters (never streamed)", "gpu", s.adapters))
        for name, sizes, streamed in (("transformer_blocks", s.transformer_blocks, self.streamed_double),
                                      ("single_transformer_blocks", s.single_transformer_blocks,
                                       self.streamed_single)):
            resident = [i for i in range(len(sizes)) if i not in streamed]
            if resident:
                rows.append((f"{name} {span(resident)}", "gpu", sum(sizes[i] for i in resident)))
            if streamed:
                slots = self.prefetch * max(sizes[i] for i in streamed)
                rows.append((f"{name} {span(list(streamed))}",
                             f"streamed, {self.prefetch} slots ({gib(slots).strip()} GiB)",
                             sum(sizes[i] for i in streamed)))
        if s.text_encoder_2:
            where = (f"gpu while encoding, blocks {span(list(range(1, len(s.t5_blocks))))} streamed, {T5_SLOTS} slots"
                     if self.t5_streamed else "gpu")
            rows.append(("text_encoder_2 (T5)", where, s.text_encoder_2))
        if s.text_encoder:
            rows.append(("text_encoder (CLIP)", "gpu" if self.clip_on_gpu else "gpu while encoding", s.text_encoder))
        if s.vae:
            where = ("gpu" if self.vae_on_gpu else "gpu while decoding") + (", tiled" if self.vae_tiled else "")
            rows.append(("vae", where, s.vae))
        width = max(len(r[0]) for r in rows) + 2
        wide = max(*(len(r[1]) for r in rows), len("step / decode / encode")) + 2
        budget = "no limit" if self.budget_bytes is None else f"{self.budget_bytes / GiB:.2f} GiB"
        lines = [f"plan for {self.width}x{self.height}, batch {self.batch}, budget {budget}"
                 + (f" (conservative {self.conservative})" if self.conservative else ""),
                 f"{'component':<{width}}{'where':<{wide}}{'GiB':>6}"]
        small = s.transformer + s.text_encoder_2 + s.text_encoder + s.vae < GiB // 10  # a tiny test model
        lines += [f"{a:<{width}}{b:<{wide}}{gib(c)}" + (f"  ({c / 2**20:.1f} MiB)" if small else "")
                  for a, b, c in rows]
        lines.append(f"{'activations':<{width}}{'step / decode / encode':<{wide}}"
                     f"{gib(self.step_activation_bytes)} / {self.decode_activation_bytes / GiB:.2f}"
                     f" / {self.encode_activation_bytes / GiB:.2f}")
        lines.append(f"{'margin':<{width}}{'':<{wide}}{gib(self.margin_bytes)}")
        phases = ", ".join(f"{p} {b / GiB:.2f}" for p, b in self.phase_bytes)
        lines.append(f"{'predicted peak':<{width}}{self.peak_phase:<{wide}}{gib(self.peak_bytes)}  ({phases})")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Choice:
    t5_streamed: bool
    vae_tiled: bool
    clip_on_gpu: bool
    vae_on_gpu: bool
    n_single: int  # streamed from the end of single_transformer_blocks
    n_double: int  # streamed from the end of transformer_blocks
    prefetch: int = PREFETCH


def _choices(s: Sizes) -> list[_Choice]:
    """Every placement the planner considers, from everything resident to everything streamed."""
    can_t5 = len(s.t5_blocks) >= 2
    out = [_Choice(False, False, True, True, 0, 0)]
    if can_t5:
        out.append(_Choice(True, False, True, True, 0, 0))
    out.append(_Choice(can_t5, True, True, True, 0, 0))
    n_s, n_d = len(s.single_transformer_blocks), len(s.transformer_blocks)
    out += [_Choice(can_t5, True, True, True, k, 0) for k in range(1, n_s + 1)]
    out.append(_Choice(can_t5, True, False, False, n_s, 0))
    out += [_Choice(can_t5, True, False, False, n_s, k) for k in range(1, n_d + 1)]
    return out


def _phases(s: Sizes, c: _Choice, step_act: int, decode_act: int, encode_act: int) -> tuple[tuple[str, int], ...]:
    lists = ((s.transformer_blocks, c.n_double), (s.single_transformer_blocks, c.n_single))
    resident = sum(sum(b[:len(b) - n]) for b, n in lists)
    # GPU slots of the streamed blocks; freed while an on-demand component (T5, CLIP, VAE) runs (placement._OnDemand)
    slots = sum(c.prefetch * max(b[len(b) - n:]) for b, n in lists if n)
    transformer = s.transformer_rest + s.adapters + resident + slots
    t5_on_demand = (s.t5_rest + s.t5_blocks[0] + T5_SLOTS * max(s.t5_blocks[1:])) if c.t5_streamed else 0
    always = (transformer + (0 if c.t5_streamed else s.text_encoder_2)
              + (s.text_encoder if c.clip_on_gpu else 0) + (s.vae if c.vae_on_gpu else 0))
    encode = (max(t5_on_demand, 0 if c.clip_on_gpu else s.text_encoder) + encode_act
              if s.text_encoder or s.text_encoder_2 else 0)
    decode = (0 if c.vae_on_gpu else s.vae) + decode_act if s.vae else 0
    encode_freed = slots if (c.t5_streamed and s.text_encoder_2) or (not c.clip_on_gpu and s.text_encoder) else 0
    decode_freed = slots if not c.vae_on_gpu and s.vae else 0
    return (("encode", always - encode_freed + encode), ("denoise", always + step_act),
            ("decode", always - decode_freed + decode))


MAX_CARD_GIB = 4096  # larger than any GPU made: a bound for typos such as --vram-gb 8000000


@dataclass(frozen=True)
class Budget:
    """A card's memory, the one meaning of `--vram-gb` / `vram_gb=` everywhere (see the module docstring).

    Attributes:
        card_gib: the card's memory in GiB.
        context_bytes: what the CUDA context takes of it, outside torch's allocator.
    """

    card_gib: float
    context_bytes: int = CUDA_CONTEXT_BYTES

    def __post_init__(self):
        import math

        v = self.card_gib
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v > MAX_CARD_GIB:
            raise KreaLiteError(f"--vram-gb / vram_gb= {v!r} is not a card size; give the card's memory in GiB, "
                                f"e.g. 8 (at most {MAX_CARD_GIB})")
        if not v * GiB > self.context_bytes:
            raise KreaLiteError(f"a card of {v:g} GiB (--vram-gb / vram_gb=) leaves nothing for the model after the CUDA context "
                                f"({self.context_bytes / GiB:.2f} GiB); give the card's memory in GiB, e.g. 8")

    @property
    def allocator_bytes(self) -> int:
        """What torch's caching allocator may reserve: the card less the CUDA context."""
        return int(self.card_gib * GiB) - self.context_bytes

    def enforce(self, device) -> None:
        """Hold this process's allocator on `device` (a CUDA device) to `allocator_bytes`."""
        import torch

        device = torch.device(device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, self.allocator_bytes / total), index)


def card_budget(vram_gb: float) -> int:
    """The allocator's budget on a card with `vram_gb` GiB: `Budget(vram_gb).allocator_bytes`."""
    return Budget(vram_gb).allocator_bytes


def _free_cuda_bytes() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info()[0]


def _which(blocks: tuple[int, ...], n: int, spread: bool) -> tuple[int, ...]:
    """The n blocks of a list that stream: its tail, or (spread, all blocks one size) evenly spaced."""
    total = len(blocks)
    if spread and n and len(set(blocks)) == 1:
        return tuple(sorted({int((i + 0.5) * total / n) for i in range(n)}))
    return tuple(range(total - n, total))


def plan_for_budget(sizes: Sizes, budget_bytes: int | None, width: int = 1024, height: int = 1024,
                    batch: int = 1, conservative: int = 0, spread: bool = False) -> Plan:
    """Decide which weights stay on the GPU and which stream, for a VRAM budget.

    Args:
        sizes: from `measure(pipe)`.
        budget_bytes: what torch's caching allocator may reserve (the cap of
            `torch.cuda.set_per_process_memory_fraction`; the CUDA context is outside it).
            None: what the current CUDA device has free, or no limit when there is no CUDA device.
        width, height, batch: the largest images that will be generated; activations are planned
            for them.
        conservative: 0 for the normal plan; each level adds one more margin, tiles the VAE and
            streams `SHRINK_BLOCKS` more blocks (what `Plan.shrink` asks for after an OOM).
        spread: stream blocks spread evenly through each list instead of its tail (same count, same
            bytes; only for lists whose blocks are all one size). When copies are slower than compute, a
            run of resident blocks leaves the copy engine idle once the slots are full; spread out, it
            has a freed slot to fill after every streamed block. Experimental: not yet measured.

    Returns:
        The first placement, from everything resident towards everything streamed, whose predicted
        peak plus margin fits the budget.

    Raises:
        KreaLiteError: nothing fits; the message says the smallest budget that would.
    """
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v <= 0 or v % 16:
            raise KreaLiteError(f"{name} {v} must be a positive multiple of 16 (e.g. 1024)")
    if not isinstance(batch, int) or batch <= 0:
        raise KreaLiteError(f"batch {batch} must be a positive integer")
    if budget_bytes is not None and budget_bytes <= 0:
        raise KreaLiteError(f"the VRAM budget must be positive, got {budget_bytes / GiB:.2f} GiB")
    if conservative < 0:
        raise KreaLiteError(f"conservative={conservative} must be 0 or more")
    budget = _free_cuda_bytes() if budget_bytes is None else budget_bytes

    tokens = batch * ((height // 16) * (width // 16) + TEXT_TOKENS)
    step_act = (STEP_ACTIVATION_FIXED_BYTES + STEP_ACTIVATION_BYTES_PER_TOKEN * tokens
                + (LORA_STEP_BYTES_PER_TOKEN * tokens if sizes.adapters else 0))
    untiled = int(VAE_DECODE_BYTES_PER_PIXEL * width * height * batch)
    tiled = min(untiled, VAE_TILED_BYTES * batch)
    encode_act = ENCODE_ACTIVATION_BYTES * batch
    margin = MARGIN_BYTES * (1 + conservative)

    def evaluate(c: _Choice):
        phases = _phases(sizes, c, step_act, tiled if c.vae_tiled else untiled, encode_act)
        return phases, budget is None or max(b for _, b in phases) + margin <= budget

    choices = _choices(sizes)
    if conservative:
        first_tiled = next(i for i, c in enumerate(choices) if c.vae_tiled)
        choices = choices[first_tiled:]
    found = next((i for i, c in enumerate(choices) if evaluate(c)[1]), None)
    if found is None:
        need = max(b for _, b in evaluate(choices[-1])[0]) + margin
        raise KreaLiteError(
            f"a VRAM budget of {budget / GiB:.2f} GiB (what torch may allocate, CUDA context excluded) is too small for {width}x{height}, batch {batch}: even with "
            f"every block streamed and a tiled VAE it needs {need / GiB:.2f} GiB; give at least "
            f"--vram-gb {(need + CUDA_CONTEXT_BYTES + GiB // 20) / GiB:.1f}, or generate smaller images")
    if conservative:
        # Move SHRINK_BLOCKS further along the streaming part of the list, then on to the next that fits.
        first_stream = next((i for i, c in enumerate(choices) if c.n_single or c.n_double), len(choices) - 1)
        start = max(found, first_stream - 1) + SHRINK_BLOCKS * conservative
        found = next((i for i in range(min(start, len(choices) - 1), len(choices)) if evaluate(choices[i])[1]),
                     found)
    choice = choices[found]
    if not conservative and (choice.n_single or choice.n_double):
        roomy = replace(choice, prefetch=PREFETCH_ROOMY)
        choice = roomy if evaluate(roomy)[1] else choice
    phases = evaluate(choice)[0]
    return Plan(
        sizes=sizes, budget_bytes=budget, width=width, height=height, batch=batch,
        streamed_double=_which(sizes.transformer_blocks, choice.n_double, spread),
        streamed_single=_which(sizes.single_transformer_blocks, choice.n_single, spread), spread=spread,
        prefetch=choice.prefetch, t5_streamed=choice.t5_streamed, clip_on_gpu=choice.clip_on_gpu,
        vae_on_gpu=choice.vae_on_gpu, vae_tiled=choice.vae_tiled and untiled > tiled and sizes.vae > 0,
        step_activation_bytes=step_act, decode_activation_bytes=tiled if choice.vae_tiled else untiled,
        encode_activation_bytes=encode_act, margin_bytes=margin, phase_bytes=phases, conservative=conservative,
    )
