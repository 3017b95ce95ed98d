"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"): the maths in one place.

An adapter's weight is split into a magnitude m and a direction, and the low-rank ΔW = s·B·A
moves only the direction (paper eq. 5):

    W_dora = m · (W0 + ΔW) / ‖W0 + ΔW‖

The norm is taken per output row, over every dimension but 0 of a weight shaped
(out, in[, kh, kw]), as the paper's code and PEFT compute it (PEFT: `DoraLinearLayer.
get_weight_norm`); m is then shaped (out, 1[, 1, 1]). Files made by LyCORIS without
`wd_on_output` (and the form A1111 applies) normalise per input column instead, over every
dimension but 1, m shaped (1, in[, 1, 1]); both are read, told apart by the magnitude's shape as
ComfyUI tells them (`dora_axis`).

Strength (docs/formats.md compares the choices): the layer's weight moves a straight line from
W0 to W_dora, as ComfyUI's `weight_decompose` and A1111 apply a multiplier:

    W = W0 + strength · (W_dora − W0)

so strength 0 is the base exactly and 1 is the adapter as trained, and a DoRA adapter blends
like any other delta. Several adapters at one layer: each DoRA adapter is decomposed against the
pristine W0 (never against a weight other adapters already changed), and the deltas add, so
the order adapters are loaded in does not matter; this is what PEFT's forward computes with
several DoRA adapters active.
"""

from __future__ import annotations

import torch

from sdlora.errors import SdloraError

OUTPUT = "output"  # m per output row: (out, 1[, 1, 1]); the paper, PEFT, LyCORIS wd_on_output
INPUT = "input"  # m per input column: (1, in[, 1, 1]); LyCORIS' default, A1111


def axis_of(magnitude: torch.Tensor) -> str:
    """OUTPUT or INPUT, from a magnitude already shaped for its weight (`fit_magnitude`)."""
    return INPUT if magnitude.shape[0] == 1 and magnitude[0].numel() > 1 else OUTPUT


def dora_axis(
    magnitude: torch.Tensor, out_features: int, in_channels: int, peft: bool = False
) -> str:
    """The axis of a file's magnitude for a module with `out_features` outputs and
    `in_channels` inputs. kohya/LyCORIS `dora_scale`: per output row when its first dimension is
    the output count (ComfyUI's test), else per input column, (1, in[, 1, 1]). PEFT's
    `lora_magnitude_vector` is always per output row: (out,), or (1, out, 1, 1) for a conv."""
    numel = magnitude.numel()
    first = magnitude.shape[0] if magnitude.dim() else 0
    if peft and numel == out_features:
        return OUTPUT
    if numel == out_features and first == out_features:
        return OUTPUT
    if numel == in_channels and first == 1 and magnitude.dim() >= 2:
        return INPUT
    raise SdloraError(
        f"its DoRA magnitude has shape {list(magnitude.shape)}, which fits neither the "
        f"module's {out_features} outputs nor its {in_channels} inputs"
    )


def magnitude_2d(magnitude: torch.Tensor, axis: str) -> torch.Tensor:
    """A file's magnitude as sdlora holds it before the weight is known: (out, 1) or (1, in), fp32."""
    flat = magnitude.detach().float().reshape(-1)
    return flat[:, None] if axis == OUTPUT else flat[None, :]


def fit_magnitude(magnitude: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The magnitude shaped to broadcast on a weight of `shape`: (out, 1, …) or (1, in, …)."""
    axis = axis_of(magnitude)
    size = shape[0] if axis == OUTPUT else shape[1]
    if magnitude.numel() != size:
        raise SdloraError(
            f"its DoRA magnitude holds {magnitude.numel()} values; the weight {list(shape)} "
            f"has {size} {'outputs' if axis == OUTPUT else 'inputs'}"
        )
    rest = [1] * (len(shape) - 2)
    flat = magnitude.reshape(-1)
    return flat.reshape(size, 1, *rest) if axis == OUTPUT else flat.reshape(1, size, *rest)


def file_magnitude(magnitude: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The magnitude in LyCORIS' `dora_scale` layout for factors `down`: (out, 1[, 1, 1]) or
    (1, in[, 1, 1]), 4-D for a conv (ComfyUI and LyCORIS broadcast it on the weight as is)."""
    flat = magnitude.detach().float().reshape(-1).contiguous()
    rest = [1] * (down.dim() - 2)
    if axis_of(magnitude) == OUTPUT:
        return flat.reshape(flat.numel(), 1, *rest)
    return flat.reshape(1, flat.numel(), *rest)


def weight_norm(weight: torch.Tensor, axis: str) -> torch.Tensor:
    """‖W‖ per output row (over all dims but 0) or per input column (all but 1), keepdim."""
    dims = tuple(d for d in range(weight.dim()) if d != (0 if axis == OUTPUT else 1))
    return torch.linalg.vector_norm(weight, dim=dims, keepdim=True)


def direction_scale(w0: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """f = m / ‖W0 + ΔW‖, shaped like m; rows (columns) of W0 + ΔW that are all zero get f = 0
    (their direction is zero, so W_dora's row is zero too, not NaN)."""
    norm = weight_norm(w0 + delta, axis_of(magnitude))
    return torch.where(norm > 0, magnitude / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)


def dora_delta(w0: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """W_dora − W0 = m · (W0 + ΔW) / ‖W0 + ΔW‖ − W0, all in fp32, shaped like W0."""
    w0, delta, magnitude = w0.float(), delta.float(), magnitude.float()
    return direction_scale(w0, delta, magnitude) * (w0 + delta) - w0


def initial_magnitude(w0: torch.Tensor, axis: str = OUTPUT) -> torch.Tensor:
    """m = ‖W0‖ in fp32, so a fresh adapter (ΔW = 0) changes nothing (PEFT's and LyCORIS' init)."""
    return weight_norm(w0.detach().float(), axis)
