"""Injection: wrap target modules of a model in LoRALayer, matched by module path.

A target name matches a module whose path equals it or ends with "." + name. Already wrapped
modules are reused, never wrapped twice. Nothing matched -> an error listing what exists.
"""

from __future__ import annotations

import json
import math

import torch
from torch import nn

from sdlora.bases.families import Family
from sdlora.errors import SdloraError
from sdlora.lora.adapter import Adapter, ModuleFactors, module_keys
from sdlora.lora.dora import OUTPUT, initial_magnitude
from sdlora.lora.layer import LoRALayer, LoRAWeights, check_nonlinearity, max_rank

# Presets of target names per component. "attn" is what most SD LoRAs train.
_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
_ALL = (*_ATTN, "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
# LoCon (kohya / LyCORIS): "all" plus the ResNet blocks and the down/up-samplers; k×k
# convolutions take --conv-rank, 1×1 convolutions and linear layers --rank
_CONVS = (
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
)
UNET_TARGETS = {
    "attn": _ATTN,
    "attn-ff": (*_ATTN, "ff.net.0.proj", "ff.net.2"),
    "all": _ALL,
    "locon": (*_ALL, *_CONVS),
}


# How LyCORIS names a DoRA network (per output row: wd_on_output) in kohya's metadata.
DORA_METADATA = {
    "ss_network_module": "lycoris.kohya",
    "ss_network_args": json.dumps({"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}),
}


def denoiser_targets(family: Family) -> dict[str, tuple[str, ...]]:
    """The target presets of a family's denoiser: "attn" is its attention's modules
    (`Family.attention_modules`: SD3's transformer adds the text side's add_*_proj and
    to_add_out); a UNet's presets (UNET_TARGETS) beyond attention where its denoiser is one."""
    attn = family.attention_modules
    presets = dict(UNET_TARGETS) if family.denoiser == "unet" else {}
    return {
        **presets,
        "attn": attn,
        "attn-ff": (*attn, *UNET_TARGETS["attn-ff"][len(_ATTN) :]),
        **dict(family.target_presets),
    }


TEXT_ENCODER_TARGETS = {
    "attn": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "attn-ff": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "all": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}


def target_names(spec: str | list[str] | tuple[str, ...], presets: dict[str, tuple]) -> tuple:
    """A preset name, a comma-separated list, or a list of module names -> tuple of names."""
    if isinstance(spec, str):
        if spec in presets:
            return presets[spec]
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    if not spec:
        raise SdloraError(f"no targets given; use a preset ({', '.join(presets)}) or module names")
    return tuple(spec)


def find_targets(model: nn.Module, names: tuple[str, ...] | list[str]) -> list[str]:
    """Paths of Linear/Conv2d modules (or existing LoRALayers) whose path matches any name."""
    found = []
    for path, module in model.named_modules():
        if path.endswith(".base") or not isinstance(module, nn.Linear | nn.Conv2d | LoRALayer):
            continue
        if any(path == n or path.endswith("." + n) for n in names):
            found.append(path)
    if not found:
        leaves = sorted(
            {
                p.rsplit(".", 2)[-2] + "." + p.rsplit(".", 1)[-1]
                if p.rsplit(".", 1)[-1].isdigit()
                else p.rsplit(".", 1)[-1]
                for p, m in model.named_modules()
                if isinstance(m, nn.Linear | nn.Conv2d) and "." in p and not p.endswith(".base")
            }
        )
        raise SdloraError(
            f"no module matches targets {', '.join(names)}; available: {', '.join(leaves)}"
        )
    return found


def wrap(model: nn.Module, path: str) -> LoRALayer:
    """Replace the module at `path` with a LoRALayer around it (or return the existing one)."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    module = getattr(parent, child)
    if isinstance(module, LoRALayer):
        return module
    layer = LoRALayer(module)
    setattr(parent, child, layer)
    return layer


def unwrap_all(model: nn.Module) -> None:
    """Put the plain base modules back (with W0 restored) wherever a LoRALayer stands."""
    for path, module in list(model.named_modules()):
        if isinstance(module, LoRALayer):
            module.fuse([])
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, module.base)


def add_trainable(
    model: nn.Module,
    component: str,
    targets: tuple[str, ...] | list[str],
    rank: int,
    alpha: float | None = None,
    nonlinearity: str = "identity",
    dropout: float = 0.0,
    name: str = "train",
    generator: torch.Generator | None = None,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    dora: bool = False,
) -> dict[str, LoRAWeights]:
    """Inject a fresh trainable adapter: A ~ Kaiming-uniform, B = 0, so outputs are unchanged.

    k×k convolutions (k > 1) take `conv_rank` and `conv_alpha` when a conv rank is given (LoCon:
    a k×k down and a 1×1 up); everything else `rank` and `alpha`. `dora`: each module also
    learns a DoRA magnitude per output row, m = ‖W0‖ at first (sdlora/lora/dora.py), so it
    too changes nothing until trained. Returns {flat key: LoRAWeights}; the factors are fp32
    parameters with requires_grad=True.
    """
    check_nonlinearity(nonlinearity)
    if dora and nonlinearity != "identity":
        raise SdloraError(
            f"DoRA renormalises the weight W0 + ΔW; an adapter with nonlinearity "
            f"{nonlinearity!r} has no ΔW; train DoRA with nonlinearity identity",
            setting="dora",
        )
    for what, value in (("rank", rank), ("conv rank", conv_rank)):
        if value is not None and value < 1:
            raise SdloraError(f"{what} must be at least 1 (got {value})")
    injected: dict[str, LoRAWeights] = {}
    keys = module_keys(model, component)  # the names of the model's family (SDXL: SGM UNet)
    for path in find_targets(model, targets):
        layer = wrap(model, path)
        weight = layer.base.weight
        r, a, option = rank, alpha, "--rank"
        if conv_rank is not None and weight.dim() == 4 and weight.shape[2:].numel() > 1:
            r, a, option = conv_rank, conv_alpha, "--conv-rank"
        scale = (a if a is not None else r) / r
        if r > max_rank(layer.base):
            raise SdloraError(
                f"rank {r} is larger than module {path} allows ({max_rank(layer.base)}); "
                f"use a smaller {option}"
            )
        down = torch.empty(r, *weight.shape[1:], dtype=torch.float32)
        # Kaiming-uniform with a = sqrt(5), as nn.Linear and peft initialise A
        bound = 1.0 / math.sqrt(down[0].numel())
        down.uniform_(-bound, bound, generator=generator)
        up = torch.zeros(weight.shape[0], r, *([1, 1] if weight.dim() == 4 else []))
        weights = LoRAWeights(
            down.to(weight.device),
            up.to(weight.device),
            scale=scale,
            nonlinearity=nonlinearity,
            dropout=dropout,
            conv=layer.conv_args(),
            trainable=True,
            magnitude=initial_magnitude(weight, OUTPUT) if dora else None,
        )
        layer.add(name, weights)
        injected[keys[path]] = weights
    return injected


def collect_adapter(
    injected: dict[str, LoRAWeights], metadata: dict[str, str] | None = None
) -> Adapter:
    """Snapshot trained factors as an Adapter with the scale folded in (alpha = rank)."""
    from sdlora.io.files import fold_scale

    nonlinearities = {w.nonlinearity for w in injected.values()}
    if len(nonlinearities) != 1:
        raise SdloraError("an adapter has exactly one nonlinearity")
    nonlinearity = nonlinearities.pop()
    modules: dict[str, ModuleFactors] = {}
    where = "down"
    for key, w in injected.items():
        factors = ModuleFactors(
            down=w.down.detach().float().cpu().clone(),
            up=w.up.detach().float().cpu().clone(),
            alpha=w.scale * w.rank,
            magnitude=w.magnitude.detach().float().cpu().clone() if w.is_dora else None,
        )
        modules[key], where = fold_scale(factors, nonlinearity)
    some = next(iter(injected.values()))
    meta = {
        "sdlora_rank": str(some.rank),
        "sdlora_alpha": str(some.rank),
        "sdlora_training_alpha": repr(some.scale * some.rank),
        "sdlora_scale_folded_into": where,
        **(DORA_METADATA if some.is_dora else {}),
        **(metadata or {}),
    }
    return Adapter(modules=modules, nonlinearity=nonlinearity, metadata=meta)
