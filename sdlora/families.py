"""Model families: one entry per Stable Diffusion family, everything that tells them apart.

A family says how to recognise a base or an adapter of its kind (the cross-attention width, i.e.
the text encoder's hidden size: 768 for SD 1.x's CLIP ViT-L/14, 1024 for SD 2.x's OpenCLIP ViT-H),
how its single-file checkpoints are laid out, and what it draws well with. Trainer, mixer,
exporter and inspector ask this table instead of branching on a family themselves; a new family
(SDXL next) is one more `Family(...)` in `FAMILIES` plus, where its layout is new, one converter
named by `text_layout` in `single_file.py`.

SD 2.x prediction type: the 768-px SD 2.x models (2.0-v, 2.1) predict v, the 512-px ones (2.0-base,
2.1-base) predict ε. A single file does not say which (kohya and A1111 need a `--v_parameterization`
flag or a yaml), so sdlora takes it from the diffusers configs that describe the file: the
`scheduler/scheduler_config.json` of the `--config` folder (or Hub id); a diffusers folder or Hub id
base carries its own. The built-in `tiny-v2` is a v-prediction model, like SD 2.1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    """One Stable Diffusion family: how to recognise it, its file layout, its defaults."""

    name: str  # short id used in metadata: "sd1", "sd2"
    label: str  # what users read: "SD 1.x"
    # Cross-attention width (= text encoder hidden size) of this family's real bases, and of
    # sdlora's built-in small ones. An adapter's attn2.to_k input width says its family.
    cross_attention_dim: int
    small_bases: dict[int, str]  # width -> built-in base of this family with that width
    linear_projection: bool  # transformer proj_in/proj_out are Linear (SD 2.x), not 1x1 Conv
    # Single-file (original LDM) layout: where the text encoder lives and in which naming.
    text_prefix: str  # "cond_stage_model.transformer." (HF CLIP) / "cond_stage_model.model."
    text_layout: str  # "clip": Hugging Face names as they are; "open_clip": resblocks, fused qkv
    text_key: str  # a text-encoder key every single file of this family has
    single_file_layout: str  # the `sdlora_layout` metadata of the single files sdlora writes
    # Recommended generation settings at the family's native size (the UNet's sample size × 8).
    guidance: float
    steps: int
    builtin: str  # the built-in small base of this family, for tests and trying things out


SD1 = Family(
    name="sd1",
    label="SD 1.x",
    cross_attention_dim=768,  # CLIP ViT-L/14
    small_bases={32: "tiny", 96: "toy"},
    linear_projection=False,
    text_prefix="cond_stage_model.transformer.",
    text_layout="clip",
    text_key="cond_stage_model.transformer.text_model.final_layer_norm.weight",
    single_file_layout="ldm_sd_v1",
    guidance=7.5,
    steps=25,
    builtin="tiny",
)

SD2 = Family(
    name="sd2",
    label="SD 2.x",
    cross_attention_dim=1024,  # OpenCLIP ViT-H/14
    small_bases={64: "tiny-v2"},
    linear_projection=True,
    text_prefix="cond_stage_model.model.",
    text_layout="open_clip",
    text_key="cond_stage_model.model.token_embedding.weight",
    single_file_layout="ldm_sd_v2",
    guidance=7.5,
    steps=25,
    builtin="tiny-v2",
)

# SDXL goes here: cross_attention_dim=2048, two text encoders (the second under
# "conditioner.embedders.1.model.", open_clip layout, adapter prefix lora_te2_), guidance 5-7 at
# 1024 px. Its UNet has other blocks and an added time embedding, so it also needs its own UNet
# rules in single_file.py and a pipeline class; detection by width needs nothing more.
FAMILIES: tuple[Family, ...] = (SD1, SD2)
BY_NAME = {f.name: f for f in FAMILIES}
RECOGNISED_ONLY = {2048: "SDXL"}  # widths named in messages, of families sdlora cannot load yet


def family_of_width(width: int) -> Family | None:
    """The family whose bases have cross-attention width `width`, if any."""
    return next(
        (f for f in FAMILIES if width == f.cross_attention_dim or width in f.small_bases), None
    )


def family_of_unet_config(config: Mapping[str, Any]) -> Family:
    """The family of a UNet2DConditionModel config: by its cross-attention width, else by shape."""
    width = config.get("cross_attention_dim")
    found = family_of_width(width) if isinstance(width, int) else None
    if found is not None:
        return found
    linear = bool(config.get("use_linear_projection", False))
    return next(f for f in FAMILIES if f.linear_projection == linear)


def family_of_pipeline(pipe) -> Family:
    """The family of a loaded pipeline (from its UNet config)."""
    return family_of_unet_config(pipe.unet.config)


def family_of_single_file(keys) -> Family | None:
    """The family of an original-layout checkpoint from its key names, if it is one we know."""
    keys = set(keys)
    return next((f for f in FAMILIES if f.text_key in keys), None)


def width_label(width: int) -> str:
    """What a cross-attention width says about a model: `SD 2.x`, `SD 1.x (tiny, sdlora
    built-in)`, `SDXL`, or `unknown (cross-attention width 48)`."""
    family = family_of_width(width)
    if family is None:
        return RECOGNISED_ONLY.get(width, f"unknown (cross-attention width {width})")
    small = family.small_bases.get(width)
    return f"{family.label} ({small}, sdlora built-in)" if small else family.label


def describe_width(width: int) -> str:
    """`SD 2.x (cross-attention width 1024)`: the family and the width, for messages."""
    family = family_of_width(width)
    name = family.label if family else RECOGNISED_ONLY.get(width, "a model")
    return f"{name} (cross-attention width {width})"
