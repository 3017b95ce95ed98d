"""The diffusers pipeline class of each family, and the options sdlora builds and loads it with.

`Family.pipeline` names the class (StableDiffusionPipeline for SD 1.x/2.x,
StableDiffusionXLPipeline for SDXL, StableDiffusion3Pipeline for SD 3.x). sdlora never runs SD's safety checker (none is shipped
with the built-in bases, and a merged export must not gain one) nor SDXL's invisible watermark
(an optional package that changes pixels), so both are switched off wherever a pipeline is made.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import diffusers
from diffusers import DiffusionPipeline

from sdlora.bases.families import BY_NAME, Family, family_of_pipeline

# what each pipeline class takes beside its models, tokenizers and scheduler
OPTIONS = {
    "StableDiffusionPipeline": dict(safety_checker=None, requires_safety_checker=False),
    "StableDiffusionXLPipeline": dict(add_watermarker=False),
}
# optional components a class takes that sdlora leaves out when it assembles one
ABSENT = {"StableDiffusionPipeline": dict(feature_extractor=None)}


def pipeline_class(family: Family | str) -> type[DiffusionPipeline]:
    """The diffusers pipeline class of a family (or family name: "sd1", "sd2", "sdxl")."""
    family = BY_NAME[family] if isinstance(family, str) else family
    return getattr(diffusers, family.pipeline)


def load_options(cls: type[DiffusionPipeline]) -> dict[str, Any]:
    """Keyword arguments for `cls.from_pretrained` / `from_single_file` (see OPTIONS)."""
    return dict(OPTIONS.get(cls.__name__, {}))


def assemble(family: Family | str, components: Mapping[str, Any]) -> DiffusionPipeline:
    """A family's pipeline from its models, tokenizers and scheduler, by attribute name (a
    pipeline's `components` will do: its safety checker and watermark are left out)."""
    cls = pipeline_class(family)
    return cls(**{**components, **ABSENT.get(cls.__name__, {}), **load_options(cls)})


def adaptable_models(pipe: DiffusionPipeline) -> dict[str, Any]:
    """The models adapters change, by attribute: the denoiser (UNet, or SD3's transformer) and the
    family's text encoders the pipeline holds (an SD 3.x base loaded without T5 has no third)."""
    family = family_of_pipeline(pipe)
    names = (family.denoiser, *(enc.component for enc in family.text_encoders))
    return {name: getattr(pipe, name) for name in names if getattr(pipe, name, None) is not None}
