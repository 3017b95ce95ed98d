"""Extraction: a LoRA from the difference of two checkpoints, ΔW = W_tuned − W_base, by SVD.

For each target module of the UNet and text encoder(s) the best rank-R approximation of ΔW
(Eckart-Young) gives up = U·√S, down = √S·Vᵀ; the relative Frobenius error is reported per module
and overall. Modules that did not change are left out.
"""

from __future__ import annotations

import math

import torch
from diffusers import DiffusionPipeline

from sdlora.bases.pipelines import adaptable_models
from sdlora.errors import SdloraError
from sdlora.io.labels import base_labels
from sdlora.lora.adapter import Adapter, ModuleFactors, module_keys
from sdlora.lora.inject import TEXT_ENCODER_TARGETS, UNET_TARGETS, find_targets, target_names
from sdlora.tools.merge import MergeReport


def extract_module(delta: torch.Tensor, rank: int) -> tuple[ModuleFactors, float, float]:
    """Rank-`rank` factors of ΔW (out, in[, kh, kw]); returns (factors, squared error, squared norm)."""
    matrix = delta.float().reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = min(rank, s.shape[0])
    root = s[:r].sqrt()
    up, down = u[:, :r] * root, root[:, None] * vh[:r]
    conv = delta.dim() == 4
    factors = ModuleFactors(
        down=down.reshape(r, *delta.shape[1:]).contiguous(),
        up=(up[:, :, None, None] if conv else up).contiguous(),
    )
    return factors, float((s[r:] ** 2).sum()), float((s**2).sum())


def extract_adapter(
    base: DiffusionPipeline,
    tuned: DiffusionPipeline,
    rank: int,
    targets: str = "attn",
    base_name: str = "base",
    tuned_name: str = "tuned",
) -> tuple[Adapter, MergeReport]:
    """LoRA of rank `rank` approximating tuned − base over the `targets` preset of both models."""
    if rank < 1:
        raise SdloraError(f"--rank must be at least 1 (got {rank})")
    report = MergeReport(rank=rank)
    modules: dict[str, ModuleFactors] = {}
    total_err = total_norm = 0.0
    for comp, base_model in adaptable_models(base).items():
        preset = UNET_TARGETS if comp == "unet" else TEXT_ENCODER_TARGETS
        tuned_model = getattr(tuned, comp, None)
        if tuned_model is None:
            raise SdloraError(
                f"{tuned_name} has no {comp} and {base_name} has; both models must share one "
                "architecture"
            )
        tuned_modules = dict(tuned_model.named_modules())
        keys = module_keys(base_model, comp)  # the names of the base's family
        for path in find_targets(base_model, target_names(targets, preset)):
            w0 = base_model.get_submodule(path).weight
            other = tuned_modules.get(path)
            if (
                other is None
                or getattr(other, "weight", None) is None
                or other.weight.shape != w0.shape
            ):
                raise SdloraError(
                    f"{tuned_name}: {comp} module {path} is missing or has another shape than in "
                    f"{base_name}; both models must share one architecture"
                )
            delta = other.weight.detach().float().cpu() - w0.detach().float().cpu()
            if not torch.isfinite(delta).all():
                raise SdloraError(f"{tuned_name}: {comp} module {path} has NaN/Inf weights")
            if not delta.any():
                continue
            key = keys[path]
            modules[key], err, norm = extract_module(delta, rank)
            report.errors[key] = math.sqrt(err / norm)
            total_err, total_norm = total_err + err, total_norm + norm
    if not modules:
        raise SdloraError(
            f"{tuned_name} has the same weights as {base_name} in every target module ({targets}); "
            "nothing to extract"
        )
    report.overall = math.sqrt(total_err / total_norm)
    meta = {
        **base_labels(base),  # the family from the base, whatever its modules show
        "sdlora_extracted_from": f"{tuned_name} - {base_name}",
        "sdlora_extract_targets": targets,
        "sdlora_extract_rank": str(rank),
        "sdlora_extract_relative_error": f"{report.overall:.3g}",
    }
    return Adapter(modules=modules, metadata=meta, source=tuned_name), report
