"""Merging adapters into one: exact by concatenating ranks, or compressed by SVD to a given rank.

Exact merge: Σ_i strength_i · s_i · B_i·A_i = [B_1 … B_n] · [strength_1·s_1·A_1; …; strength_n·s_n·A_n],
so the merged adapter at strength 1.0 equals the live blend of its inputs, with no cross terms
(averaging the factors instead gives (ΣB)(ΣA), which is not the sum; sd-scripts #586, peft #1155).
Where the concatenated rank would exceed min(out, in) of a layer, that module is re-factored to
that rank by SVD, which is exact (ΔW cannot have a higher rank) and keeps the file loadable.
Compression: the best rank-R approximation of each module's ΔW (Eckart-Young), computed from the
factors via QR so ΔW is never formed: B = Qb·Rb, Aᵀ = Qa·Ra, svd(Rb·Raᵀ) = U·S·Vᵀ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sdlora.errors import SdloraError
from sdlora.lora.adapter import Adapter, ModuleFactors, check_strength, fit_factors
from sdlora.tools.inspect import guess_architecture


@dataclass
class MergeReport:
    """Relative Frobenius error ‖ΔW − ΔW_R‖ / ‖ΔW‖ per module and overall (0 when exact)."""

    rank: int | None  # None: exact merge
    errors: dict[str, float] = field(default_factory=dict)
    overall: float = 0.0


def check_mergeable(adapters: list[Adapter]) -> None:
    """Refuse nonlinear adapters and adapters made for different bases, naming the file."""
    for adapter in adapters:
        if not adapter.is_linear:
            raise SdloraError(
                f"{adapter.source}: has nonlinearity {adapter.nonlinearity!r}; "
                "only linear adapters can be merged"
            )
    archs = {a.source: guess_architecture(a) for a in adapters}
    known = {arch for arch in archs.values() if not arch.startswith("unknown")}
    if len(known) > 1:
        listed = ", ".join(f"{src} ({arch})" for src, arch in archs.items())
        raise SdloraError(f"adapters made for different bases cannot be merged: {listed}")
    seen: dict[str, tuple[str, tuple]] = {}
    for adapter in adapters:
        for key, m in adapter.modules.items():
            dims = (m.up.shape[0], m.down[0].numel())
            if key in seen and seen[key][1] != dims:
                raise SdloraError(
                    f"{adapter.source}: module {key} is {dims[0]}×{dims[1]} but "
                    f"{seen[key][0]} has it {seen[key][1][0]}×{seen[key][1][1]}; "
                    "the adapters were made for different bases"
                )
            seen.setdefault(key, (adapter.source, dims))


def merge_exact(items: list[tuple[Adapter, float]]) -> Adapter:
    """One adapter equal to Σ strength·ΔW of `items` (ranks concatenated, scales folded into A),
    carrying the new words of every adapter with a strength other than 0."""
    check_mergeable([a for a, _ in items])
    parts: dict[str, list[ModuleFactors]] = {}
    for adapter, strength in items:
        for key, m in adapter.modules.items():
            down = m.down.float() * (strength * m.scale)
            parts.setdefault(key, []).append(ModuleFactors(down=down, up=m.up.float()))
    modules = {}
    for key, factors in parts.items():
        shape = max((f.down.shape for f in factors), key=len)  # a conv kernel shape wins
        fitted = [fit_factors(f, (f.up.shape[0], *shape[1:])) for f in factors]
        modules[key] = cap_rank(
            ModuleFactors(
                down=torch.cat([f.down for f in fitted], dim=0),
                up=torch.cat([f.up for f in fitted], dim=1),
            )
        )
    words: dict[str, dict[str, torch.Tensor]] = {}
    for adapter, strength in items:  # a word cannot be scaled: kept whole where strength != 0
        for token, vectors in adapter.embeddings.items() if strength else ():
            if token in words:
                raise SdloraError(
                    f"two adapters bring the word {token!r} ({adapter.source}); merge only one"
                )
            words[token] = vectors
    first = items[0][0]
    meta = {
        k: v
        for k, v in first.metadata.items()
        if k in ("sdlora_base_model", "ss_base_model_version")
    }
    return Adapter(modules=modules, metadata=meta, source="merged", embeddings=words)


def compress_module(factors: ModuleFactors, rank: int) -> tuple[ModuleFactors, float, float]:
    """Best rank-`rank` approximation; returns (factors, squared error, squared norm) of ΔW."""
    down = factors.down.float() * factors.scale
    up = factors.up.float()
    k = down.shape[0]
    b = up.reshape(up.shape[0], k)  # (out, k)
    a = down.reshape(k, -1)  # (k, in·kh·kw)
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    r = min(rank, s.shape[0])
    root = s[:r].sqrt()
    new_up = (qb @ u[:, :r]) * root  # (out, r)
    new_down = root[:, None] * (vh[:r] @ qa.T)  # (r, in·kh·kw)
    shaped = ModuleFactors(
        down=new_down.reshape(r, *down.shape[1:]).contiguous(),
        up=new_up.reshape(up.shape[0], r, *up.shape[2:]).contiguous(),
    )
    return shaped, float((s[r:] ** 2).sum()), float((s**2).sum())


def cap_rank(factors: ModuleFactors) -> ModuleFactors:
    """The same ΔW with rank at most min(out, in·kh·kw), which every loader requires.

    Concatenated ranks can exceed the layer's dims (ten rank-4 adapters on a 32-wide layer); ΔW
    then has rank <= min(out, in) anyway, so the SVD to that rank drops only zero singular values.
    """
    limit = min(factors.up.shape[0], factors.down[0].numel())
    if factors.rank <= limit:
        return factors
    return compress_module(factors, limit)[0]


def compress(adapter: Adapter, rank: int) -> tuple[Adapter, MergeReport]:
    """Every module reduced to at most `rank` by SVD, with the relative error per module."""
    if rank < 1:
        raise SdloraError(f"--rank must be at least 1 (got {rank})")
    check_mergeable([adapter])
    report = MergeReport(rank=rank)
    modules, total_err, total_norm = {}, 0.0, 0.0
    for key, factors in adapter.modules.items():
        modules[key], err, norm = compress_module(factors, rank)
        report.errors[key] = math.sqrt(err / norm) if norm > 0 else 0.0
        total_err, total_norm = total_err + err, total_norm + norm
    report.overall = math.sqrt(total_err / total_norm) if total_norm > 0 else 0.0
    kept = Adapter(
        modules=modules,
        metadata=dict(adapter.metadata),
        source=adapter.source,
        embeddings=adapter.embeddings,
    )
    return kept, report


def merge_adapters(
    items: list[tuple[Adapter, float]], rank: int | None = None
) -> tuple[Adapter, MergeReport]:
    """Merge (adapter, strength) pairs exactly, then compress to `rank` if given."""
    if not items:
        raise SdloraError("give at least one adapter to merge")
    for adapter, strength in items:
        check_strength(adapter.source, strength)
    merged = merge_exact(items)
    report = MergeReport(rank=None)
    if rank is not None:
        merged, report = compress(merged, rank)
    merged.metadata.update(
        {
            "sdlora_merged_from": ", ".join(f"{a.source}:{s:g}" for a, s in items),
            "sdlora_merge_rank": "exact" if rank is None else str(rank),
            "sdlora_merge_relative_error": f"{report.overall:.3g}",
        }
    )
    return merged, report
