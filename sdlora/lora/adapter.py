"""An adapter in memory: per-module factors keyed by their kohya-style flat names.

Keys are the names A1111, ComfyUI, kohya and diffusers all understand:
`lora_unet_<module path, dots as underscores>` for the UNet, `lora_te_<path>` for the (first)
text encoder (e.g. `lora_te_text_model_encoder_layers_0_self_attn_q_proj`) and `lora_te2_<path>`
for SDXL's second. The UNet path is diffusers' for SD 1.x/2.x and the original (SGM) one for
SDXL (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), as kohya writes them
(`Family.adapter_unet_names`); an SDXL UNet answers to its diffusers names too, which diffusers
and PEFT files use. SDXL files spell the first text encoder `lora_te1_`: it is read as `lora_te_`
(`memory_key`) and written back so (`file_key`). Keys are resolved to real module paths against a loaded base
(`resolve`), since underscores are ambiguous on their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from sdlora.bases.families import (
    FAMILIES,
    Family,
    describe_width,
    family_of_adapter_keys,
    family_of_transformer_config,
    family_of_unet_config,
    family_of_width,
)
from sdlora.errors import SdloraError
from sdlora.io.ldm_names import original_module_paths
from sdlora.io.metadata import parse_json
from sdlora.lora.dora import fit_magnitude

# component attribute on the pipeline -> flat-name prefix
PREFIXES = {
    "unet": "lora_unet_",
    "text_encoder": "lora_te_",
    "text_encoder_2": "lora_te2_",
    "text_encoder_3": "lora_te3_",  # SD 3.x: T5
    "transformer": "lora_transformer_",  # SD 3.x: the MMDiT (diffusers names)
}
# the leading modules of a CLIPTextModel that transformers 5 no longer nests under `text_model.`
CLIP_TOP = ("embeddings.", "encoder.", "final_layer_norm.")


@dataclass
class ModuleFactors:
    """One module's factors: down (r, in[, kh, kw]), up (out, r[, 1, 1]); scale = alpha / rank.

    DoRA modules carry their magnitude m as well (sdlora/lora/dora.py): (out, 1) per output row
    or (1, in) per input column, given trailing 1s once fitted to a conv weight (`fit_factors`).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None  # None means alpha = rank, i.e. scale 1
    magnitude: torch.Tensor | None = None  # DoRA's m; None for a plain LoRA

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclass
class Adapter:
    """A LoRA adapter: factors per module, one nonlinearity, string metadata."""

    modules: dict[str, ModuleFactors]
    nonlinearity: str = "identity"
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "adapter"  # file name, for messages
    # new words it brings (pivotal tuning): token -> text-encoder component -> (n, D) vectors;
    # see sdlora/lora/embeddings.py
    embeddings: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    # exact full differences of parameters no factors hold (ComfyUI's `.diff_b` of biases and
    # 1-D `.diff` of norm weights): "<flat key>.weight" / ".bias" -> ΔP; see sdlora/lora/offsets.py
    diffs: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def is_linear(self) -> bool:
        return self.nonlinearity == "identity"

    @property
    def is_dora(self) -> bool:
        """True when any module carries a DoRA magnitude (sdlora/lora/dora.py)."""
        return any(m.magnitude is not None for m in self.modules.values())

    def components(self) -> dict[str, int]:
        """Module count per component (unet / text_encoder / other)."""
        counts: dict[str, int] = {}
        for key in self.modules:
            comp = component_of(key) or "other"
            counts[comp] = counts.get(comp, 0) + 1
        return counts

    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})

    def trigger_words(self) -> list[str]:
        raw = self.metadata.get("sdlora_trigger_words", "")
        try:
            words = parse_json(raw, "sdlora_trigger_words") if raw else []
        except SdloraError:
            words = [w.strip() for w in raw.split(",") if w.strip()]
        return [str(w) for w in words] if isinstance(words, list) else []


def _canonical(component: str, path: str) -> str:
    """Module path as the flat names spell it, whatever the library version nests it under.

    transformers 5 dropped CLIPTextModel's `text_model.` level; files everywhere keep it.
    """
    if component.startswith("text_encoder") and path.startswith(CLIP_TOP):
        path = "text_model." + path
    return path.replace(".", "_")


def flat_name(component: str, path: str) -> str:
    """`unet`, `down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_attentions_0_proj_in`
    (diffusers' module names; `module_keys` gives the names of the model's family)."""
    return PREFIXES[component] + _canonical(component, path)


def _adaptable(model: nn.Module) -> dict[str, nn.Module]:
    """Path -> module for every Linear/Conv2d in `model` (LoRALayer-wrapped ones included)."""
    from sdlora.lora.layer import LoRALayer  # local: layer imports nothing from here

    return {
        path: module
        for path, module in model.named_modules()
        if isinstance(module, LoRALayer)
        or (isinstance(module, nn.Linear | nn.Conv2d) and not path.endswith(".base"))
    }


def _original_names(
    model: nn.Module, component: str, paths, every_family: bool = False
) -> dict[str, str]:
    """Module path -> original-layout path where the model's family names UNet modules so in
    adapter files (SDXL), or for any UNet with `every_family` (ComfyUI's files); else empty."""
    config = getattr(model, "config", None)
    if component != "unet" or config is None or "down_block_types" not in config:
        return {}
    if not every_family and family_of_unet_config(config).adapter_unet_names != "original":
        return {}
    return original_module_paths(config, paths)


def module_keys(model: nn.Module, component: str) -> dict[str, str]:
    """Module path -> the flat key this model's family writes for it in adapter files."""
    paths = list(_adaptable(model))
    original = _original_names(model, component, paths)
    return {p: PREFIXES[component] + _canonical(component, original.get(p, p)) for p in paths}


def module_paths(model: nn.Module, component: str) -> dict[str, str]:
    """Flat-name suffix -> module path for every Linear/Conv2d in `model` (wrapped ones
    included): diffusers' names and, for a UNet, the original (LDM/SGM) ones as well."""
    paths = list(_adaptable(model))
    found = {_canonical(component, p): p for p in paths}
    for path, original in _original_names(model, component, paths, every_family=True).items():
        found[_canonical(component, original)] = path
    return found


def _suffix(component: str, key: str) -> str:
    """Flat key -> canonical suffix; old kohya text-encoder keys lack `text_model_`."""
    suffix = key[len(PREFIXES[component]) :]
    if component.startswith("text_encoder") and not suffix.startswith(("text_model_", "text_proj")):
        suffix = "text_model_" + suffix
    return suffix


def component_of(key: str) -> str | None:
    """The pipeline component a flat key belongs to (unet, text_encoder, text_encoder_2), if any."""
    return next((c for c, p in PREFIXES.items() if key.startswith(p)), None)


def file_key(key: str, family: Family) -> str:
    """The key as the family's adapter files spell it (`TextEncoder.adapter_prefix`: SDXL files
    call the first text encoder lora_te1_)."""
    for encoder in family.text_encoders:
        ours = PREFIXES[encoder.component]
        if key.startswith(ours):
            return encoder.adapter_prefix + key[len(ours) :]
    return key


def memory_key(key: str) -> str:
    """The key as sdlora holds it, whichever family's file spelled it (lora_te1_ -> lora_te_)."""
    for encoder in (e for f in FAMILIES for e in f.text_encoders):
        ours = PREFIXES[encoder.component]
        if key.startswith(encoder.adapter_prefix) and not key.startswith(ours):
            return ours + key[len(encoder.adapter_prefix) :]
    return key


def fit_factors(factors: ModuleFactors, shape: torch.Size | tuple[int, ...]) -> ModuleFactors:
    """Factors shaped for a weight of `shape`: flattened (r, in·kh·kw) factors on a Conv2d get
    their kernel shape, 1x1-conv factors on a Linear lose theirs; anything else is left as is."""
    down, up = factors.down, factors.up
    rank = down.shape[0]
    magnitude = factors.magnitude
    if magnitude is not None and magnitude.dim() != len(shape):
        magnitude = fit_magnitude(magnitude, shape)
    if len(shape) == 4 and down.dim() == 2 and down.shape[1] == math.prod(shape[1:]):
        down, up = down.reshape(rank, *shape[1:]), up.reshape(up.shape[0], rank, 1, 1)
    elif len(shape) == 2 and down.dim() == 4 and down.shape[2:] == (1, 1):
        down, up = down.flatten(1), up.flatten(1)
    elif magnitude is factors.magnitude:
        return factors
    return ModuleFactors(down=down, up=up, alpha=factors.alpha, magnitude=magnitude)


def weight_of(model: nn.Module, path: str) -> torch.Tensor:
    """The base weight of the module at `path` (under its LoRALayer wrapper, if any)."""
    module = model.get_submodule(path)
    return module.base.weight if hasattr(module, "base") else module.weight


def fits(factors: ModuleFactors, shape: torch.Size | tuple[int, ...]) -> bool:
    """True when the factors (after `fit_factors`) make a ΔW of exactly `shape`."""
    fitted = fit_factors(factors, shape)
    return (
        tuple(fitted.down.shape[1:]) == tuple(shape[1:])
        and fitted.up.shape[0] == shape[0]
        and fitted.up.shape[1] == fitted.rank
    )


def widths(adapter: Adapter) -> dict[str, int]:
    """The widths an adapter was trained at, where its keys show them: `unet` = input width of a
    cross-attention key projection (attn2.to_k/to_v), `text_encoder`/`text_encoder_2` = input
    width of a self-attention q/k/v projection (the text encoder's hidden size)."""
    found: dict[str, int] = {}
    for key, factors in adapter.modules.items():
        comp = component_of(key)
        if comp == "unet" and key.endswith(("attn2_to_k", "attn2_to_v")):
            found.setdefault("unet", factors.down.shape[1])
        elif comp is not None and key.endswith(
            ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj")
        ):
            found.setdefault(comp, factors.down.shape[1])
    return found


def base_widths(models: dict[str, nn.Module]) -> dict[str, int]:
    """The same widths of a base: its UNet's cross-attention dim, its text encoders' hidden sizes."""
    found: dict[str, int] = {}
    unet_config = getattr(models.get("unet"), "config", None)
    if unet_config is not None and isinstance(unet_config.get("cross_attention_dim"), int):
        found["unet"] = unet_config["cross_attention_dim"]
    for comp in ("text_encoder", "text_encoder_2"):
        text_config = getattr(models.get(comp), "config", None)
        if text_config is not None and isinstance(getattr(text_config, "hidden_size", None), int):
            found[comp] = text_config.hidden_size
    return found


def adapter_family(adapter: Adapter) -> Family | None:
    """The family an adapter was made for, where it shows: its cross-attention width, else its
    names or metadata (SDXL, `family_of_adapter_keys`)."""
    width = widths(adapter).get("unet")
    found = family_of_width(width) if width is not None else None
    return found or family_of_adapter_keys(adapter.modules, adapter.metadata)


def check_family(adapter: Adapter, models: dict[str, nn.Module]) -> None:
    """Refuse, in one line naming both families, an adapter trained for another model family
    (e.g. an SD 1.x adapter on an SDXL base), before anything is applied."""
    _check_denoiser_family(adapter, models)
    theirs, ours = widths(adapter), base_widths(models)
    base = ours.get("unet")
    for component in PREFIXES:
        if component in theirs and component in ours and theirs[component] != ours[component]:
            trained, base = theirs[component], ours.get("unet", ours[component])
            family = family_of_width(trained)
            same = family is not None and family is family_of_width(base)
            raise SdloraError(
                f"{adapter.source} was trained for {describe_width(trained)}; the base is "
                f"{describe_width(base)}; "
                + (
                    "pick the base it was made for"
                    if same
                    else "pick a base of the adapter's family"
                )
            )
    # SDXL adapters by their names (te2, original UNet names) where no width tells: a text-
    # encoder-only SDXL file's CLIP-L is as wide as SD 1.x's
    unet = models.get("unet")
    named = family_of_adapter_keys(adapter.modules, adapter.metadata)
    if named is None or unet is None or base is None:
        return
    if named is not family_of_unet_config(unet.config):
        raise SdloraError(
            f"{adapter.source} was trained for {named.label}; the base is "
            f"{describe_width(base)}; pick a base of the adapter's family"
        )


def _check_denoiser_family(adapter: Adapter, models: dict[str, nn.Module]) -> None:
    """Refuse an SD 3.x adapter on a UNet base, or a UNet family's on an SD 3.x (transformer)
    base, in one line naming both families (their text encoders' widths can agree)."""
    transformer = models.get("transformer")
    unet = models.get("unet")
    if transformer is not None:
        base = family_of_transformer_config(transformer.config)
    elif unet is not None:
        base = family_of_unet_config(unet.config)
    else:
        return
    width = widths(adapter).get("unet")
    theirs = family_of_adapter_keys(adapter.modules, adapter.metadata) or (
        family_of_width(width) if width is not None else None
    )
    if theirs is None or base is None or theirs is base:
        return
    if "transformer" in (theirs.denoiser, base.denoiser):
        raise SdloraError(
            f"{adapter.source} was trained for {theirs.label}; the base is {base.label}; "
            "pick a base of the adapter's family"
        )


def resolve(
    adapter: Adapter, models: dict[str, nn.Module]
) -> tuple[dict[tuple[str, str], ModuleFactors], list[str]]:
    """Map flat keys to (component, module path); return them and the keys that matched nothing.

    Factors are fitted to the module's weight shape (`fit_factors`). A file made for another
    model family (`check_family`), or where most keys match nothing, is refused.
    """
    check_family(adapter, models)
    lookups = {comp: module_paths(model, comp) for comp, model in models.items()}
    resolved: dict[tuple[str, str], ModuleFactors] = {}
    unmatched: list[str] = []
    for key, factors in adapter.modules.items():
        comp = component_of(key)
        path = lookups[comp].get(_suffix(comp, key)) if comp in lookups else None
        if path is None:
            unmatched.append(key)
        else:
            resolved[(comp, path)] = fit_factors(factors, weight_of(models[comp], path).shape)
    if len(unmatched) * 2 > len(adapter.modules) or not resolved:
        raise SdloraError(
            f"{adapter.source}: {len(unmatched)} of {len(adapter.modules)} modules do not exist "
            f"in this base (e.g. {', '.join(unmatched[:3])}); was it made for another base model?"
        )
    return resolved, unmatched


MAX_STRENGTH = 100.0  # |strength| beyond this only ever draws black or noise


def check_strength(name: str, strength: float) -> float:
    """The strength as a float, or a one-line error if it is not finite or beyond ±MAX_STRENGTH."""
    strength = float(strength)
    if not math.isfinite(strength) or abs(strength) > MAX_STRENGTH:
        raise SdloraError(
            f"strength {strength:g} for {name!r} must be a finite number between "
            f"{-MAX_STRENGTH:g} and {MAX_STRENGTH:g} (1 = as trained, 0 = base)"
        )
    return strength
