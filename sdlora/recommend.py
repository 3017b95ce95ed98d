"""Each base's recommended generation settings: what to use where the user did not choose.

The built-in bases carry theirs (the `toy` base draws its prompt at guidance 2, 20 steps); a
diffusers folder or a single-file checkpoint gets the usual Stable Diffusion defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

SD_GUIDANCE = 7.5  # the Stable Diffusion 1.x/2.x default classifier-free guidance
SD_STEPS = 25  # the Stable Diffusion default number of denoising steps
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
BUILTIN = {"toy": (2.0, 20), "tiny": (SD_GUIDANCE, SD_STEPS)}
# a small base learns a small adapter fast at a high rate (samples/style.toml); SD the usual
BUILTIN_TRAINING = {"toy": TrainingStart(64, 4, 1e-3), "tiny": TrainingStart(64, 4, 1e-3)}
SD_TRAINING = TrainingStart(512, 1, 1e-4)


def native_size(pipe) -> int:
    """Image side the base was made for: UNet sample size times the VAE scale factor."""
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return int(pipe.unet.config.sample_size) * factor


def recommend_builtin(name: str, pipe) -> Recommended:
    """The recommendation of built-in base `name` ("toy" or "tiny"), sized from `pipe`."""
    guidance, steps = BUILTIN[name]
    return Recommended(guidance=guidance, steps=steps, size=native_size(pipe))


def guidance_and_steps(spec: str) -> tuple[float, int]:
    """The recommended guidance and steps of the base named `spec`, without loading it."""
    return BUILTIN.get(spec, (SD_GUIDANCE, SD_STEPS))


def training_start(spec: str) -> TrainingStart:
    """Training settings to start from on the base named `spec`, without loading it."""
    return BUILTIN_TRAINING.get(spec, SD_TRAINING)


def recommended(pipe) -> Recommended:
    """The settings `pipe` draws well with: its own if load_base() gave it some, else SD's."""
    found = getattr(pipe, ATTRIBUTE, None)
    if isinstance(found, Recommended):
        return found
    return Recommended(guidance=SD_GUIDANCE, steps=SD_STEPS, size=native_size(pipe))
