"""Writing linear adapters in other tools' layouts: kohya/A1111 flat keys or diffusers/PEFT.

kohya:     `lora_unet_<flat>.lora_down.weight` / `.lora_up.weight` / `.alpha` (what sdlora saves).
diffusers: `unet.<module path>.lora_A.weight` / `lora_B.weight`, `text_encoder.<path>...`, with a
           `lora_adapter_metadata` header (r, lora_alpha, rank_pattern, alpha_pattern per
           component) as `save_lora_weights` writes it; name the file
           `pytorch_lora_weights.safetensors` for `load_lora_weights(folder)`.

In both the training scale is folded into A (alpha = rank), so strength 1.0 means "as trained"
everywhere. diffusers keys need real module paths, but flat names lose the dots. Without a base,
the path is rebuilt from SD's module-name vocabulary (diffusers UNet2DConditionModel and
CLIPTextModel names), which is unambiguous for SD 1.x/2.x; a name outside it is refused (SDXL's
original-layout UNet names need the base's config: pass one). With a base, the paths come from
its modules and keys it lacks are refused, and a kohya file gets the names the base's family
uses (SDXL: original UNet names, lora_te1_/lora_te2_).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from sdlora.errors import SdloraError
from sdlora.io.files import atomic_save_file, check_output, fold_scale, save_adapter
from sdlora.io.formats import FORMAT_KEY
from sdlora.io.labels import file_labels, writing_family
from sdlora.lora.adapter import (
    Adapter,
    _suffix,
    check_family,
    component_of,
    fit_factors,
    fits,
    module_keys,
    module_paths,
    weight_of,
)
from sdlora.lora.embeddings import file_name, save_embedding_files

TARGET_FORMATS = ("kohya", "diffusers")

# Module names made of several underscore-joined words, in diffusers' UNet and CLIP text model.
COMPOUNDS = {
    "down_blocks",
    "up_blocks",
    "mid_block",
    "transformer_blocks",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "proj_in",
    "proj_out",
    "conv_shortcut",
    "time_emb_proj",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "time_embedding",
    "linear_1",
    "linear_2",
    "add_embedding",
    "text_model",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "layer_norm1",
    "layer_norm2",
    "final_layer_norm",
    "token_embedding",
    "position_embedding",
}
WORDS = {
    "attentions",
    "resnets",
    "attn1",
    "attn2",
    "ff",
    "net",
    "proj",
    "norm",
    "norm1",
    "norm2",
    "norm3",
    "conv1",
    "conv2",
    "conv",
    "downsamplers",
    "upsamplers",
    "encoder",
    "layers",
    "mlp",
    "fc1",
    "fc2",
    "embeddings",
}
# Keys the diffusers layout drops (stale once re-written) or sdlora re-derives.
DROPPED_METADATA = ("lora_adapter_metadata", FORMAT_KEY, "format")


def path_by_name(component: str, suffix: str) -> str:
    """`down_blocks_0_attentions_0_proj_in` -> `down_blocks.0.attentions.0.proj_in` (SD names)."""
    tokens, parts, i = suffix.split("_"), [], 0
    while i < len(tokens):
        for width in (3, 2, 1):
            word = "_".join(tokens[i : i + width])
            if i + width <= len(tokens) and (word in COMPOUNDS or word in WORDS or word.isdigit()):
                parts.append(word)
                i += width
                break
        else:
            raise SdloraError(
                f"cannot tell the module path of {component} module {suffix!r} from its name; "
                "pass --base to take the paths from a base model"
            )
    return ".".join(parts)


def paths_for(adapter: Adapter, models: dict[str, nn.Module] | None) -> dict[str, tuple[str, str]]:
    """Flat key -> (component, module path), from the base's modules or by name."""
    paths: dict[str, tuple[str, str]] = {}
    missing: list[str] = []
    misfits: list[str] = []  # "key (file out×in, base out×in)"
    lookups = {c: module_paths(m, c) for c, m in (models or {}).items()}
    if models is not None:
        check_family(adapter, models)  # another family: one line naming both, before any shape
    for key, factors in adapter.modules.items():
        comp = component_of(key)
        if comp is None:
            raise SdloraError(f"{adapter.source}: module {key} belongs to no UNet or text encoder")
        suffix = _suffix(comp, key)
        if models is None:
            paths[key] = (comp, path_by_name(comp, suffix))
        elif suffix in lookups[comp]:
            paths[key] = (comp, lookups[comp][suffix])
            shape = weight_of(models[comp], lookups[comp][suffix]).shape
            if not fits(factors, shape):
                theirs = f"{factors.up.shape[0]}×{factors.down[0].numel()}"
                misfits.append(f"{key} (file {theirs}, base {shape[0]}×{shape[1:].numel()})")
        else:
            missing.append(key)
    if missing:
        raise SdloraError(
            f"{adapter.source}: {len(missing)} modules do not exist in this base "
            f"(e.g. {', '.join(missing[:3])}); nothing was written"
        )
    if misfits:
        raise SdloraError(
            f"{adapter.source}: {len(misfits)} modules have other shapes than in this base "
            f"(e.g. {', '.join(misfits[:2])}); was it made for another base model? "
            "nothing was written"
        )
    return paths


def folded(adapter: Adapter) -> Adapter:
    """A copy with each module's scale folded into A (alpha = rank); linear adapters only."""
    if not adapter.is_linear:
        raise SdloraError(
            f"{adapter.source}: has nonlinearity {adapter.nonlinearity!r}; other tools would apply "
            "it as a plain LoRA and draw wrong images, so it cannot be converted"
        )
    modules = {k: fold_scale(m, "identity")[0] for k, m in adapter.modules.items()}
    meta = {k: v for k, v in adapter.metadata.items() if k not in DROPPED_METADATA}
    meta["sdlora_converted_from"] = adapter.metadata.get(FORMAT_KEY, "unknown")
    return Adapter(
        modules=modules,
        metadata=meta,
        source=adapter.source,
        embeddings=adapter.embeddings,
        diffs=adapter.diffs,
    )


def diffusers_state(
    adapter: Adapter, models: dict[str, nn.Module] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(tensors, per-component PEFT config) in the diffusers layout for a folded linear adapter."""
    paths = paths_for(adapter, models)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, dict[str, int]] = {}
    for key, factors in adapter.modules.items():
        comp, path = paths[key]
        if models is not None:
            factors = fit_factors(factors, weight_of(models[comp], path).shape)
        if comp in ("text_encoder", "text_encoder_2") and path != "text_projection":  # CLIP
            # Keys keep CLIP's `text_model.` level, as files everywhere do (diffusers maps them
            # onto transformers 5, which dropped it); patterns leave it out, so they match either.
            path = path.removeprefix("text_model.")
            key = f"{comp}.text_model.{path}"
        else:
            key = f"{comp}.{path}"
        tensors[f"{key}.lora_A.weight"] = factors.down.detach().float().contiguous()
        tensors[f"{key}.lora_B.weight"] = factors.up.detach().float().contiguous()
        ranks.setdefault(comp, {})[path] = factors.rank
    configs = {}
    for comp, by_path in ranks.items():
        common = Counter(by_path.values()).most_common(1)[0][0]
        others = {p: r for p, r in by_path.items() if r != common}
        configs[comp] = {
            "r": common,
            "lora_alpha": common,  # alpha = rank: the scale is folded into A
            "rank_pattern": others,
            "alpha_pattern": dict(others),
            "target_modules": sorted(by_path),
            "peft_type": "LORA",
            "use_dora": False,
            "use_rslora": False,
            "lora_dropout": 0.0,
            "bias": "none",
            "init_lora_weights": True,
        }
    return tensors, configs


def convert_adapter(
    adapter: Adapter,
    to: str,
    out: str | Path,
    models: dict[str, nn.Module] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `adapter` (linear) to `out` in the `to` layout ('kohya' or 'diffusers').

    New words (sdlora/lora/embeddings.py) stay bundled in a kohya file; the diffusers layout has no
    place for them, so they go to `<out stem>-embeddings/<token>.safetensors` beside it."""
    out = Path(out)
    if to not in TARGET_FORMATS:
        raise SdloraError(
            f"unknown target format {to!r}; choose one of: {', '.join(TARGET_FORMATS)}"
        )
    out = check_output(out, overwrite, setting=None, suffix=".safetensors", make_parents=True)
    adapter = folded(adapter)
    if adapter.is_dora and to != "kohya":  # diffusers' loader drops DoRA magnitudes
        raise SdloraError(f"{adapter.source}: a DoRA adapter converts only to the kohya layout")
    if to == "kohya":
        if models is not None:  # refuse keys the base lacks; name the rest as its family does
            paths = paths_for(adapter, models)
            names = {comp: module_keys(model, comp) for comp, model in models.items()}
            adapter.modules = {
                names[paths[key][0]][paths[key][1]]: factors
                for key, factors in adapter.modules.items()
            }
        return save_adapter(adapter, out, overwrite=overwrite)
    if adapter.diffs:  # PEFT's LoRA has no place for a bias or norm difference
        raise SdloraError(
            f"{adapter.source}: holds bias/norm differences (.diff_b, 1-D .diff), which the "
            "diffusers layout cannot hold; convert it --to kohya"
        )
    tensors, configs = diffusers_state(adapter, models)
    for name, value in tensors.items():
        if not torch.isfinite(value).all():
            raise SdloraError(f"{out}: {name} has NaN/Inf weights; nothing was written")
    packed = {f"{comp}.{k}": v for comp, config in configs.items() for k, v in config.items()}
    adapter.metadata.pop("sdlora_format_version", None)  # that names sdlora's own layout
    metadata = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True),
        **{k: str(v) for k, v in adapter.metadata.items()},
    }
    family = writing_family(adapter)  # A1111/SwarmUI labels, as on every adapter file
    metadata |= file_labels(family, tensors, metadata, out.stem)
    beside = out.with_name(out.stem + "-embeddings")
    if adapter.embeddings and not overwrite:
        for token in adapter.embeddings:
            if (beside / f"{file_name(token)}.safetensors").exists():
                raise SdloraError(f"{beside / file_name(token)}.safetensors already exists")
    atomic_save_file(tensors, out, metadata)
    if adapter.embeddings:
        save_embedding_files(adapter.embeddings, beside, overwrite=overwrite)
    return out
