"""Merging adapters into one: exact by concatenating ranks, or compressed by SVD to a given rank.

Exact merge: Σ_i strength_i · s_i · B_i·A_i = [B_1 … B_n] · [strength_1·s_1·A_1; …; strength_n·s_n·A_n],
so the merged adapter at strength 1.0 equals the live blend of its inputs, with no cross terms
(averaging the factors instead gives (ΣB)(ΣA), which is not the sum; sd-scripts #586, peft #1155).
Where the concatenated rank would exceed min(out, in) of a layer, that module is re-factored to
that rank by SVD, which is exact (ΔW cannot have a higher rank) and keeps the file loadable.
Compression: the best rank-R approximation of each module's ΔW (Eckart-Young), computed from the
factors via QR so ΔW is never formed: B = Qb·Rb, Aᵀ = Qa·Ra, svd(Rb·Raᵀ) = U·S·Vᵀ.

Other methods (`METHODS`, as PEFT's `add_weighted_adapter` "*_svd" combinations define them) work
per module on each adapter's exact ΔW_i = s_i·B_i·A_i (one (out, in·kh·kw) matrix each), with the
strengths as the weights w_i, then factor the result to a rank by SVD:
  svd:              Σ w_i·ΔW_i
  magnitude-prune:  Σ w_i·trim(ΔW_i), trim = keep the ⌊density·numel⌋ largest |entries|
  ties:             trim, elect a sign per entry (sign of Σ trim(ΔW_i), "total", or of the count
                    of signs, "frequency"; 0 counts as +), then the mean of w_i·trim(ΔW_i) over the
                    adapters whose entry has that sign (TIES, Yadav et al. 2023, §3)
  dare:             Σ w_i·drop(ΔW_i), drop = keep each entry with probability density and divide
                    the kept ones by density, so E[drop(ΔW)] = ΔW (DARE, Yu et al. 2023, eq. 1)
  dare-ties:        drop, then TIES' sign election and disjoint mean
As in PEFT the sign is elected on the unweighted (trimmed) deltas and w_i applies after it. Unlike
PEFT an adapter at strength 0 is left out (in PEFT it would still vote and count in the mean).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from sdlora.bases.families import FAMILIES, SDXL, Family, family_of_width, width_label
from sdlora.errors import SdloraError
from sdlora.io.labels import FAMILY_KEY, PREDICTION_KEY
from sdlora.lora.adapter import (
    Adapter,
    ModuleFactors,
    adapter_family,
    check_strength,
    fit_factors,
    module_keys,
    resolve,
    widths,
)
from sdlora.lora.layer import LoRAWeights

# merge methods: "sum" (exact, --rank compresses), the rest on each adapter's ΔW (module docstring)
METHODS = ("sum", "svd", "ties", "dare", "dare-ties", "magnitude-prune")
PRUNING = ("ties", "dare", "dare-ties", "magnitude-prune")  # the methods that take a density


@dataclass
class MergeReport:
    """Relative Frobenius error ‖ΔW − ΔW_R‖ / ‖ΔW‖ per module and overall (0 when exact)."""

    rank: int | None  # None: exact merge
    errors: dict[str, float] = field(default_factory=dict)
    overall: float = 0.0


def family_of(adapter: Adapter) -> Family | None:
    """The model family an adapter was made for, from whatever in it shows one: its
    cross-attention width or SDXL names (`adapter_family`), its text encoder's width, its new
    words' encoders and width, or its metadata (kohya's base model version, a built-in base's
    name); None when nothing does."""
    found = adapter_family(adapter)
    if found is not None:
        return found
    text = widths(adapter).get("text_encoder")
    if text is not None and family_of_width(text) is not None:
        return family_of_width(text)
    for per_encoder in adapter.embeddings.values():
        if "text_encoder_2" in per_encoder:
            return SDXL
        if "text_encoder" in per_encoder:
            found = family_of_width(per_encoder["text_encoder"].shape[-1])
            if found is not None:
                return found
    version = adapter.metadata.get("ss_base_model_version", "")
    base = adapter.metadata.get("sdlora_base_model", "")
    for family in FAMILIES:
        if (version and version.startswith(family.base_model_version)) or (
            base in family.small_bases.values()
        ):
            return family
    return None


def check_linear_one_family(
    adapters: list[Adapter], done: str, nonlinear_why: str, family_why: str = ""
) -> None:
    """Refuse, naming the files, a nonlinear adapter (`nonlinear_why` says why it cannot be
    `done`, e.g. "merged") and adapters of different model families."""
    for adapter in adapters:
        if adapter.is_dora:  # its change depends on the base's W0: no B·A to add up
            raise SdloraError(f"{adapter.source}: DoRA adapters cannot be {done} (yet)")
        if not adapter.is_linear:
            raise SdloraError(
                f"{adapter.source}: has nonlinearity {adapter.nonlinearity!r}; "
                f"only linear adapters can be {done} ({nonlinear_why}; "
                "`sdlora distill` makes a linear one first)"
            )
    families = [(a.source, f) for a in adapters if (f := family_of(a)) is not None]
    for source, family in families[1:]:
        if family is not families[0][1]:
            first, first_family = families[0]
            raise SdloraError(
                f"{first} is an {first_family.label} adapter and {source} an {family.label} one; "
                f"adapters of different model families cannot be {done}{family_why}"
            )


def check_mergeable(adapters: list[Adapter]) -> None:
    """Refuse nonlinear adapters, adapters of different model families (an SD 1.x and an SDXL
    adapter: the merged file would fit neither base) and adapters made for bases of different
    widths, naming the files; all before anything is merged or written."""
    check_linear_one_family(
        adapters,
        "merged",
        "a nonlinear one has no weight delta ΔW to add, trim or factor",
        " (the file would fit neither base)",
    )
    unet = {a.source: w["unet"] for a in adapters if "unet" in (w := widths(a))}
    if len(set(unet.values())) > 1:
        listed = ", ".join(f"{src} ({width_label(width)})" for src, width in unet.items())
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


def merge_exact(
    items: list[tuple[Adapter, float]], models: dict[str, nn.Module] | None = None
) -> Adapter:
    """One adapter equal to Σ strength·ΔW of `items` (ranks concatenated, scales folded into A),
    carrying the new words and trigger words of every adapter with a strength other than 0.

    Modules are keyed as the files name them; with `models` (a loaded base's components, as the
    web UI has them), as that base's family names them (kohya's SGM block names for SDXL), so two
    spellings of one module become one key, and only the modules the base has are kept (those
    the live blend applies). Flattened and kernel-shaped factors of one conv module are fitted to
    one shape (`fit_factors`).
    """
    if not items:
        raise SdloraError("give at least one adapter to merge")
    check_mergeable([a for a, _ in items])
    # the key each module of the base has in its family's own layout (SGM block names for SDXL)
    keys = {c: module_keys(model, c) for c, model in (models or {}).items()}
    parts: dict[str, list[ModuleFactors]] = {}
    for adapter, strength in items:
        for key, m in _modules(adapter, models, keys).items():
            down = m.down.float() * (strength * m.scale)  # (r, in[, kh, kw])
            parts.setdefault(key, []).append(ModuleFactors(down=down, up=m.up.float()))
    modules = {}
    for key, factors in parts.items():
        shape = max((f.down.shape for f in factors), key=len)  # a conv kernel shape wins
        fitted = [fit_factors(f, (f.up.shape[0], *shape[1:])) for f in factors]
        # a summed rank above the layer's dims is re-factored to them by SVD, losing nothing
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
        if k in ("sdlora_base_model", "ss_base_model_version", FAMILY_KEY, PREDICTION_KEY)
    }
    triggers = [w for adapter, strength in items if strength for w in adapter.trigger_words()]
    if triggers:
        meta["sdlora_trigger_words"] = json.dumps(list(dict.fromkeys(triggers)))
    diffs: dict[str, torch.Tensor] = {}  # bias / norm differences add exactly (lora/offsets.py)
    for adapter, strength in items:
        for key, delta in adapter.diffs.items():
            diffs[key] = diffs.get(key, 0.0) + strength * delta.float()
    return Adapter(modules=modules, metadata=meta, source="merged", embeddings=words, diffs=diffs)


def _modules(
    adapter: Adapter, models: dict[str, nn.Module] | None, keys: dict[str, dict[str, str]]
) -> dict[str, ModuleFactors]:
    """The adapter's modules by key: as in its file, or (with `models`) by `keys`, the base
    family's names, fitted to the base's weight shapes."""
    if models is None:
        return adapter.modules
    resolved, _ = resolve(adapter, models)
    return {keys[component][path]: factors for (component, path), factors in resolved.items()}


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
        raise SdloraError(f"must be at least 1 (got {rank})", setting="rank")
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
        diffs=adapter.diffs,  # bias / norm differences: kept exactly (they have no rank)
    )
    return kept, report


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """`delta` with all but its ⌊density·numel⌋ largest-magnitude entries set to 0 (TIES' trim)."""
    if density >= 1:
        return delta
    keep = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    keep[torch.topk(delta.abs().flatten(), k=int(density * delta.numel())).indices] = 1
    return delta * keep.view_as(delta)


def drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density` (drawn from `generator`) and divide the
    kept ones by `density`, so the expected value is `delta` itself."""
    if density >= 1:
        return delta
    keep = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * keep / density


def elect_sign(
    deltas: torch.Tensor, majority_sign: Literal["total", "frequency"] = "total"
) -> torch.Tensor:
    """(n, …) bool: where each delta's sign is the elected one, the sign of the entries' sum
    ("total") or of the count of their signs ("frequency"); a tie elects +."""
    signs = deltas.sign()
    if majority_sign not in ("total", "frequency"):
        raise SdloraError(
            f"must be 'total' or 'frequency' (got {majority_sign!r})", setting="majority_sign"
        )
    votes = (deltas if majority_sign == "total" else signs).sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(deltas.dtype)
    return signs == elected


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Per entry, the mean of the weighted deltas whose sign agrees with the elected one (0 where
    none does)."""
    total = (weighted * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1).to(weighted.dtype)


def combine(
    deltas: list[torch.Tensor],
    weights: list[float],
    method: str,
    density: float = 1.0,
    majority_sign: Literal["total", "frequency"] = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One layer's merged ΔW from the adapters' ΔW_i (same shape) and weights w_i by `method`
    (module docstring); `generator` draws DARE's drops."""
    if method == "sum" or method == "svd":
        parts = deltas
    elif method in ("ties", "magnitude-prune"):
        parts = [trim(d, density) for d in deltas]
    elif method in ("dare", "dare-ties"):
        if generator is None:
            generator = torch.Generator(device=deltas[0].device).manual_seed(0)
        parts = [drop(d, density, generator) for d in deltas]
    else:
        raise SdloraError(f"must be one of {', '.join(METHODS)} (got {method!r})", setting="method")
    stacked = torch.stack(parts)  # (n, out, in·kh·kw)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    weighted = stacked * w.view(-1, *([1] * (stacked.dim() - 1)))
    if method in ("ties", "dare-ties"):
        return disjoint_mean(weighted, elect_sign(stacked, majority_sign))
    return weighted.sum(dim=0)


def check_density(method: str, density: float | None) -> float:
    """The density a pruning method needs, in (0, 1]; refused for the methods that take none."""
    if method not in METHODS:
        raise SdloraError(f"must be one of {', '.join(METHODS)} (got {method!r})", setting="method")
    if method not in PRUNING:
        if density is not None:
            raise SdloraError(
                f"applies only to {', '.join(PRUNING)} (got it with method {method!r})",
                setting="density",
            )
        return 1.0
    if density is None:
        raise SdloraError(
            f"is needed by method {method!r}: the fraction of each ΔW's entries kept, in (0, 1]",
            setting="density",
        )
    if not (0 < density <= 1) or math.isnan(density):
        raise SdloraError(f"must be in (0, 1] (got {density:g})", setting="density")
    return float(density)


def module_delta(factors: ModuleFactors) -> torch.Tensor:
    """ΔW = s·B·A of one module in fp32, (out, in[, kh, kw]), by the LoRA layer's `delta_weight`."""
    return LoRAWeights(factors.down, factors.up, scale=factors.scale).delta_weight()


def merge_deltas(
    items: list[tuple[Adapter, float]],
    method: str,
    rank: int,
    density: float = 1.0,
    seed: int = 0,
    majority_sign: Literal["total", "frequency"] = "total",
) -> tuple[Adapter, MergeReport]:
    """`items` merged module by module on their ΔW by `method` (`combine`) and factored to at
    most `rank` by SVD, with the relative error per module and overall. Modules are taken in
    sorted order from one generator seeded with `seed`, so one seed always gives one file."""
    from sdlora.tools.extract import extract_module  # extract builds on this module

    # checks the adapters and carries their new words, trigger words and base metadata as the
    # exact sum does, before any ΔW is formed
    carried = merge_exact(items)
    kept = [(a, s) for a, s in items if s != 0]
    parts: dict[str, list[tuple[ModuleFactors, float]]] = {}
    for adapter, strength in kept:
        for key, m in adapter.modules.items():
            parts.setdefault(key, []).append((m, strength))
    generator = torch.Generator().manual_seed(seed)
    report = MergeReport(rank=rank)
    modules, total_err, total_norm = {}, 0.0, 0.0
    for key in sorted(parts):
        shape = max((m.down.shape for m, _ in parts[key]), key=len)  # a conv kernel shape wins
        deltas = [
            module_delta(fit_factors(m, (m.up.shape[0], *shape[1:]))).cpu()  # CPU draws
            for m, _ in parts[key]
        ]
        delta = combine(
            deltas, [s for _, s in parts[key]], method, density, majority_sign, generator
        )
        if not torch.isfinite(delta).all():
            raise SdloraError(f"module {key}: the merged ΔW is not finite; check the input files")
        modules[key], err, norm = extract_module(delta, rank)
        report.errors[key] = math.sqrt(err / norm) if norm > 0 else 0.0
        total_err, total_norm = total_err + err, total_norm + norm
    report.overall = math.sqrt(total_err / total_norm) if total_norm > 0 else 0.0
    merged = Adapter(
        modules=modules,
        metadata=dict(carried.metadata),
        source="merged",
        embeddings=carried.embeddings,
    )
    return merged, report


def merge_adapters(
    items: list[tuple[Adapter, float]],
    rank: int | None = None,
    method: str = "sum",
    density: float | None = None,
    seed: int = 0,
    majority_sign: Literal["total", "frequency"] = "total",
) -> tuple[Adapter, MergeReport]:
    """Merge (adapter, strength) pairs by `method` (`METHODS`, module docstring).

    "sum" is exact, compressed to `rank` if given; the others are factored to `rank` (default:
    the largest rank among the inputs, as PEFT does). `density` (in (0, 1]) is the fraction of
    each ΔW kept by ties, dare, dare-ties and magnitude-prune; `seed` draws DARE's drops;
    `majority_sign` is TIES' sign election, "total" or "frequency".
    """
    if not items:
        raise SdloraError("give at least one adapter to merge")
    density_used = check_density(method, density)
    if rank is not None and rank < 1:
        raise SdloraError(f"must be at least 1 (got {rank})", setting="rank")
    for adapter, strength in items:
        check_strength(adapter.source, strength)
    if method == "sum":
        merged = merge_exact(items)
        report = MergeReport(rank=None)
        if rank is not None:
            merged, report = compress(merged, rank)
    else:
        with_diffs = next((a.source for a, _ in items if a.diffs), None)
        if with_diffs is not None:
            raise SdloraError(
                f"{with_diffs}: holds bias/norm differences (.diff_b, 1-D .diff), which only "
                "the exact sum adds; merge it with --method sum"
            )
        if rank is None:
            rank = max(r for a, _ in items for r in a.ranks() or [1])
        merged, report = merge_deltas(items, method, rank, density_used, seed, majority_sign)
    merged.metadata.update(
        {
            "sdlora_merged_from": ", ".join(f"{a.source}:{s:g}" for a, s in items),
            "sdlora_merge_rank": "exact" if report.rank is None else str(report.rank),
            "sdlora_merge_relative_error": f"{report.overall:.3g}",
        }
    )
    if method != "sum":
        merged.metadata["sdlora_merge_method"] = method
        if method in PRUNING:
            merged.metadata["sdlora_merge_density"] = f"{density_used:g}"
        if method in ("dare", "dare-ties"):
            merged.metadata["sdlora_merge_seed"] = str(seed)
        if method in ("ties", "dare-ties"):
            merged.metadata["sdlora_merge_majority_sign"] = majority_sign
    return merged, report
