"""Frozen base weights stored in 8 bits: float8_e4m3fn storage, computed in the compute dtype.

`store_in_fp8(model)` turns every frozen `nn.Linear` / `nn.Conv2d` of `model` into an
`Fp8Linear` / `Fp8Conv2d` in place (the same module object, its class switched), so a `LoRALayer`
that wraps one keeps its reference and adds its adapter on top as before: y = W0·x + ΔW·x, with W0
upcast to the compute dtype at each call (kohya's `--fp8_base` does the same) and the LoRA factors
untouched in fp32. Half the memory of bf16 weights; under torch.compile the upcast fuses into the
kernel that reads the weight.

Scaling (`SCALINGS`): e4m3fn has 3 mantissa bits and normal numbers from 2**-6 to 448. SD weights
are mostly 1e-3..1e-1, so a plain cast puts many of them among the subnormals and loses their
precision; a scale per output channel (row) maps each row's largest |w| to 448 first:
W0 ≈ fp8(W0 / s) · s, s = max|row| / 448 (docs/performance.md has the measured difference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdlora.errors import SdloraError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn number
# "none": plain cast (kohya's fp8_base); "tensor": one scale per weight; "channel": one per row
SCALINGS = ("none", "tensor", "channel")
DEFAULT_SCALING = "channel"  # the smallest noise-prediction difference (docs/performance.md)


def quantize(
    weight: torch.Tensor, scaling: str = DEFAULT_SCALING
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fp8 weight, fp32 scale or None) with weight ≈ fp8.float() · scale.

    The scale has the weight's rank with ones past the first dimension ((out, 1) for a Linear,
    (out, 1, 1, 1) for a Conv2d), or is a scalar with scaling "tensor"."""
    if scaling not in SCALINGS:
        raise SdloraError(f"unknown fp8 scaling {scaling!r}; choose one of: {', '.join(SCALINGS)}")
    w = weight.detach().float()
    if scaling == "none":
        return w.clamp(-FP8_MAX, FP8_MAX).to(FP8), None
    if scaling == "tensor":
        amax = w.abs().amax()
    else:
        amax = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
    scale = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The weight in `dtype` from its fp8 storage (`quantize`'s inverse, up to rounding)."""
    w = q.to(dtype)
    return w if scale is None else w * scale.to(dtype)


class Fp8Weight:
    """What the fp8 modules add to nn.Linear / nn.Conv2d: the upcast weight."""

    weight_scale: torch.Tensor | None
    compute_dtype: torch.dtype

    def compute_weight(self) -> torch.Tensor:
        """W0 in the compute dtype, on the weight's device (upcast at each call)."""
        return dequantize(self.weight, self.weight_scale, self.compute_dtype)

    def _apply(self, fn, recurse=True):
        """Moves follow `fn`; a dtype cast (`.to(torch.float16)`, `.half()`) changes what the
        weight is computed in, never its 8-bit storage nor its fp32 scale (a cast would turn
        W0 / s into a weight without its scale)."""
        weight, scale = self.weight.data, self.weight_scale
        probe = fn(torch.zeros((), dtype=self.compute_dtype, device=weight.device))
        super()._apply(fn, recurse)
        if self.weight.dtype != weight.dtype:  # a cast: the 8-bit values back, where fn put them
            self.weight.data = weight.to(self.weight.device)
        if scale is not None and self.weight_scale.dtype != scale.dtype:
            self.weight_scale = scale.to(self.weight.device)
        self.compute_dtype = probe.dtype
        return self


class Fp8Linear(Fp8Weight, nn.Linear):
    """nn.Linear whose frozen weight is stored in fp8 and upcast at each call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x, self.compute_weight(), bias)


class Fp8Conv2d(Fp8Weight, nn.Conv2d):
    """nn.Conv2d whose frozen weight is stored in fp8 and upcast at each call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return self._conv_forward(x, self.compute_weight(), bias)


FP8_CLASSES = {nn.Linear: Fp8Linear, nn.Conv2d: Fp8Conv2d}


def is_fp8(module: nn.Module) -> bool:
    return isinstance(module, Fp8Weight)


def store_in_fp8(
    model: nn.Module,
    *,
    scaling: str = DEFAULT_SCALING,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> int:
    """Store every frozen Linear / Conv2d weight of `model` in fp8, in place; return how many.

    Only modules of exactly those classes change (a subclass may compute otherwise), and only
    frozen ones (a LoRA's factors are Parameters of its own, never a Linear). compute_dtype: what
    the weight is upcast to (None: the weight's dtype now, e.g. bf16 after the trainer's cast).
    Biases keep their dtype; normalisation layers and embeddings are left as they are. device:
    where the fp8 weights go (each is quantized there, one at a time: a base on the CPU reaches
    the GPU in 8 bits); None: where each weight is."""
    count = 0
    for module in model.modules():
        kind = FP8_CLASSES.get(type(module))
        if kind is None or module.weight.requires_grad:
            continue
        dtype = compute_dtype or module.weight.dtype
        q, scale = quantize(module.weight.detach().to(device or module.weight.device), scaling)
        module.weight = nn.Parameter(q, requires_grad=False)
        module.register_buffer("weight_scale", scale)
        module.compute_dtype = dtype
        module.__class__ = kind  # the same object: whoever holds it (a LoRALayer) still does
        count += 1
    return count


def fp8_bytes(model: nn.Module) -> int:
    """Bytes of the fp8 weights and their scales in `model` (for the log and the tests)."""
    total = 0
    for module in model.modules():
        if is_fp8(module):
            total += module.weight.numel() * module.weight.element_size()
            if module.weight_scale is not None:
                total += module.weight_scale.numel() * module.weight_scale.element_size()
    return total
