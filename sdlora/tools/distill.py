"""Distillation: a linear LoRA of rank R that does what a nonlinear adapter does on real inputs.

A nonlinear adapter adds s·B·σ(A·x) at each layer; it cannot be fused, exported or read by other
tools. For each layer, with X (n, d) the inputs it really sees (rows = tokens or conv patches,
collected by `sdlora.lora.activations`) and Y (n, out) the adapter's outputs on them, we look for

    ΔW* = argmin ‖X·ΔWᵀ − Y‖_F  over ΔW (out, d) of rank ≤ R

which is reduced-rank regression (Izenman 1975; Reinsel & Velu, "Multivariate Reduced-Rank
Regression", ch. 2). With the least-squares fit W = (XᵀX)⁺XᵀY (d, out) and its fitted values
Ŷ = X·W, the residual splits into two orthogonal parts, because Y − Ŷ is orthogonal to the
columns of X and X·V is in them for any V:

    ‖Y − X·V‖² = ‖Y − Ŷ‖² + ‖Ŷ − X·V‖²

so the best rank-R X·V is the truncated SVD of Ŷ (Eckart-Young): Ŷ_R = Ŷ·V_R·V_Rᵀ with V_R the
top R right singular vectors of Ŷ, reached by V = W·V_R·V_Rᵀ. Hence ΔW* = V_R·(W·V_R)ᵀ:
up = V_R (out, R), down = (W·V_R)ᵀ (R, d). Only Gram matrices are needed: W solves
(XᵀX + λI)·W = XᵀY (Cholesky), and V_R are the top eigenvectors of ŶᵀŶ = Wᵀ·XᵀX·W (out, out),
whose eigenvalues are the squared singular values of Ŷ (equivalently of (XᵀX)^(1/2)·W). The tiny
ridge λ (1e-10 of XᵀX's mean eigenvalue) keeps the solve defined when the inputs do not span
every direction; XᵀY has no part outside the inputs' span, so ΔW is zero on directions the data
never visits. The squared residual ‖Y‖² − 2·tr(ΔW·XᵀY) + tr(ΔW·XᵀX·ΔWᵀ) needs only the Grams.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import StableDiffusionPipeline

from sdlora.errors import SdloraError
from sdlora.io.labels import base_labels
from sdlora.io.metadata import parse_json
from sdlora.lora.activations import LayerStats, Probe, collect, noise_predictions
from sdlora.lora.adapter import Adapter, ModuleFactors, flat_name
from sdlora.lora.blend import Mixer
from sdlora.lora.layer import LoRALayer, max_rank

# λ = RIDGE · mean eigenvalue of XᵀX: keeps the solve defined when X is rank-deficient
RIDGE = 1e-10
NONLINEAR, LINEAR = "nonlinear", "distilled"  # adapter names on the pipe while distilling


@dataclass
class DistillReport:
    """How well the linear adapter reproduces the nonlinear one."""

    rank: int
    errors: dict[str, float] = field(default_factory=dict)  # ‖XΔWᵀ − Y‖ / ‖Y‖ per layer
    overall: float = 0.0  # the same over all layers: √(Σ residual² / Σ ‖Y‖²)
    # on held-out noise (and prompts, if given): UNet noise predictions ε with each adapter
    output_difference: float = 0.0  # ‖ε_nonlinear − ε_linear‖ / ‖ε_nonlinear‖
    effect_difference: float = 0.0  # ‖ε_nonlinear − ε_linear‖ / ‖ε_nonlinear − ε_base‖
    prompts: list[str] = field(default_factory=list)  # what the activations were collected on


def fit_reduced_rank(stats: LayerStats, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best ΔW of rank ≤ `rank` for Y ≈ X·ΔWᵀ: (up (out, r), down (r, d), squared residual).

    float64; r = min(rank, out). Factors are balanced: each rank-one term has equal norms in up
    and down.
    """
    gram, cross = stats.gram, stats.cross
    d = gram.shape[0]
    ridge = RIDGE * float(gram.diagonal().sum()) / d
    if ridge <= 0:  # the layer only ever saw zeros: nothing to fit
        empty = torch.zeros(0, dtype=torch.float64)
        return empty.reshape(cross.shape[1], 0), empty.reshape(0, d), stats.y_norm2
    eye = torch.eye(d, dtype=gram.dtype, device=gram.device)
    w = torch.cholesky_solve(cross, torch.linalg.cholesky(gram + ridge * eye))  # (d, out)
    fitted = w.T @ gram @ w  # ŶᵀŶ (out, out)
    _, vecs = torch.linalg.eigh(fitted)  # ascending
    r = min(rank, vecs.shape[1])
    v = vecs[:, -r:].flip(1)  # (out, r): top right singular vectors of Ŷ
    up, down = v, (w @ v).T  # ΔW = V_R·(W·V_R)ᵀ
    norms = down.norm(dim=1).clamp(min=1e-300).sqrt()  # balance: ‖up_i‖ = ‖down_i‖
    up, down = up * norms, down / norms[:, None]
    return up, down, residual(stats, up @ down)


def residual(stats: LayerStats, delta: torch.Tensor) -> float:
    """‖X·ΔWᵀ − Y‖² from the statistics, for any ΔW (out, d)."""
    w = delta.double().reshape(delta.shape[0], -1).T  # (d, out)
    value = stats.y_norm2 - 2 * float((w * stats.cross).sum()) + float((w * (stats.gram @ w)).sum())
    return max(value, 0.0)


def prompts_from_metadata(metadata: dict[str, str]) -> list[str]:
    """Training prompts the file records: sample prompts, default caption and trigger words
    (`sdlora_training`), or kohya's tag frequencies (`ss_tag_frequency`, most frequent first)."""
    prompts: list[str] = []

    def read(key: str, empty: Any) -> Any:  # damaged or crafted metadata gives no prompts
        try:
            return parse_json(metadata.get(key) or json.dumps(empty), key)
        except SdloraError:
            return empty

    training = read("sdlora_training", {})
    words = read("sdlora_trigger_words", [])
    tags = read("ss_tag_frequency", {})
    if isinstance(training, dict):
        trigger = training.get("trigger") or ""
        prompts += [str(p) for p in training.get("sample_prompts") or []]
        caption = training.get("caption")
        if caption:
            prompts.append(
                f"{trigger}, {caption}" if trigger and trigger not in caption else caption
            )
    prompts += [str(w) for w in words if isinstance(words, list)]
    if isinstance(tags, dict):
        for counts in tags.values():
            if isinstance(counts, dict) and counts:
                ranked = sorted(counts, key=lambda t: -float(counts[t]))
                prompts.append(", ".join(str(t) for t in ranked[:20]))
    return list(dict.fromkeys(p.strip() for p in prompts if str(p).strip()))


def adapted_layers(mixer: Mixer, name: str) -> dict[str, LoRALayer]:
    """{flat key: layer} of every layer holding adapter `name` on the mixer's pipe."""
    layers = {}
    for comp, model in mixer.models.items():
        for path, module in model.named_modules():
            if isinstance(module, LoRALayer) and name in module.strengths:
                layers[flat_name(comp, path)] = module
    return layers


def check_rank_fits(layers: dict[str, LoRALayer], rank: int) -> None:
    """Refuse rank < 1 and a rank above min(out, in·kh·kw) of any layer, naming it."""
    if rank < 1:
        raise SdloraError(f"--rank must be at least 1 (got {rank})")
    for key, layer in layers.items():
        if rank > max_rank(layer.base):
            raise SdloraError(
                f"--rank {rank} is larger than module {key} allows ({max_rank(layer.base)}); "
                "use a smaller --rank"
            )


def _factors(up: torch.Tensor, down: torch.Tensor, layer: LoRALayer) -> ModuleFactors:
    """float64 matrices -> float32 factors shaped for the layer (kernel shape for a Conv2d)."""
    shape = layer.base.weight.shape
    r = down.shape[0]
    conv = len(shape) == 4
    return ModuleFactors(
        down=down.float().reshape(r, *shape[1:]).contiguous(),
        up=(up.float()[:, :, None, None] if conv else up.float()).contiguous(),
        alpha=float(r),
    )


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (0 when both are zero)."""
    norm = float(b.double().norm())
    return float((a.double() - b.double()).norm()) / norm if norm > 0 else 0.0


# Noise draws per prompt. Each prompt's draws run through the UNet as one batch, at timesteps
# stratified over the schedule's 1000: 256 already sample every fourth, and a batch of 256
# SDXL latents is as much as one large GPU holds.
MAX_SAMPLES = 256


def check_request(adapter: Adapter, rank: int, samples: int = 4, seed: int = 0) -> None:
    """Refuse a linear adapter (nothing to distill), rank < 1, samples outside 1 to
    MAX_SAMPLES or a bad seed."""
    if adapter.is_linear:
        raise SdloraError(
            f"{adapter.source}: is already a linear adapter; to change its rank use "
            "`sdlora merge FILE --rank R --out OUT`"
        )
    if rank < 1:
        raise SdloraError(f"must be at least 1 (got {rank})", setting="rank")
    if samples < 1:
        raise SdloraError(f"must be at least 1 (got {samples})", setting="samples")
    if samples > MAX_SAMPLES:
        raise SdloraError(f"must be at most {MAX_SAMPLES} (got {samples})", setting="samples")
    if not 0 <= seed < 2**64 - 1:  # the held-out check uses seed + 1
        raise SdloraError(f"must be from 0 to 2**64 - 2 (got {seed})", setting="seed")


def distill_adapter(
    pipe: StableDiffusionPipeline,
    adapter: Adapter,
    rank: int,
    prompts: list[str] | None = None,
    samples: int = 4,
    seed: int = 0,
    held_out: list[str] | None = None,
) -> tuple[Adapter, DistillReport]:
    """A linear adapter of rank `rank` fitted to the nonlinear `adapter` on `pipe`.

    `prompts` default to the training prompts the file records; the empty prompt is added, since
    classifier-free guidance runs the UNet on it at every step. The output-level check runs on
    fresh latents and timesteps (seed + 1), with the `held_out` prompts if given (else the same
    prompts). `pipe` is left without adapters.
    """
    check_request(adapter, rank, samples, seed)
    prompts = list(prompts or prompts_from_metadata(adapter.metadata))
    if not prompts:
        raise SdloraError(
            f"{adapter.source}: records no training prompts or captions; give --prompts or "
            "--prompts-file with prompts like those it was trained on"
        )
    mixer = Mixer(pipe)
    if any(isinstance(m, LoRALayer) for model in mixer.models.values() for m in model.modules()):
        raise SdloraError("the base already has adapters applied; distill on a clean base")
    try:
        mixer.add(adapter, name=NONLINEAR)  # resolves keys: refuses a file for another base
        layers = adapted_layers(mixer, NONLINEAR)
        check_rank_fits(layers, rank)
        used = prompts + ([""] if "" not in prompts else [])
        stats = collect(pipe, layers, NONLINEAR, Probe(used, samples, seed))
        report = DistillReport(rank=rank, prompts=prompts)
        modules: dict[str, ModuleFactors] = {}
        total_err = total_norm = 0.0
        for key, layer_stats in stats.items():
            up, down, err = fit_reduced_rank(layer_stats, rank)
            if down.shape[0] == 0:
                continue  # the layer saw only zeros: the adapter did nothing there
            modules[key] = _factors(up, down, layers[key])
            norm = layer_stats.y_norm2
            report.errors[key] = math.sqrt(err / norm) if norm > 0 else 0.0
            total_err, total_norm = total_err + err, total_norm + norm
        if not modules:
            raise SdloraError(f"{adapter.source}: no adapted layer saw any input; nothing to fit")
        report.overall = math.sqrt(total_err / total_norm) if total_norm > 0 else 0.0
        linear = Adapter(modules=modules, metadata={}, source=adapter.source)
        check = Probe(list(held_out) if held_out else used, samples, seed + 1)
        _compare_outputs(mixer, linear, check, report)
    finally:
        mixer.clear()
    linear.metadata = _metadata(adapter, report) | base_labels(pipe)  # the family of the base
    return linear, report


def _compare_outputs(mixer: Mixer, linear: Adapter, probe: Probe, report: DistillReport) -> None:
    """Noise predictions with the nonlinear adapter, the distilled one and neither, on `probe`."""
    mixer.add(linear, name=LINEAR, strength=1.0)
    mixer.enable(NONLINEAR, False)
    eps_linear = noise_predictions(mixer.pipe, probe)
    mixer.enable(LINEAR, False)
    eps_base = noise_predictions(mixer.pipe, probe)
    mixer.enable(NONLINEAR, True)
    eps_nonlinear = noise_predictions(mixer.pipe, probe)
    report.output_difference = _relative(eps_linear, eps_nonlinear)
    effect = eps_nonlinear - eps_base
    report.effect_difference = _relative(eps_linear - eps_base, effect)


def _metadata(adapter: Adapter, report: DistillReport) -> dict[str, str]:
    """The source's base and trigger words, plus where the file came from and how close it is."""
    kept = ("sdlora_base_model", "ss_base_model_version", "sdlora_trigger_words")
    meta = {k: v for k, v in adapter.metadata.items() if k in kept}
    meta.update(
        {
            "sdlora_distilled_from": adapter.source,
            "sdlora_distilled_nonlinearity": adapter.nonlinearity,
            "sdlora_distill_rank": str(report.rank),
            "sdlora_distill_relative_error": f"{report.overall:.3g}",
            "sdlora_distill_output_difference": f"{report.output_difference:.3g}",
            "sdlora_distill_effect_difference": f"{report.effect_difference:.3g}",
            "sdlora_distill_errors": json.dumps(
                {k: float(f"{v:.3g}") for k, v in report.errors.items()}, sort_keys=True
            ),
            "sdlora_distill_prompts": json.dumps(report.prompts),
        }
    )
    return meta
