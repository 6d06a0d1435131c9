"""compile_transformer: regional torch.compile of the FLUX transformer's repeated blocks, cached on disk.

What is compiled: the *forward function* of each repeated block class (FluxTransformerBlock,
FluxSingleTransformerBlock), once per class, bound to every instance as `block.forward`. Not
`nn.Module.compile` / diffusers' `compile_repeated_blocks`: those compile `_call_impl`, so Dynamo traces
through the block's forward pre/post hooks, and a hook wrapped in `torch.compiler.disable` (the
streaming engine's, which re-point a block's tensors into a GPU slot) becomes a graph break around
every block call. Compiled at the forward instead:
- nn.Module forward pre/post hooks run in `_call_impl`, outside the compiled code;
- a diffusers `HookRegistry` hook registered afterwards wraps `module.forward`, i.e. wraps the compiled
  function, and removing it restores it. So call this *before* streaming hooks are put on the blocks;
  a block that already has an instance-level forward (a hook wrapper) is refused.
The blocks' tensors are graph inputs (Dynamo inlines nn.Modules), not constants, so one graph per
class serves every block, and tensors re-pointed between calls (same shapes and strides) need no
recompile. dynamic=False, the default mode: no CUDA graphs (their static addresses would contradict
moving weights).

The compiled artifacts (Inductor's FX graph cache, AOTAutograd's cache, Triton kernels) go to a
krea-lite cache folder, so a second process skips the backend compile (Dynamo still traces).
"""

from __future__ import annotations

import os
import shutil
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import KreaLiteError

DEFAULT_CACHE = "~/.cache/krea-lite/compile"


@dataclass(frozen=True)
class CompileResult:
    """What `compile_transformer` did.

    Args:
        compiled: False when the compiler cannot run here (then `reason` says why; nothing changed).
        reason: the one line printed when not compiled.
        backend: the torch.compile backend.
        cache_dir: where compiled artifacts are cached (None when not compiled).
        blocks: how many blocks got a compiled forward, by class name.
        check_seconds: time spent checking that the compiler runs (a tiny compile).
    """

    compiled: bool
    reason: str | None
    backend: str
    cache_dir: str | None
    blocks: dict[str, int]
    check_seconds: float


def compile_counters() -> dict[str, int]:
    """Process-wide torch.compile counters; the difference of two reads is what happened in between.

    "graphs" counts every graph Dynamo captured (a recompile adds one): `graphs` after the timed steps
    minus `graphs` after warm-up is the number of recompiles after warm-up. "graph_breaks" counts
    breaks at trace time. The cache entries count Inductor FX graph and AOTAutograd cache lookups.
    """
    from torch._dynamo.utils import counters

    return {
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
        "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
        "autograd_cache_hit": counters["aot_autograd"]["autograd_cache_hit"],
        "autograd_cache_miss": counters["aot_autograd"]["autograd_cache_miss"],
    }


def _missing_toolchain(backend: str, device: torch.device) -> str | None:
    """What the backend lacks here, checked cheaply before trying it."""
    if backend != "inductor":
        return None
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton for the GPU (pip install triton)"
    compilers = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    if not any(c and shutil.which(c) for c in compilers):
        return "a C++ compiler on the CPU (g++ or clang++; or set CXX)"
    return None


def _check(backend: str, device: torch.device) -> str | None:
    """None if a tiny function compiles and runs with `backend` on `device`, else what is missing."""
    if (missing := _missing_toolchain(backend, device)) is not None:
        return missing

    def tiny(x):
        return torch.nn.functional.silu(x * 2.0 + 1.0)

    try:
        x = torch.ones(16, device=device)
        if not torch.allclose(torch.compile(tiny, backend=backend, dynamic=False)(x), tiny(x)):
            return f"a working {backend} backend (a test function compiled to wrong results)"
    except Exception as e:  # noqa: BLE001  any failure of the toolchain: run uncompiled
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return f"a working {backend} toolchain ({type(e).__name__}: {first})"
    return None


def _timed_first_call(transformer: nn.Module, cache_dir: str, device: torch.device) -> None:
    """Print how long the first transformer call (which compiles the blocks) took, then unhook."""
    state = {}

    def pre(module, args):
        state["t0"], state["before"] = time.perf_counter(), compile_counters()

    def post(module, args, output):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = compile_counters()
        d = {k: now[k] - state["before"][k] for k in now}
        hits = d["fxgraph_cache_hit"]
        print(f"krea-lite: first compiled transformer call {time.perf_counter() - state['t0']:.1f} s "
              f"({d['graphs']} graphs traced, {d['graph_breaks']} graph breaks; Inductor cache {hits} hits, "
              f"{d['fxgraph_cache_miss']} misses in {cache_dir})")
        for h in handles:
            h.remove()

    handles = [transformer.register_forward_pre_hook(pre), transformer.register_forward_hook(post)]


def compile_transformer(transformer: nn.Module, cache_dir: str | Path | None = None, device=None,
                        backend: str = "inductor") -> CompileResult:
    """Compile the transformer's repeated blocks in place (regional compile), or say why not.

    Call it after loading and before placing/streaming (see the module docstring). Compilation
    itself happens lazily, in the first transformer call, which prints its time.

    Args:
        transformer: a diffusers transformer with `_repeated_blocks` (FluxTransformer2DModel).
        cache_dir: where compiled artifacts are kept across processes; default ~/.cache/krea-lite/compile.
            Sets TORCHINDUCTOR_CACHE_DIR (Triton's cache follows it unless TRITON_CACHE_DIR is set).
        device: the device the blocks will compute on; default CUDA when available, else the CPU.
        backend: torch.compile backend ("inductor"; "aot_eager"/"eager" for tests without a compiler).

    Returns:
        A CompileResult; when the compiler cannot run, `compiled` is False, one line was printed
        ("`--compile` needs ...; continuing uncompiled") and the transformer is unchanged.
    """
    from .w8a8 import prepare

    names = tuple(getattr(transformer, "_repeated_blocks", None) or ())
    blocks = [m for m in transformer.modules() if type(m).__name__ in names]
    if not blocks:
        raise KreaLiteError(f"{type(transformer).__name__} has no repeated blocks to compile (no _repeated_blocks)")
    hooked = next((b for b in blocks if "forward" in vars(b)), None)
    if hooked is not None:
        raise KreaLiteError(f"a {type(hooked).__name__} already has its own forward (compiled, or a hook wrapper): "
                            "compile the transformer once, before streaming is applied")
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")

    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)  # read by Inductor whenever it opens its caches
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True

    t0 = time.perf_counter()
    missing = _check(backend, device)
    check_seconds = round(time.perf_counter() - t0, 2)
    if missing is not None:
        reason = f"`--compile` needs {missing}; continuing uncompiled"
        print(f"krea-lite: {reason}")
        return CompileResult(False, reason, backend, None, {}, check_seconds)

    prepare(transformer, device)  # 8-bit layers choose kernel or dequantizing now, not inside the trace
    counts: dict[str, int] = {}
    for cls in dict.fromkeys(type(b) for b in blocks):
        compiled = torch.compile(cls.forward, backend=backend, dynamic=False)  # mode default: no CUDA graphs
        for b in blocks:
            if type(b) is cls:
                b.forward = types.MethodType(compiled, b)
                counts[cls.__name__] = counts.get(cls.__name__, 0) + 1
    _timed_first_call(transformer, str(cache), device)
    print(f"krea-lite: torch.compile ({backend}) of {len(blocks)} blocks "
          f"({', '.join(f'{n} x{c}' for n, c in counts.items())}); the first step compiles them, "
          f"cached in {cache}")
    return CompileResult(True, None, backend, str(cache), counts, check_seconds)
