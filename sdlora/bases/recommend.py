"""Each base's recommended generation settings: what to use where the user did not choose.

The built-in bases carry theirs (the `toy` base draws its prompt at guidance 2, 20 steps); a
diffusers folder, a Hub id or a single-file checkpoint gets its family's (`sdlora.bases.families`), at
the size its UNet was made for.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdlora.bases.families import SD1, SD2, SD3, SDXL, config_native_size, family_of_pipeline

SD_GUIDANCE = SD1.guidance  # the Stable Diffusion 1.x/2.x default classifier-free guidance
SD_STEPS = SD1.steps  # the Stable Diffusion default number of denoising steps
ATTRIBUTE = "sdlora_recommended"  # where load_base() keeps a built-in base's recommendation


@dataclass(frozen=True)
class Recommended:
    """Generation settings a base draws well with: guidance scale, denoising steps, image side."""

    guidance: float
    steps: int
    size: int


@dataclass(frozen=True)
class TrainingStart:
    """Training settings to start from on a base: image side, batch size, learning rate."""

    resolution: int
    batch_size: int
    lr: float


# guidance and steps of the built-in bases; their size comes from their configs
BUILTIN = {
    "toy": (2.0, 20),
    "tiny": (SD1.guidance, SD1.steps),
    "tiny-v2": (SD2.guidance, SD2.steps),
    "tiny-xl": (SDXL.guidance, SDXL.steps),
    "tiny-sd3": (SD3.guidance, SD3.steps),
}
# a small base learns a small adapter fast at a high rate (samples/style.toml); SD the usual
SMALL_TRAINING = TrainingStart(64, 4, 1e-3)
BUILTIN_TRAINING = {name: SMALL_TRAINING for name in BUILTIN}
SD_TRAINING = TrainingStart(512, 1, 1e-4)


def native_size(pipe) -> int:
    """Image side the base was made for: its denoiser's (UNet's, SD3 transformer's) sample size
    times the VAE scale factor."""
    denoiser = getattr(pipe, family_of_pipeline(pipe).denoiser)
    return config_native_size(denoiser.config, pipe.vae.config)


def recommend_builtin(name: str, pipe) -> Recommended:
    """The recommendation of built-in base `name` ("toy", "tiny", "tiny-v2", "tiny-xl"), sized from `pipe`."""
    guidance, steps = BUILTIN[name]
    return Recommended(guidance=guidance, steps=steps, size=native_size(pipe))


def guidance_and_steps(spec: str) -> tuple[float, int]:
    """The recommended guidance and steps of the base named `spec`, without loading it."""
    return BUILTIN.get(spec, (SD_GUIDANCE, SD_STEPS))


def training_start(spec: str) -> TrainingStart:
    """Training settings to start from on the base named `spec`, without loading it."""
    return BUILTIN_TRAINING.get(spec, SD_TRAINING)


def recommended(pipe) -> Recommended:
    """The settings `pipe` draws well with: its own if load_base() gave it some, else its
    family's at its native size (SD 2.x: 7.5, 25 steps, 768 px for 2.1, 512 for 2.1-base)."""
    found = getattr(pipe, ATTRIBUTE, None)
    if isinstance(found, Recommended):
        return found
    family = family_of_pipeline(pipe)
    return Recommended(guidance=family.guidance, steps=family.steps, size=native_size(pipe))
