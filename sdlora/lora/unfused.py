"""Unfused adapters at inference, stacked: all of a layer's adapters in one pair of matmuls.

y = W0·x + Σ_i c_i·B_i·σ_i(A_i·x), with c_i = strength_i · s_i. Stacking the downs,
A = [A_1; …; A_n] (R, in), and setting the ups side by side with their scales folded in,
B = [c_1·B_1 | … | c_n·B_n] (out, R), the sum is B·σ(A·x), σ acting on each adapter's rows of A·x.
Adapters are ordered by nonlinearity, so each σ is one call on a run of rows (none for identity).
A layer then costs the base, one down matmul, one σ per nonlinearity and one up matmul that adds
into the base output in place, however many adapters it holds (the per-adapter path costs two
matmuls, a σ and an add each). For Conv2d the down is the stacked k×k convolution and the up a
1×1 convolution over the stacked channels.

The stack is built from the fp32 factors in the activations' dtype (c_i·B_i in fp32, then one
cast: the factors the per-adapter path used, bit for bit) and rebuilt when a strength, the set
of fused adapters, the factors (their version counters), the dtype or the device change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # only for type hints: layer.py builds on this module
    from sdlora.lora.layer import LoRAWeights


def _gelu_(t: torch.Tensor) -> torch.Tensor:
    return t.copy_(F.gelu(t))  # GELU has no in-place kernel


# σ as the nn modules of layer.NONLINEARITIES compute it (LeakyReLU slope 0.01, exact GELU). In
# place on each run of rows when a stack holds several nonlinearities; out of place when one σ
# covers every row, and where autograd follows (it saves σ's output). Identity needs no call.
IN_PLACE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu_,
    "leaky_relu": lambda t: F.leaky_relu_(t, 0.01),
    "gelu": _gelu_,
    "silu": lambda t: F.silu(t, inplace=True),
    "tanh": torch.tanh_,
}
OUT_OF_PLACE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "leaky_relu": lambda t: F.leaky_relu(t, 0.01),
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


@dataclass
class Stack:
    """One layer's active unfused adapters, stacked, in one dtype on one device."""

    key: tuple  # what it was built from; see LoRALayer.unfused_adapters
    names: tuple[str, ...]  # the adapters in it, in stacking order
    down: torch.Tensor  # (R, in) or (R, in, kh, kw) for Conv2d
    up: torch.Tensor  # (out, R) or (out, R, 1, 1); strength · s folded in
    runs: tuple[tuple[str, int, int], ...]  # (σ, first row, rows); identity has none
    conv: dict | None  # the base Conv2d's stride/padding/dilation; None for Linear
    whole: bool  # one run over every row: σ takes h itself, no slicing

    def __post_init__(self):
        self.up_t = self.up.t() if self.conv is None else None  # (R, out) view, for addmm_

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y + B·σ(A·x); in place into y (the base's fresh output) unless autograd follows."""
        if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
            return y + self._up(self._sigma(self._down(x), OUT_OF_PLACE))
        h = self._sigma(self._down(x), IN_PLACE)
        if self.conv is None and y.is_contiguous():  # one GEMM with beta = 1, no add
            y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), self.up_t)
            return y
        return y.add_(self._up(h))

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        """A·x: (..., R) for Linear, (B, R, H, W) for Conv2d."""
        if self.conv is None:
            return F.linear(x, self.down)
        return F.conv2d(x, self.down, **self.conv)

    def _up(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.up) if self.conv is None else F.conv2d(h, self.up)

    def _sigma(self, h: torch.Tensor, table: dict[str, Callable]) -> torch.Tensor:
        """σ per run of rows (dim -1 for Linear, 1 for Conv2d), from `table`."""
        if self.whole:  # out of place: one kernel for every σ (GELU in place takes two)
            return OUT_OF_PLACE[self.runs[0][0]](h)
        dim = -1 if self.conv is None else 1
        if table is IN_PLACE:
            for name, start, rows in self.runs:
                table[name](h.narrow(dim, start, rows))
            return h
        pieces, done = [], 0
        for name, start, rows in self.runs:
            pieces += [h.narrow(dim, done, start - done), table[name](h.narrow(dim, start, rows))]
            done = start + rows
        return torch.cat([*pieces, h.narrow(dim, done, h.shape[dim] - done)], dim)


def build(key: tuple, members: list[tuple[str, float, LoRAWeights]], dtype: torch.dtype) -> Stack:
    """The stack of `members` (name, strength, weights), all on one layer, cast to `dtype`."""
    members = sorted(members, key=lambda m: m[2].nonlinearity)  # stable: file order within a σ
    with torch.no_grad(), torch.inference_mode(False):  # plain tensors, usable in and out of
        downs, ups, runs, start = [], [], [], 0  # inference mode
        for _, strength, weights in members:
            downs.append(weights.down.detach().float())
            ups.append((strength * weights.scale) * weights.up.detach().float())
            act = weights.nonlinearity
            if act != "identity" and runs and runs[-1][0] == act:
                runs[-1][2] += weights.rank
            elif act != "identity":
                runs.append([act, start, weights.rank])
            start += weights.rank
        down = torch.cat(downs).to(dtype)
        up = torch.cat(ups, dim=1).to(dtype)
    return Stack(
        key,
        tuple(name for name, _, _ in members),
        down,
        up,
        tuple(tuple(run) for run in runs),
        members[0][2].conv,
        len(runs) == 1 and runs[0][2] == start,
    )
