"""8-bit weights times 8-bit activations: the `fp8mm` and `int8mm` schemes' Linear.

Both store the weight (out, in) in 8 bits with one float32 scale per output channel (row absmax /
qmax), and quantize each token's activations the same way at run time (row absmax of the input).
- fp8mm: float8 e4m3 (qmax 448), `torch._scaled_mm` with row-wise scales and a bf16 result.
  Tensor-core fp8 needs CUDA compute capability 8.9+ (Ada RTX 40, Hopper, Blackwell).
- int8mm: int8 (qmax 127, round to nearest), `torch._int_mm` (exact int32 accumulation), then both
  scales. Needs compute capability 8.0+ (Ampere RTX 30 and newer).
Anywhere else (the CPU, an older GPU, a torch build whose kernel fails a one-time probe) the same
module computes by dequantizing: the same 8-bit activation and weight values as bf16 (exactly
representable), a bf16 matmul, then both scales: the kernels' operands, so results agree with the
fast path up to accumulation/rounding order. It says so in one line per scheme and reason.

Everything a forward reads is a plain tensor (`weight`, `weight_scale` buffers, `bias` parameter), so
the streaming engine can pack and re-point them like any other module's tensors. Why not torchao:
its Float8Tensor/Int8Tensor run `_scaled_mm`/`_int_mm` unconditionally once activations are
quantized (a kernel error, not a fallback, on a card without them), its safetensors support is a
prototype module that moved between releases, and it is not a dependency of the CPU install.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import KreaLiteError

SCALE_MIN = 1e-12  # an all-zero row (weight or token) gets this scale instead of 0: its values quantize to 0
FP8_FAST_ACCUM = True  # _scaled_mm's faster, slightly less exact fp32 accumulation (torchao's inference default)
INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA needs more than 16 rows: fewer (the adaLN linears, M = batch) are padded


@dataclass(frozen=True)
class Kind:
    """One 8-bit format and the kernel that multiplies it."""

    scheme: str  # the registry name in schemes.SCHEMES
    dtype: torch.dtype
    qmax: float  # largest magnitude stored: row absmax maps onto it
    capability: tuple[int, int]  # minimum CUDA compute capability of the kernel
    kernel: str
    multiple: int  # the kernel wants in_features and out_features to be multiples of this

    @property
    def needs(self) -> str:
        return f"{self.capability[0]}.{self.capability[1]}"


KINDS = {
    "fp8": Kind("fp8mm", torch.float8_e4m3fn, 448.0, (8, 9), "torch._scaled_mm", 16),
    "int8": Kind("int8mm", torch.int8, 127.0, (8, 0), "torch._int_mm", 8),
}
_EIGHT_BIT = (torch.float8_e4m3fn, torch.int8, torch.uint8)


def quantize_rows(x: torch.Tensor, kind: Kind) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): x (rows, cols) ~= q * scale, scale (rows, 1) float32 = row absmax / qmax.

    One float32 temporary the size of x (in eager: the layer input of the single blocks' proj_out at
    1024² is 4608 x 15360, 270 MiB); abs and max are exact in x's own dtype."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = (amax / kind.qmax).clamp(min=SCALE_MIN)
    v = x.to(torch.float32, copy=True).div_(scale)  # copy: an fp32 x must not be changed in place
    if kind.dtype == torch.int8:
        v.round_()  # to nearest, ties to even; fp8's .to() rounds the same way
    return v.clamp_(-kind.qmax, kind.qmax).to(kind.dtype), scale


def quantize_weight(weight: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A Linear weight (out, in) -> (8-bit weight (out, in), float32 per-output-channel scale (out,))."""
    q, scale = quantize_rows(weight, KINDS[kind])
    return q, scale.reshape(-1)


# --- the three ways to multiply -----------------------------------------------------------------


def _fp8_mm(xq, sx, wq, sw, bias):
    # mat2 must be column-major: wq is (out, in) row-major, so wq.t() is (in, out) column-major, no copy.
    return torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw.view(1, -1), bias=bias, out_dtype=torch.bfloat16,
                            use_fast_accum=FP8_FAST_ACCUM)


def _int8_mm(xq, sx, wq, sw):
    m = xq.shape[0]
    if m < INT_MM_MIN_ROWS:
        xq = F.pad(xq, (0, 0, 0, INT_MM_MIN_ROWS - m))
    acc = torch._int_mm(xq, wq.t())[:m]  # int32, exact
    return acc.float().mul_(sx).mul_(sw).to(torch.bfloat16)


def _dequantized_mm(xq, sx, wq, sw):
    # fp8 e4m3 values and integers up to 127 are exact in bf16: the products are the kernels' products.
    acc = F.linear(xq.to(torch.bfloat16), wq.to(torch.bfloat16))
    return acc.float().mul_(sx).mul_(sw).to(torch.bfloat16)


# --- which way, on which device -------------------------------------------------------------------

_ROUTES: dict[tuple[str, str], tuple[str, str | None]] = {}  # (kind, device) -> ("kernel" | "dequantize", reason)
_SAID: set[str] = set()


def _say(line: str) -> None:
    """Print `line` once per process."""
    if line not in _SAID:
        _SAID.add(line)
        print(f"krea-lite: {line}")


def _full(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _card(device: torch.device) -> tuple[str, tuple[int, int]]:
    """(name, compute capability) of a CUDA device."""
    return torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device))


def _instead(kind: Kind, capability: tuple[int, int]) -> str:
    if kind.scheme == "fp8mm" and capability >= KINDS["int8"].capability:
        return "; int8mm runs natively on this card (krea-lite quantize --transformer int8mm)"
    return "; no 8-bit matmul runs natively on this card (int8mm needs 8.0+): nf4 is smaller at the same speed"


def _probe(name: str, device: torch.device) -> str | None:
    """Run the kernel once as forward does (1 and 33 rows; fp8 with a fused bias too); None if it works
    and agrees with dequantizing."""
    kind = KINDS[name]
    try:
        g = torch.Generator(device=device).manual_seed(0)
        wq, sw = quantize_weight(torch.randn(48, 32, device=device, generator=g), name)
        bias = torch.randn(48, device=device, generator=g).to(torch.bfloat16)
        for rows, with_bias in ((1, False), (33, False), (33, True)):
            xq, sx = quantize_rows(torch.randn(rows, 32, device=device, generator=g), kind)
            b = bias if with_bias else None
            if kind.dtype != torch.int8:
                fast = _fp8_mm(xq, sx, wq, sw, b)
            else:
                fast = _int8_mm(xq, sx, wq, sw) + (0 if b is None else b)
            ref = _dequantized_mm(xq, sx, wq, sw).float() + (0 if b is None else b.float())
            if not ((fast.float() - ref).norm() <= 0.02 * ref.norm()):
                return f"it returned wrong results for {rows} rows"
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001  any failure of the kernel means: do not use it
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return f"{type(e).__name__}: {first}"
    return None


def route(kind: str, device) -> tuple[str, str | None]:
    """How `kind` ("fp8" or "int8") multiplies on `device`, decided once per process and device.

    Args:
        kind: a key of KINDS.
        device: the device the activations are on.

    Returns:
        ("kernel", None), or ("dequantize", the one-line reason, naming what to use instead).
    """
    k, device = KINDS[kind], _full(device)
    key = (kind, str(device))
    if key not in _ROUTES:
        if device.type != "cuda":
            _ROUTES[key] = ("dequantize", f"{k.scheme} computes by dequantizing on the {device.type} (its "
                                          f"{k.kernel} kernel needs a CUDA GPU of compute capability {k.needs}+); "
                                          "same quantized values, not the speed")
        else:
            name, cap = _card(device)
            if cap < k.capability:
                _ROUTES[key] = ("dequantize", f"{k.scheme} needs CUDA compute capability {k.needs}+ for {k.kernel}; "
                                              f"{name} is {cap[0]}.{cap[1]}: computing by dequantizing (slower)"
                                              f"{_instead(k, cap)}")
            elif (error := _probe(kind, device)) is not None:
                _ROUTES[key] = ("dequantize", f"{k.scheme}: torch {torch.__version__} cannot run {k.kernel} on "
                                              f"{name} ({error}): computing by dequantizing (slower)")
            else:
                _ROUTES[key] = ("kernel", None)
    return _ROUTES[key]


# --- the module ---------------------------------------------------------------------------------------


class Linear8(nn.Linear):
    """nn.Linear with an 8-bit weight, per-output-channel scales, and per-token 8-bit activations.

    An nn.Linear to peft (which wraps it as a LoRA Linear) without nn.Linear's own parameters: `weight`
    and `weight_scale` are buffers, `bias` a bf16 parameter; `compute_dtype` keeps peft's adapters in
    bf16 (it casts them to a floating-point base weight's dtype otherwise, and fp8 is one).

    Args:
        in_features, out_features, bias: as nn.Linear.
        kind: "fp8" or "int8" (see KINDS).
        device: where the (empty) tensors are created; "meta" when rebuilding a model to load into.
    """

    compute_dtype = torch.bfloat16

    def __init__(self, in_features: int, out_features: int, bias: bool = True, kind: str = "fp8", device=None):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a float weight
        if kind not in KINDS:
            raise KreaLiteError(f"unknown 8-bit kind {kind!r}: choose one of {', '.join(KINDS)}")
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=KINDS[kind].dtype, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=torch.bfloat16, device=device),
                                 requires_grad=False) if bias else None
        self._route: tuple[torch.device, str] | None = None  # (device, "kernel" | "dequantize"), see decide()

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str) -> Linear8:
        """Quantize `linear` on its own device (its bias is kept in bf16)."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, kind, device="meta")
        q, scale = quantize_weight(linear.weight.detach(), kind)
        stored = {"weight": q, "weight_scale": scale}
        if linear.bias is not None:
            stored["bias"] = linear.bias.detach().to(torch.bfloat16)
        module.load(stored)
        return module

    def load(self, stored: dict[str, torch.Tensor]) -> None:
        """Take the stored tensors ("weight", "weight_scale", optional "bias") as they are (no copy)."""
        k = KINDS[self.kind]
        expected = {"weight", "weight_scale"} | ({"bias"} if self.bias is not None else set())
        if set(stored) != expected:
            raise KreaLiteError(f"{k.scheme} layer has tensors {sorted(stored)}, expected {sorted(expected)}: "
                                "the folder was not written by this scheme; run `krea-lite verify` on it")
        w, s = stored["weight"], stored["weight_scale"]
        if w.dtype != k.dtype or s.dtype != torch.float32:
            raise KreaLiteError(f"{k.scheme} layer stores {w.dtype} weights with {s.dtype} scales, expected {k.dtype} "
                                "with float32: the folder was not written by this scheme; re-create it")
        if tuple(w.shape) != (self.out_features, self.in_features) or tuple(s.shape) != (self.out_features,):
            raise KreaLiteError(f"{k.scheme} layer has a {tuple(w.shape)} weight with {tuple(s.shape)} scales, "
                                f"expected ({self.out_features}, {self.in_features}); re-create the folder")
        self.weight, self.weight_scale = w, s
        if self.bias is not None:
            self.bias = nn.Parameter(stored["bias"], requires_grad=False)
        self._route = None

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() cast every floating-point tensor, and fp8 is one to torch: the 8-bit
        # weight and its float32 scales follow the device only (as bitsandbytes' packed weights do).
        fixed = (self.weight, self.weight_scale)

        def keep_dtype(t):
            out = fn(t)
            if any(t is f for f in fixed) and out.dtype != t.dtype:
                out = t.to(device=out.device)
            return out

        return super()._apply(keep_dtype, recurse)

    def decide(self, device) -> str:
        """Choose kernel or dequantizing for `device` (printing why once); call before torch.compile traces."""
        device = _full(device)
        path, reason = route(self.kind, device)
        if reason:
            _say(reason)
        k = KINDS[self.kind]
        if path == "kernel" and (self.in_features % k.multiple or self.out_features % k.multiple):
            path = "dequantize"
            _say(f"{k.scheme}: layers whose sizes are not multiples of {k.multiple} compute by dequantizing "
                 f"(first: {self.in_features} -> {self.out_features})")
        self._route = (device, path)
        return path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in _EIGHT_BIT:
            raise KreaLiteError(f"a {KINDS[self.kind].scheme} layer got {x.dtype} input (the caller cast it to the "
                                "weight's dtype, as T5 does for `wo`): keep that layer in bf16 (--keep)")
        route_ = self._route
        path = route_[1] if route_ is not None and route_[0] == x.device else self.decide(x.device)
        k = KINDS[self.kind]
        lead = x.shape[:-1]
        xq, sx = quantize_rows(x.reshape(-1, self.in_features), k)
        bias = self.bias
        if path == "kernel" and k.dtype != torch.int8:
            fused = bias is not None and bias.dtype == torch.bfloat16
            y = _fp8_mm(xq, sx, self.weight, self.weight_scale, bias if fused else None)
            if fused:
                bias = None
        elif path == "kernel":
            y = _int8_mm(xq, sx, self.weight, self.weight_scale)
        else:
            y = _dequantized_mm(xq, sx, self.weight, self.weight_scale)
        y = y.to(x.dtype)
        if bias is not None:
            y = y + bias.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={KINDS[self.kind].scheme}")


def prepare(model: nn.Module, device) -> dict[str, int]:
    """Decide kernel vs dequantizing for every Linear8 in `model` on `device` (prints why, once).

    `torch.compile` should see the decision already made: compile.compile_transformer calls this.

    Args:
        model: any module (transformer, T5).
        device: the device its forward will run on.

    Returns:
        How many Linear8 layers take each path, e.g. {"kernel": 504}.
    """
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, Linear8):
            path = m.decide(device)
            counts[path] = counts.get(path, 0) + 1
    return counts


def native_scheme(device) -> tuple[str, str]:
    """The 8-bit-matmul scheme `device` runs natively, for `--transformer auto`: (scheme, why).

    fp8mm where fp8 tensor cores exist (8.9+), else int8mm (8.0+), else nf4 (no 8-bit matmul: the
    smallest weights). Memory is the planner's business; this only says what the card can compute.

    Args:
        device: the CUDA device to judge ("cpu" gives nf4).
    """
    for kind in ("fp8", "int8"):
        path, _ = route(kind, device)
        if path == "kernel":
            return KINDS[kind].scheme, f"{KINDS[kind].kernel} runs on this card"
    if torch.device(device).type != "cuda":
        return "nf4", "no 8-bit matmul kernel on the CPU, so nf4, the smallest weights"
    return "nf4", ("this card runs neither torch._scaled_mm (fp8, 8.9+) nor torch._int_mm (int8, 8.0+), so nf4, the "
                   "smallest weights")


def check_folder(manifest: dict, device) -> list[str]:
    """Why each component of a krea-lite folder cannot use its 8-bit kernel on `device` (none: all can).

    Reads only the manifest (call it before loading); prints each reason once and returns
    "component: reason" lines.

    Args:
        manifest: `checkpoint.read_manifest(folder)`.
        device: where the folder will compute.
    """
    lines = []
    for component, info in manifest.get("components", {}).items():
        kind = next((name for name, k in KINDS.items() if k.scheme == info.get("scheme")), None)
        if kind is None or not info.get("quantized_modules"):
            continue
        path, reason = route(kind, device)
        if reason:
            _say(reason)  # the same line a layer's first forward would print: said once
            lines.append(f"{component}: {reason}")
    return lines
