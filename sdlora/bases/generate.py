"""Image generation with reproducible settings, saved as PNG with its recipe in the metadata."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from PIL import Image, PngImagePlugin

from sdlora.bases import fast_sample
from sdlora.bases.families import Family, family_of_pipeline, vae_factor
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
    "flow_euler": FlowMatchEulerDiscreteScheduler,  # SD 3.x: flow matching's Euler sampler
}
DEFAULT_SCHEDULER = "pndm"  # where the user chose none; a family without it gets its own first


MAX_STEPS = 1000  # denoising steps; samplers converge by 50-150, and 1000 is DDPM's whole schedule
MAX_GUIDANCE = 100.0  # beyond this the latents overflow to a black or garbage image
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes unsigned 64-bit seeds
MAX_SIDE = 4096  # pixels; SD draws 512-1024, and 4096² already needs tens of GB of attention
MIN_SIDE = 8  # pixels: one latent pixel of SD's VAE (sides must be multiples of the VAE's factor)
MAX_IMAGES = 64  # per call: all are denoised as one batch, so memory grows with the count


@dataclass(frozen=True)
class Setting:
    """One generation setting as users meet it: its label, help and bounds. Declared once, on
    `GenerateSettings`' field; the command line, the web UI and its HTTP API all read it here."""

    name: str  # the GenerateSettings field
    label: str  # what the web UI calls it
    help: str  # one line for --help and the API's docs
    minimum: float | None = None  # None: no bound (text, or a choice)
    maximum: float | None = None
    maximum_text: str = ""  # how messages write the maximum when the number is unwieldy
    unit: str = ""  # "pixels"
    choices: tuple[str, ...] = ()
    hint: str = ""  # said after a refusal: what values usually work
    optional: bool = False  # None allowed: it stands for the base's recommendation

    @property
    def kind(self) -> str:
        """ "text", "choice", "whole" (an int) or "number" (a float): what a form asks for."""
        if self.choices:
            return "choice"
        if self.minimum is None:
            return "text"
        return "whole" if isinstance(self.minimum, int) else "number"

    def check(self, value) -> None:
        """Raise `SdloraError(..., setting=name)` if `value` is outside the bounds (None passes
        where it stands for the base's recommendation)."""
        if value is None:
            if self.optional:
                return
            raise SdloraError("must be given", setting=self.name)
        if self.choices and value not in self.choices:
            raise SdloraError(
                f"{value!r} is not one of: {', '.join(self.choices)}", setting=self.name
            )
        if self.minimum is None:
            return
        whole = self.kind == "whole"
        if not (math.isfinite(value) and self.minimum <= value <= self.maximum):
            top = self.maximum_text or f"{self.maximum:g}"
            span = (
                f"from {self.minimum} to {top}"
                if whole
                else f"a number from {self.minimum:g} to {top}"
            )
            raise SdloraError(
                f"must be {span}{' ' + self.unit if self.unit else ''} "
                f"(got {value if whole else format(value, 'g')})"
                + (f"; {self.hint}" if self.hint else ""),
                setting=self.name,
            )


def _setting(default=MISSING, default_factory=MISSING, **declared) -> Field:
    """A GenerateSettings field that carries its `Setting` declaration (label, help, bounds)."""
    return field(default=default, default_factory=default_factory, metadata={"setting": declared})


@dataclass
class GenerateSettings:
    """What makes an image reproducible: prompt, seed, sampler, size and the adapter mix.

    None for steps, guidance, width or height means the base's recommendation (`recommended`).
    Each user-facing field declares its label, help and bounds (`SETTINGS`, `check_numbers`).
    """

    prompt: str = _setting(label="Prompt", help="what to draw")
    negative_prompt: str = _setting("", label="Negative prompt", help="what to steer away from")
    # None: the base's recommendation (20 for toy, 25 for SD)
    steps: int | None = _setting(
        None,
        label="Steps",
        optional=True,
        help="denoising steps (default: the base's recommended value, 20 for toy, 25 for SD)",
        minimum=1,
        maximum=MAX_STEPS,
        hint="20-50 is usual",
    )
    # None: the base's recommendation (2 for toy, 7.5 for SD)
    guidance: float | None = _setting(
        None,
        label="Guidance",
        optional=True,
        help="classifier-free guidance scale (default: the base's recommended value, "
        "2 for toy, 7.5 for SD)",
        minimum=0.0,
        maximum=MAX_GUIDANCE,
        hint="SD models use 5-9, the toy base 2",
    )
    seed: int = _setting(
        0,
        label="Seed",
        help="random seed; image i uses seed+i",
        minimum=0,
        maximum=MAX_SEED,
        maximum_text="2**64 - 1",
    )
    width: int | None = _setting(  # None: the base's native size
        None,
        label="Width",
        optional=True,
        help=f"image width in px, at most {MAX_SIDE} (default: the base's native size)",
        minimum=MIN_SIDE,
        maximum=MAX_SIDE,
        unit="pixels",
    )
    height: int | None = _setting(
        None,
        label="Height",
        optional=True,
        help=f"image height in px, at most {MAX_SIDE} (default: the base's native size)",
        minimum=MIN_SIDE,
        maximum=MAX_SIDE,
        unit="pixels",
    )
    scheduler: str = _setting(
        DEFAULT_SCHEDULER,
        label="Scheduler",
        help="the sampler: pndm, ddim, euler, euler_a or dpm++; SD 3.x: flow_euler (its default)",
        choices=tuple(SCHEDULERS),
    )
    num_images: int = _setting(
        1,
        label="Images",
        help=f"images to draw, at most {MAX_IMAGES}; image i uses seed+i",
        minimum=1,
        maximum=MAX_IMAGES,
        hint="for more, run again with another seed",
    )
    # auto|on|off: our compiled, graph-replayed loop (fast_sample.py); auto: on a GPU for
    # at least fast_sample.BREAK_EVEN_IMAGES images. How, not what: left out of the PNG's record.
    compile: str = "auto"
    adapters: dict[str, float] = field(default_factory=dict)  # name -> strength, for the record
    blocks: dict[str, str] = field(default_factory=dict)  # name -> per-block strengths (blocks.py)
    # name -> when over the steps it acts, "start=0.2,stop=0.8" (sdlora/lora/schedule.py)
    schedules: dict[str, str] = field(default_factory=dict)
    sweep: dict[str, list[float]] = field(default_factory=dict)  # grid columns: name -> strengths


# The generation settings users set, in the order forms show them: name -> declaration.
SETTINGS: dict[str, Setting] = {
    f.name: Setting(name=f.name, **f.metadata["setting"])
    for f in fields(GenerateSettings)
    if "setting" in f.metadata
}


def label_of(name: str) -> str:
    """A generation setting's label ("Width"); other names as they are, underscores as spaces."""
    return SETTINGS[name].label if name in SETTINGS else name.replace("_", " ")


def fill_recommended(pipe: StableDiffusionPipeline, s: GenerateSettings) -> GenerateSettings:
    """Fill the steps and guidance left at None with the base's recommendation, in place."""
    rec = recommended(pipe)
    if s.steps is None:
        s.steps = rec.steps
    if s.guidance is None:
        s.guidance = rec.guidance
    return s


def check_numbers(s: GenerateSettings) -> None:
    """Raise a one-line error for settings that cannot work on any base (checked before loading):
    each against its declared bounds, then the seeds of all images against the seed's range."""
    for setting in SETTINGS.values():
        setting.check(getattr(s, setting.name))
    fast_sample.check_compile(s.compile)
    if s.seed + s.num_images - 1 > MAX_SEED:
        raise SdloraError(
            f"must be at most 2**64 - {s.num_images} with {s.num_images} images, since image i "
            f"uses seed+i (got {s.seed})",
            setting="seed",
        )


def check_settings(pipe: StableDiffusionPipeline, s: GenerateSettings) -> None:
    """Raise a one-line error for settings that cannot work on this base."""
    check_numbers(s)
    family = family_of_pipeline(pipe)
    sampler_of(family, s.scheduler)
    # pixels per latent pixel, times SD 3.x's transformer patch side
    patch = getattr(pipe, family.denoiser).config.get("patch_size") or 1
    factor = vae_factor(pipe.vae.config) * patch
    for name, value in (("width", s.width), ("height", s.height)):
        if value is not None and value % factor:
            raise SdloraError(f"{value} must be a positive multiple of {factor}", setting=name)


def generate(
    pipe: StableDiffusionPipeline,
    settings: GenerateSettings,
    on_step: Callable[[int, int], None] | None = None,
    mixer=None,
    schedules: dict[str, Callable[[int, int], float]] | None = None,
) -> list[Image.Image]:
    """Draw `settings.num_images` images; image i uses seed `settings.seed + i`.

    Steps and guidance left at None are filled in with the base's recommendation first (in
    `settings`, so the PNG saved with it records what was used). `on_step(done, total)` is
    called after each denoising step (for progress bars). Adapters with a window in
    `settings.schedules`, or a function `(step, steps) -> factor` in `schedules`, act over part
    of the steps only (sdlora/lora/schedule.py); they need the `mixer` that holds them.
    """
    check_settings(pipe, settings)
    fill_recommended(pipe, settings)
    family = family_of_pipeline(pipe)
    settings.scheduler = sampler_of(family, settings.scheduler)  # the PNG records what ran
    if type(pipe.scheduler) is not SCHEDULERS[settings.scheduler]:
        pipe.scheduler = SCHEDULERS[settings.scheduler].from_config(pipe.scheduler.config)
    size = native_size(pipe)
    denoiser = getattr(pipe, family.denoiser)
    device = denoiser.device
    # the compiled loop draws UNet bases without schedules (those switch text between steps)
    if family.denoiser == "unet" and not (settings.schedules or schedules):
        fast = _fast(pipe, settings, size, on_step)
        if fast is not None:
            return fast
    generators = [
        torch.Generator(device="cpu").manual_seed(settings.seed + i)
        for i in range(settings.num_images)
    ]
    prompts = [settings.prompt] * settings.num_images
    negatives = (
        [settings.negative_prompt] * settings.num_images if settings.negative_prompt else None
    )
    scheduled = _scheduled(pipe, settings, mixer, schedules, prompts, negatives)
    callbacks = [c for c in (scheduled and scheduled.callback, _step_callback(on_step)) if c]
    try:
        with torch.inference_mode():
            if scheduled:
                scheduled.begin()
            result = pipe(
                prompt=prompts,
                negative_prompt=negatives,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance,
                width=settings.width or size,
                height=settings.height or size,
                generator=generators if device.type == "cpu" else None,
                latents=None
                if device.type == "cpu"
                else _latents(pipe, settings, generators, size).to(device, denoiser.dtype),
                callback_on_step_end=_chain(callbacks) if callbacks else None,
                callback_on_step_end_tensor_inputs=["latents"]
                + list(scheduled.inputs if scheduled and scheduled.switch_text else ()),
                output_type="np",
            )
    finally:
        if scheduled:
            scheduled.end()
    return [to_image(pixels, settings.seed + i) for i, pixels in enumerate(result.images)]


def _scheduled(pipe, settings, mixer, schedules, prompts, negatives):
    """The `Scheduled` run of the windows in `settings` and the functions in `schedules`, or None."""
    from sdlora.lora.schedule import Scheduled, parse_window, prompt_encoder

    chosen = {
        name: parse_window(text, where=f"the schedule of {name!r}")
        for name, text in settings.schedules.items()
    }
    chosen.update(schedules or {})
    chosen = {n: s for n, s in chosen.items() if not getattr(s, "always", False)}
    if not chosen:
        return None
    if mixer is None:
        raise SdloraError(
            "strength schedules switch adapters between steps: pass the Mixer that holds them, "
            "generate(pipe, settings, mixer=mixer)"
        )
    return Scheduled(pipe, mixer, chosen, settings.steps, prompt_encoder(pipe, prompts, negatives))


def _chain(callbacks: list[Callable]) -> Callable:
    """One diffusers `callback_on_step_end` that runs each of `callbacks` in turn."""

    def callback(pipe, index, timestep, kwargs):
        for each in callbacks:
            kwargs = each(pipe, index, timestep, kwargs)
        return kwargs

    return callback


def sampler_of(family: Family, name: str) -> str:
    """The sampler that runs: `name` if it samples this family, the family's own where `name`
    is the default nobody chose (SD 3.x: flow_euler for pndm); any other is refused."""
    if name in family.samplers:
        return name
    if name == DEFAULT_SCHEDULER:
        return family.samplers[0]
    raise SdloraError(
        f"{name} does not sample {family.label} models; use {' or '.join(family.samplers)}",
        setting="scheduler",
    )


def _fast(pipe, settings: GenerateSettings, size: int, on_step) -> list[Image.Image] | None:
    """The images from fast_sample's compiled loop when `settings.compile` asks for it and the
    base and sampler allow it (else None: the pipeline draws them)."""
    sampler = fast_sample.sampler_for(pipe)
    images = max(settings.num_images, sampler.expected_images)
    if not fast_sample.use_compile(settings.compile, pipe.unet.device, images):
        return None
    if not sampler.supports(pipe.scheduler, settings.steps):
        if settings.compile == "on":
            raise SdloraError(
                f"the compiled loop cannot draw with this base and the {settings.scheduler} "
                "sampler; use another sampler or compile off",
                setting="compile",
            )
        return None
    generators = [
        torch.Generator(device="cpu").manual_seed(settings.seed + i)
        for i in range(settings.num_images)
    ]
    request = fast_sample.Request(
        _latents(pipe, settings, generators, size),
        settings.prompt,
        settings.negative_prompt,
        settings.guidance,
        settings.width or size,
        settings.height or size,
    )
    pixels = sampler.sample(request, pipe.scheduler, settings.steps, True, on_step)
    return [to_image(p, settings.seed + i) for i, p in enumerate(pixels)]


def to_image(pixels: np.ndarray, seed: int) -> Image.Image:
    """(H, W, 3) floats in [0, 1] -> 8-bit RGB image; raise if it came out blank or broken.

    An image whose every value is the same (all black, all grey) or that holds NaN/inf is what
    an overflowing model gives (too high guidance or strengths, fp16 overflow); it is refused
    rather than saved as if it were a picture.
    """
    if not np.isfinite(pixels).all():
        raise SdloraError(
            f"the image for seed {seed} came out broken (NaN or infinite values: the model "
            "overflowed); check the guidance and the adapter strengths"
        )
    quantized = (pixels * 255).round().astype(np.uint8)  # as diffusers' numpy_to_pil
    if quantized.min() == quantized.max():
        raise SdloraError(
            f"the image for seed {seed} came out blank (all pixels {quantized.flat[0]}); "
            "check the guidance and the adapter strengths"
        )
    return Image.fromarray(quantized)


def _step_callback(on_step: Callable[[int, int], None] | None) -> Callable | None:
    """A diffusers `callback_on_step_end` that reports (steps done, steps in total)."""
    if on_step is None:
        return None

    def callback(pipe, index, timestep, kwargs):
        on_step(index + 1, len(pipe.scheduler.timesteps))
        return kwargs

    return callback


def _latents(pipe, settings, generators, size) -> torch.Tensor:
    """Initial noise drawn on the CPU, so a seed gives the same image on every device."""
    factor = vae_factor(pipe.vae.config)
    channels = pipe.vae.config.latent_channels  # 4; SD 3.x 16
    shape = (channels, (settings.height or size) // factor, (settings.width or size) // factor)
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def png_info(settings: GenerateSettings, index: int = 0) -> PngImagePlugin.PngInfo:
    """PNG text chunks: an A1111-style `parameters` line and the full settings as JSON."""
    info = PngImagePlugin.PngInfo()
    record = asdict(settings) | {"seed": settings.seed + index, "num_images": 1}
    del record["compile"]
    loras = " ".join(
        lora_tag(n, s, settings.blocks.get(n), settings.schedules.get(n))
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
