"""Every call krea-lite makes into a library's private or version-specific API, in one place.

Each piece says which library behaviour it relies on. `check_versions` compares the installed versions
with the ranges these were tested on (pyproject.toml pins the same ranges) and says once, in one line,
when a library is outside them.
"""

from __future__ import annotations

import sys
import weakref

import torch
from torch import nn

from .errors import KreaLiteError

# The ranges the private-API uses below were tested with (CPU: torch 2.13; GPU machine: torch 2.11).
TESTED = {
    "torch": ("2.11", "2.14"),
    "diffusers": ("0.42.1", "0.43"),
    "transformers": ("5.17", "5.25"),
    "bitsandbytes": ("0.50", "0.51"),
    "optimum-quanto": ("0.2.7", "0.2.8"),
}
_warned: set[str] = set()


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def check_versions(names=tuple(TESTED)) -> list[str]:
    """One line on stderr (once per process and library) for each library outside its tested range."""
    from importlib.metadata import PackageNotFoundError, version

    outside = []
    for name in names:
        try:
            have = version(name)
        except PackageNotFoundError:
            continue
        lo, hi = TESTED[name]
        if not _version_tuple(lo) <= _version_tuple(have) < _version_tuple(hi):
            outside.append(name)
            if name not in _warned:
                _warned.add(name)
                print(f"krea-lite: warning: {name} {have} is outside the tested range >={lo},<{hi}; "
                      "streaming relies on its internals, so check results with `krea-lite bench`", file=sys.stderr)
    return outside


def bnb():
    try:
        import bitsandbytes
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise KreaLiteError("bitsandbytes is not installed: pip install 'bitsandbytes>=0.50,<0.51'") from e
    return bitsandbytes


# --- bitsandbytes --------------------------------------------------------------------------------


def canonicalize(module: nn.Module) -> None:
    """Bring bitsandbytes layers into the one form the engine and `packing.leaf_tensors` rely on.

    4-bit: the weight's quant state is the module's, not repacked for CPU/AVX512 (bitsandbytes 0.50's
    `packing_format_for_cpu`, undone with its private `_convert_weight_packed_for_cpu_inverse`), with its
    own `code` tensors (bitsandbytes shares one global nested code map between all layers it quantized).
    int8: CB/SCB in `module.state` (what the first forward does, via `init_8bit_state`), CB the weight's own
    storage, SCB on the weight's device (nn.Module.to moves the weight, not `state`).
    """
    b = bnb()
    done = set()
    for m in module.modules():
        if isinstance(m, b.nn.Linear4bit) and getattr(m.weight, "quant_state", None) is not None:
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
        elif isinstance(m, b.nn.Linear8bitLt) and m.weight.dtype == torch.int8:
            if getattr(m.weight, "CB", None) is not None:
                m.init_8bit_state()
            m.state.CB = m.weight.data
            if m.state.SCB is not None and m.state.SCB.device != m.weight.device:
                m.state.SCB = m.state.SCB.to(m.weight.device)


def keep_cpu_layout(module: nn.Module) -> None:
    """bitsandbytes 0.50 repacks 4-bit weights in place on their first CPU forward (AVX512 path); a
    streamed or packed weight must keep its bytes where they are."""
    b = bnb()
    for m in module.modules():
        if isinstance(m, b.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def move(module: nn.Module, device: torch.device) -> None:
    """Move with the libraries' own conversions, then fix what nn.Module.to misses (bitsandbytes state).

    nn.Module.to, not ModelMixin.to / PreTrainedModel.to: those refuse to move quantized models."""
    nn.Module.to(module, device)
    canonicalize(module)


# --- pinned host memory (CUDA runtime through torch.cuda.cudart) -----------------------------------------


def pinned_empty(n: int, pin: bool) -> tuple[torch.Tensor, weakref.finalize | None]:
    """`n` bytes of host memory, page-locked at exactly that size when `pin` (`cudaHostRegister`;
    `pin_memory()` would round up to a power of two). The finalizer unpins; call it to unpin now."""
    buf = torch.empty(n, dtype=torch.uint8)
    if not pin or n == 0:
        return buf, None
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(buf.data_ptr(), n, 0)
    if int(err) != 0:
        raise KreaLiteError(f"could not pin {n / 2**30:.2f} GiB of host memory for streaming (cudaHostRegister "
                            f"error {int(err)}); free some RAM or raise the memory lock limit (ulimit -l)")
    return buf, weakref.finalize(buf, cudart.cudaHostUnregister, buf.data_ptr())


# --- diffusers / transformers conventions ------------------------------------------------------------


def model_hook_base():
    """diffusers' ModelHook, the base of the hooks the streaming engine puts on blocks."""
    from diffusers.hooks import ModelHook

    return ModelHook


def add_model_hook(module: nn.Module, hook, name: str) -> None:
    from diffusers.hooks import HookRegistry

    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


def get_model_hook(module: nn.Module, name: str):
    registry = getattr(module, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(name)


def remove_model_hook(module: nn.Module, name: str) -> None:
    registry = getattr(module, "_diffusers_hook", None)
    if registry is not None:
        registry.remove_hook(name, recurse=False)


def mark_quantized(model: nn.Module, component: str, scheme: str, quantization_config: dict | None) -> None:
    """Give a component rebuilt by krea-lite what `from_pretrained` gives a quantized model, so that the
    libraries treat it as one (diffusers/transformers refuse dtype casts; pipelines skip moving it).

    bitsandbytes: `quantization_method`, `is_loaded_in_4bit`/`is_loaded_in_8bit` and `hf_quantizer` (from
    the folder's own `quantization_config`), as their quantizers' `_process_model_*_weight_loading` set.
    optimum-quanto and the other schemes: `is_quantized` and the method name, which ModelMixin.to checks.
    """
    if scheme == "bf16":
        return
    if component == "transformer":
        from diffusers.quantizers import DiffusersAutoQuantizer as Auto
        from diffusers.quantizers.quantization_config import QuantizationMethod
    else:
        from transformers.quantizers import AutoHfQuantizer as Auto
        from transformers.utils.quantization_config import QuantizationMethod
    if quantization_config is not None and quantization_config.get("quant_method") == "bitsandbytes":
        model.hf_quantizer = Auto.from_config(quantization_config, pre_quantized=True)
        model.quantization_method = QuantizationMethod.BITS_AND_BYTES
        if quantization_config.get("load_in_4bit"):
            model.is_loaded_in_4bit = True
        else:
            model.is_loaded_in_8bit = True
    else:
        model.quantization_method = "quanto" if scheme.startswith("q") else scheme
    if component == "transformer":  # transformers derives is_quantized from hf_quantizer
        model.is_quantized = True


def move_own(module: nn.Module, device: torch.device) -> None:
    """Move a module's own parameters and buffers, not its children's (nn.Module._apply, recurse=False)."""
    module._apply(lambda t: t.to(device), recurse=False)
