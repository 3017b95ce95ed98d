"""The current mix as one exact LoRA file: ranks concatenated, strengths folded into down (A).

Σ_i s_i·B_i·A_i = [B_1 … B_n]·[s_1·A_1; …; s_n·A_n], so the merged file at strength 1.0 equals
the live blend exactly (fp32), at the price of rank = the sum of the ranks. Keys are rebuilt from
the module each file resolves to in the base, in the base family's own layout (kohya's SGM
block names for SDXL), so old and new spellings of a key never collide.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from sdlora.errors import SdloraError
from sdlora.lora.adapter import Adapter, ModuleFactors, module_keys, resolve
from sdlora.tools.merge import cap_rank


def merge_exact(
    adapters: list[tuple[str, Adapter, float]], models: dict[str, nn.Module]
) -> Adapter:
    """One linear adapter equal to Σ strength·ΔW of `adapters` [(name, adapter, strength)]."""
    nonlinear = [name for name, adapter, _ in adapters if not adapter.is_linear]
    if nonlinear:
        raise SdloraError(
            f"nonlinear adapters cannot be merged into one LoRA: {', '.join(nonlinear)}; "
            "disable them or set their strength to 0"
        )
    if not adapters:
        raise SdloraError("the mix is empty; enable at least one adapter to merge")
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    # the key each module has in the base family's own layout (SGM block names for SDXL)
    keys = {component: module_keys(model, component) for component, model in models.items()}
    for name, adapter, strength in adapters:
        resolved, _ = resolve(adapter, models)
        for (component, path), factors in resolved.items():
            down = factors.down.float() * (strength * factors.scale)  # (r, in[, kh, kw])
            up = factors.up.float()  # (out, r[, 1, 1])
            key = keys[component][path]
            if parts.get(key) and parts[key][0][0].shape[1:] != down.shape[1:]:
                raise SdloraError(f"{name}: {key} has a different shape than in the other adapters")
            parts.setdefault(key, []).append((down, up))
    modules = {
        # a summed rank above the layer's dims is re-factored to them by SVD, losing nothing
        key: cap_rank(
            ModuleFactors(
                down=torch.cat([d for d, _ in pairs]), up=torch.cat([u for _, u in pairs], dim=1)
            )
        )
        for key, pairs in parts.items()
    }
    words = [w for _, adapter, _ in adapters for w in adapter.trigger_words()]
    metadata = {
        "sdlora_merged_from": json.dumps({name: strength for name, _, strength in adapters}),
        "sdlora_trigger_words": json.dumps(list(dict.fromkeys(words))),
    }
    base_model = adapters[0][1].metadata.get("sdlora_base_model")
    if base_model:
        metadata["sdlora_base_model"] = base_model
    return Adapter(modules=modules, nonlinearity="identity", metadata=metadata, source="merged")
