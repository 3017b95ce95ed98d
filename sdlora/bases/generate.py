"""Image generation with reproducible settings, saved as PNG with its recipe in the metadata."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from PIL import Image, PngImagePlugin

from sdlora.bases.recommend import native_size, recommended
from sdlora.errors import SdloraError
from sdlora.io.writing import written_file
from sdlora.lora.prompt_tags import lora_tag

SCHEDULERS = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
}


@dataclass
class GenerateSettings:
    """What makes an image reproducible: prompt, seed, sampler, size and the adapter mix.

    None for steps, guidance, width or height means the base's recommendation (`recommended`).
    """

    prompt: str
    negative_prompt: str = ""
    steps: int | None = None  # None: the base's recommendation (20 for toy, 25 for SD)
    guidance: float | None = None  # None: the base's recommendation (2 for toy, 7.5 for SD)
    seed: int = 0
    width: int | None = None  # None: the base's native size
    height: int | None = None
    scheduler: str = "pndm"
    num_images: int = 1
    adapters: dict[str, float] = field(default_factory=dict)  # name -> strength, for the record
    blocks: dict[str, str] = field(default_factory=dict)  # name -> per-block strengths (blocks.py)
    sweep: dict[str, list[float]] = field(default_factory=dict)  # grid columns: name -> strengths


def fill_recommended(pipe: StableDiffusionPipeline, s: GenerateSettings) -> GenerateSettings:
    """Fill the steps and guidance left at None with the base's recommendation, in place."""
    rec = recommended(pipe)
    if s.steps is None:
        s.steps = rec.steps
    if s.guidance is None:
        s.guidance = rec.guidance
    return s


MAX_GUIDANCE = 100.0  # beyond this the latents overflow to a black or garbage image
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes unsigned 64-bit seeds
MAX_SIDE = 4096  # pixels; SD draws 512-1024, and 4096² already needs tens of GB of attention
MAX_IMAGES = 64  # per call: all are denoised as one batch, so memory grows with the count


def check_numbers(s: GenerateSettings) -> None:
    """Raise a one-line error for numbers that cannot work on any base (checked before loading)."""
    for name, value in (("width", s.width), ("height", s.height)):
        if value is not None and not 1 <= value <= MAX_SIDE:
            raise SdloraError(f"--{name} must be from 8 to {MAX_SIDE} pixels (got {value})")
    if s.steps is not None and s.steps < 1:
        raise SdloraError(f"--steps must be at least 1 (got {s.steps})")
    if s.guidance is not None and not (
        math.isfinite(s.guidance) and 0 <= s.guidance <= MAX_GUIDANCE
    ):
        raise SdloraError(
            f"--guidance must be a number from 0 to {MAX_GUIDANCE:g} (got {s.guidance:g}); "
            "SD models use 5-9, the toy base 2"
        )
    if not 1 <= s.num_images <= MAX_IMAGES:
        raise SdloraError(
            f"--num-images must be from 1 to {MAX_IMAGES} (got {s.num_images}); "
            "for more, run again with another --seed"
        )
    if not 0 <= s.seed <= MAX_SEED - s.num_images + 1:
        raise SdloraError(f"--seed must be from 0 to 2**64 - (number of images) (got {s.seed})")
    if s.scheduler not in SCHEDULERS:
        raise SdloraError(
            f"unknown scheduler {s.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}"
        )


def check_settings(pipe: StableDiffusionPipeline, s: GenerateSettings) -> None:
    """Raise a one-line error for settings that cannot work on this base."""
    check_numbers(s)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    for name, value in (("width", s.width), ("height", s.height)):
        if value is not None and value % factor:
            raise SdloraError(f"--{name} {value} must be a positive multiple of {factor}")


def generate(
    pipe: StableDiffusionPipeline,
    settings: GenerateSettings,
    on_step: Callable[[int, int], None] | None = None,
) -> list[Image.Image]:
    """Draw `settings.num_images` images; image i uses seed `settings.seed + i`.

    Steps and guidance left at None are filled in with the base's recommendation first (in
    `settings`, so the PNG saved with it records what was used). `on_step(done, total)` is
    called after each denoising step (for progress bars).
    """
    check_settings(pipe, settings)
    fill_recommended(pipe, settings)
    if type(pipe.scheduler) is not SCHEDULERS[settings.scheduler]:
        pipe.scheduler = SCHEDULERS[settings.scheduler].from_config(pipe.scheduler.config)
    size = native_size(pipe)
    device = pipe.unet.device
    generators = [
        torch.Generator(device="cpu").manual_seed(settings.seed + i)
        for i in range(settings.num_images)
    ]
    with torch.inference_mode():
        result = pipe(
            prompt=[settings.prompt] * settings.num_images,
            negative_prompt=[settings.negative_prompt] * settings.num_images
            if settings.negative_prompt
            else None,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            width=settings.width or size,
            height=settings.height or size,
            generator=generators if device.type == "cpu" else None,
            latents=None
            if device.type == "cpu"
            else _latents(pipe, settings, generators, size).to(device, pipe.unet.dtype),
            callback_on_step_end=None if on_step is None else _step_callback(on_step),
            output_type="np",
        )
    return [to_image(pixels, settings.seed + i) for i, pixels in enumerate(result.images)]


def to_image(pixels: np.ndarray, seed: int) -> Image.Image:
    """(H, W, 3) floats in [0, 1] -> 8-bit RGB image; raise if it came out blank or broken.

    An image whose every value is the same (all black, all grey) or that holds NaN/inf is what
    an overflowing model gives (too high guidance or strengths, fp16 overflow); it is refused
    rather than saved as if it were a picture.
    """
    if not np.isfinite(pixels).all():
        raise SdloraError(
            f"the image for seed {seed} came out broken (NaN or infinite values: the model "
            "overflowed); check --guidance and the adapter strengths"
        )
    quantized = (pixels * 255).round().astype(np.uint8)  # as diffusers' numpy_to_pil
    if quantized.min() == quantized.max():
        raise SdloraError(
            f"the image for seed {seed} came out blank (all pixels {quantized.flat[0]}); "
            "check --guidance and the adapter strengths"
        )
    return Image.fromarray(quantized)


def _step_callback(on_step: Callable[[int, int], None]) -> Callable:
    """A diffusers `callback_on_step_end` that reports (steps done, steps in total)."""

    def callback(pipe, index, timestep, kwargs):
        on_step(index + 1, len(pipe.scheduler.timesteps))
        return kwargs

    return callback


def _latents(pipe, settings, generators, size) -> torch.Tensor:
    """Initial noise drawn on the CPU, so a seed gives the same image on every device."""
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    shape = (4, (settings.height or size) // factor, (settings.width or size) // factor)
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def png_info(settings: GenerateSettings, index: int = 0) -> PngImagePlugin.PngInfo:
    """PNG text chunks: an A1111-style `parameters` line and the full settings as JSON."""
    info = PngImagePlugin.PngInfo()
    record = asdict(settings) | {"seed": settings.seed + index, "num_images": 1}
    loras = " ".join(
        lora_tag(n, s, settings.blocks.get(n))
        for n, s in settings.adapters.items()
        if n not in settings.sweep
    )
    info.add_text(
        "parameters",
        f"{settings.prompt} {loras}".strip()
        + (f"\nNegative prompt: {settings.negative_prompt}" if settings.negative_prompt else "")
        + f"\nSteps: {settings.steps}, Sampler: {settings.scheduler}, CFG scale: {settings.guidance}, "
        f"Seed: {settings.seed + index}"
        + "".join(
            f", Sweep: {n} strength {', '.join(f'{v:g}' for v in vs)}"
            for n, vs in settings.sweep.items()
        ),
    )
    info.add_text("sdlora", json.dumps(record))
    return info


def save_png(
    image: Image.Image, path: str | Path, settings: GenerateSettings, index: int = 0
) -> Path:
    """Save whole or not at all (`sdlora.io.writing`), with the recipe in the PNG text metadata."""
    path = Path(path)
    with written_file(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_info(settings, index))
    return path
