"""Fusing linear adapters into weights, many layers at once: W = W0 + Σ strength·s·B·A.

Layers whose fused adapters have the same shapes are stacked into a `Group`: pristine W0
(N, out, K), the up factors with the training scale folded in (N, out, R) and the down factors
(N, R, K), R being the adapters' ranks side by side. A strength change is then one `baddbmm` per
group from the pristine W0 in fp32, one cast, one finiteness check for everything and one
multi-tensor copy into the weights: a handful of kernels and a single host sync however many layers
and adapters there are, and exactly the same weights as a fresh fuse after any number of changes.

DoRA adapters (sdlora/lora/dora.py) have no low-rank change: their W_dora − W0, computed once per
plan from the pristine W0 in fp32, is held whole (N, J, out, K) and added with its strength,
W = W0 + Σ strength·s·B·A + Σ strength_j·(W_dora,j − W0), still from the pristine W0 each time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sdlora.errors import SdloraError

if TYPE_CHECKING:  # only for type hints: layer.py builds on this module
    from sdlora.lora.layer import LoRALayer


@dataclass
class Group:
    """Layers with the same weight shape, dtype, device and fused adapters (names and ranks)."""

    layers: list[LoRALayer]
    names: tuple[str, ...]
    w0: torch.Tensor  # (N, out, K) pristine weights, in the weights' own dtype
    up: torch.Tensor  # (N, out, R) fp32, training scale folded in
    down: torch.Tensor  # (N, R, K) fp32
    ranks: torch.Tensor  # (len(names),) long, on the device: columns per adapter
    weights: list[torch.nn.Parameter]  # the layers' weights, written in place
    dora: tuple[str, ...] = ()  # the DoRA adapters, not in `names`
    dense: torch.Tensor | None = None  # (N, J, out, K) fp32: W_dora − W0 per DoRA adapter

    def merged(self) -> torch.Tensor:
        """W0 + Σ strength·ΔW for every layer of the group, (N, out, K) in fp32."""
        strengths = torch.tensor(
            [[layer.strengths[n] for n in self.names + self.dora] for layer in self.layers],
            dtype=torch.float32,
        ).to(self.up.device, non_blocking=True)
        plain, dora = strengths.split([len(self.names), len(self.dora)], dim=1)
        columns = plain.repeat_interleave(self.ranks, dim=1)  # (N, R)
        merged = torch.baddbmm(self.w0.float(), self.up * columns[:, None, :], self.down)
        if self.dense is not None:
            merged += torch.einsum("nj,njok->nok", dora, self.dense)
        return merged


def _dense(layer: LoRALayer, names: tuple[str, ...], w0: torch.Tensor) -> torch.Tensor:
    """(J, out, K) fp32: W_dora − W0 of each named DoRA adapter, from the pristine `w0`."""
    shape = layer.base.weight.shape
    return torch.stack([layer.get(n).dora_delta(w0.view(shape)).reshape(w0.shape) for n in names])


def _factors(layer: LoRALayer, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (out, R), down (R, K)) of the named adapters side by side, fp32, scale folded in."""
    if not names:
        k = layer.base.weight[0].numel()
        return torch.zeros(layer.base.weight.shape[0], 0), torch.zeros(0, k)
    ups, downs = [], []
    for name in names:
        weights = layer.get(name)
        up = weights.up.detach().float().reshape(weights.up.shape[0], -1)
        ups.append(weights.scale * up)
        downs.append(weights.down.detach().float().reshape(weights.rank, -1))
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


class Plan:
    """The groups of a set of layers, built once per change of what is fused where."""

    def __init__(self, layers: Iterable[LoRALayer]):
        self.layers = list(dict.fromkeys(layers))  # unique, in order
        self.groups: list[Group] = []
        buckets: dict[tuple, list[LoRALayer]] = {}
        for layer in self.layers:
            fused = [n for n, w in layer.items() if n in layer.fused]
            if not fused:
                continue
            names = tuple(n for n in fused if not layer.get(n).is_dora)
            dora = tuple(n for n in fused if layer.get(n).is_dora)
            weight = layer.base.weight
            ranks = tuple(layer.get(n).rank for n in names)
            key = (tuple(weight.shape), weight.dtype, weight.device, names, ranks, dora)
            buckets.setdefault(key, []).append(layer)
        for (_, _, device, names, ranks, dora), members in buckets.items():
            w0 = torch.stack(
                [
                    (m.pristine if m.pristine is not None else m.base.weight.detach()).reshape(
                        m.base.weight.shape[0], -1
                    )
                    for m in members
                ]
            )
            for i, member in enumerate(members):
                member.pristine = w0[i].view(member.base.weight.shape)
            factors = [_factors(m, names) for m in members]
            self.groups.append(
                Group(
                    members,
                    names,
                    w0,
                    torch.stack([u for u, _ in factors]).to(device),
                    torch.stack([d for _, d in factors]).to(device),
                    torch.tensor(ranks, device=device, dtype=torch.long),
                    [m.base.weight for m in members],
                    dora,
                    torch.stack([_dense(m, dora, w0[i]) for i, m in enumerate(members)])
                    if dora
                    else None,
                )
            )

    def apply(self, only: str | None = None) -> None:
        """Write W0 + Σ strength·ΔW into every layer (or only the groups holding adapter `only`).

        Layers with nothing fused get W0 back bit for bit. Non-finite results are refused before
        any weight is written.
        """
        groups = [g for g in self.groups if only is None or only in g.names + g.dora]
        casts = [g.merged().to(g.w0.dtype) for g in groups]
        if casts:
            finite = torch.stack([torch.isfinite(c).all() for c in casts]).all()
            if not bool(finite):  # the one host sync
                bad = sorted(
                    {n for g, c in zip(groups, casts, strict=True) for n in g.names + g.dora}
                )
                raise SdloraError(
                    f"fusing {', '.join(bad)} at these strengths gives non-finite weights; "
                    "lower the strengths or check the adapter files"
                )
        targets, sources = [], []
        for group, cast in zip(groups, casts, strict=True):
            targets += group.weights
            sources += cast.view(len(group.weights), *group.weights[0].shape).unbind(0)
        if only is None:
            for layer in self.layers:
                if not layer.fused and layer.pristine is not None:
                    targets.append(layer.base.weight)
                    sources.append(layer.pristine)
                    layer.pristine = None  # `sources` holds it until the copy below
        if targets:
            with torch.no_grad():
                torch._foreach_copy_(targets, sources)


def merged_weight(layer: LoRALayer, names: list[str], dtype: torch.dtype) -> torch.Tensor:
    """W0 + Σ strength·ΔW over `names` at one layer, computed from W0 in fp32, cast to `dtype`."""
    w0 = layer.pristine if layer.pristine is not None else layer.base.weight.detach()
    if not names:
        return w0.to(dtype)
    plain = tuple(n for n in names if not layer.get(n).is_dora)
    up, down = _factors(layer, plain)
    ranks = torch.tensor([layer.get(n).rank for n in plain], dtype=torch.long)
    strengths = torch.tensor([layer.strengths[n] for n in plain], dtype=torch.float32)
    columns = strengths.repeat_interleave(ranks)
    flat = w0.reshape(w0.shape[0], -1).float()
    merged = torch.addmm(flat, up.to(flat.device) * columns.to(flat.device), down.to(flat.device))
    for name in (n for n in names if layer.get(n).is_dora):
        merged += layer.strengths[name] * layer.get(name).dora_delta(w0).reshape(flat.shape)
    return merged.view(w0.shape).to(dtype)
