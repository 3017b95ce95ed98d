"""Strength schedules: an adapter that acts over part of the denoising only.

A window `start=0.2,stop=0.8` lets an adapter act from 20 % of the steps to 80 %; outside it the
adapter is at strength 0, i.e. the base model (text encoders included: the prompt is encoded again
under the strengths of each part, so "off" means exactly the base). The same words as A1111's LoRA
Block Weight extension: in a prompt `<lora:ink:0.8:start=0.2>`, on the command line
`--lora ink.safetensors:0.8@start=0.2`.

A value with a decimal point is a fraction of the steps (0 to 1); a whole number is a step count
as LoRA Block Weight reads it (`stop=10`: the first 10 steps). The window holds for the denoiser
evaluations `i` with `first <= i < end`, where `first`/`end` are the start/stop as step indices
(fractions rounded to the nearest step).

In the Python API a schedule may also be any function `(step, steps) -> factor`: the adapter runs
at strength × factor on that step (`generate(..., schedules={"ink": fn})`).

Between steps the Mixer re-fuses the changed adapters from the pristine weights (exact, no
drift); the prompt embeddings for each set of strengths are computed once per image batch.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdlora.errors import SdloraError
from sdlora.lora.adapter import component_of

# a whole number is a step count (LoRA Block Weight), a number with a point a fraction
_VALUE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*$")
KEYS = ("start", "stop")


@dataclass(frozen=True)
class Window:
    """When an adapter acts: from `start` to `stop`, each a fraction (float) or a step (int)."""

    start: float | int = 0.0
    stop: float | int = 1.0

    def bounds(self, steps: int) -> tuple[int, int]:
        """(first, end) step indices of the `steps` denoiser evaluations the window covers."""

        def index(value: float | int) -> int:
            return min(value, steps) if isinstance(value, int) else round(value * steps)

        return index(self.start), index(self.stop)

    def __call__(self, step: int, steps: int) -> float:
        first, end = self.bounds(steps)
        return 1.0 if first <= step < end else 0.0

    @property
    def text(self) -> str:
        """`start=0.2,stop=0.8`, leaving out what is the default."""
        parts = []
        if self.start != 0:
            parts.append(f"start={_number(self.start)}")
        if self.stop != 1.0 or isinstance(self.stop, int):
            parts.append(f"stop={_number(self.stop)}")
        return ",".join(parts)

    @property
    def always(self) -> bool:
        return self.start == 0 and self.stop == 1.0 and not isinstance(self.stop, int)


def _number(value: float | int) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}" if value % 1 else f"{value:.1f}"


def is_window(text: str) -> bool:
    """Whether `text` is a window spec (`start=…`, `stop=…`, joined by ',' or ':')."""
    parts = [p for p in re.split(r"[,:]", text) if p.strip()]
    return bool(parts) and all(p.split("=", 1)[0].strip().lower() in KEYS for p in parts)


def parse_window(text: str, where: str = "--lora") -> Window:
    """'start=0.2,stop=0.8' (or ':'-joined, as in a prompt tag) -> Window; errors name `where`."""
    values: dict[str, float | int] = {}
    for part in (p for p in re.split(r"[,:]", text) if p.strip()):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in KEYS:
            raise SdloraError(f"{where}: {part.strip()!r} is not start=… or stop=…")
        match = _VALUE.match(value)
        if not match:
            raise SdloraError(
                f"{where}: {key}={value.strip()} must be a fraction of the steps (0.0 to 1.0) "
                "or a whole number of steps"
            )
        number = match.group(1)
        values[key] = float(number) if "." in number else int(number)
        if isinstance(values[key], float) and values[key] > 1:
            raise SdloraError(
                f"{where}: {key}={number} is past the end; a fraction of the steps is 0.0 to 1.0 "
                "(a whole number counts steps)"
            )
    window = Window(**values)
    if (
        isinstance(window.start, float) == isinstance(window.stop, float)
        and window.stop <= window.start
    ):
        raise SdloraError(
            f"{where}: stop={_number(window.stop)} must come after start={_number(window.start)}"
        )
    return window


Schedule = Callable[[int, int], float]


def strengths_at(
    strengths: dict[str, float], schedules: dict[str, Schedule], step: int, steps: int
) -> dict[str, float]:
    """Each adapter's strength on denoiser evaluation `step` of `steps`."""
    out = dict(strengths)
    for name, schedule in schedules.items():
        factor = float(schedule(step, steps))
        out[name] = strengths[name] * factor
    return out


def evaluations(pipe, steps: int) -> int:
    """How many denoiser evaluations the pipeline's scheduler makes for `steps` (PNDM: one more)."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps, device="cpu")
    return len(scheduler.timesteps)


def _tensor_inputs(pipe) -> tuple[str, ...]:
    """The prompt tensors the pipeline's step callback may replace, for its text encoders."""
    inputs = getattr(pipe, "_callback_tensor_inputs", ())
    if "add_text_embeds" in inputs:  # SDXL: the UNet also takes the pooled text
        return ("prompt_embeds", "add_text_embeds")
    if (
        "prompt_embeds" in inputs
        and hasattr(pipe, "text_encoder")
        and not hasattr(pipe, "text_encoder_3")
    ):
        return ("prompt_embeds",)
    return ()


def prompt_encoder(pipe, prompts: list[str], negatives: list[str] | None) -> Callable:
    """() -> the prompt tensors the pipeline's loop uses (classifier-free pairs joined as the
    pipeline joins them), encoded under the strengths set at the time of the call."""

    def encode() -> dict[str, torch.Tensor]:
        guided = pipe.do_classifier_free_guidance
        device = pipe._execution_device
        if "add_text_embeds" in _tensor_inputs(pipe):
            pos, neg, pooled, neg_pooled = pipe.encode_prompt(
                prompts, None, device, 1, guided, negatives
            )
            if guided:
                return {
                    "prompt_embeds": torch.cat([neg, pos]),
                    "add_text_embeds": torch.cat([neg_pooled, pooled]),
                }
            return {"prompt_embeds": pos, "add_text_embeds": pooled}
        pos, neg = pipe.encode_prompt(prompts, device, 1, guided, negatives)
        return {"prompt_embeds": torch.cat([neg, pos]) if guided else pos}

    return encode


class Scheduled:
    """Runs a pipeline call with adapters switched at their window's steps.

    `begin()` sets the strengths of step 0 (the pipeline then encodes the prompt under them);
    `callback` (a diffusers `callback_on_step_end`) switches strengths before each later step
    and hands the pipeline the prompt embeddings made under those strengths; `end()` puts the
    user's strengths back.
    """

    def __init__(self, pipe, mixer, schedules: dict[str, Schedule], steps: int, encode):
        self.pipe, self.mixer, self.schedules = pipe, mixer, schedules
        self.strengths = {name: entry.strength for name, entry in mixer.entries.items()}
        missing = sorted(set(schedules) - set(self.strengths))
        if missing:
            raise SdloraError(
                f"a schedule names {missing[0]!r}, which is not in the mix "
                f"(loaded: {', '.join(self.strengths) or 'none'})"
            )
        self.steps = evaluations(pipe, steps)
        self.encode = encode  # () -> the prompt tensors, under the strengths set now
        self.embeds: dict[tuple, dict[str, torch.Tensor]] = {}
        self.inputs = _tensor_inputs(pipe)
        self.switch_text = any(has_text_layers(mixer, name) for name in schedules)
        if self.switch_text and not self.inputs:
            raise SdloraError(
                "strength schedules with text-encoder layers work on SD 1.x, SD 2.x and SDXL "
                "pipelines only; use an adapter without text-encoder layers"
            )
        self.current: tuple | None = None

    def _key(self, strengths: dict[str, float]) -> tuple:
        return tuple(strengths[name] for name in sorted(strengths))

    def _apply(self, step: int) -> tuple:
        strengths = strengths_at(self.strengths, self.schedules, step, self.steps)
        key = self._key(strengths)
        if key != self.current:
            self.mixer.set_strengths(strengths)
            self.current = key
        return key

    def begin(self) -> None:
        self._apply(0)

    def callback(self, pipe, index: int, timestep, kwargs: dict) -> dict:
        if index + 1 >= self.steps:
            return kwargs
        before = self.current
        key = self._apply(index + 1)
        if self.switch_text and key != before:
            if before not in self.embeds:
                self.embeds[before] = {name: kwargs[name] for name in self.inputs}
            if key not in self.embeds:
                self.embeds[key] = self.encode()
            kwargs.update(self.embeds[key])
        return kwargs

    def end(self) -> None:
        self.mixer.set_strengths(self.strengths)


def has_text_layers(mixer, name: str) -> bool:
    """Whether adapter `name` in `mixer` acts on a text encoder (its window then re-encodes)."""
    adapter = mixer.entries[name].adapter
    return bool(adapter.embeddings) or any(
        component_of(key) not in ("unet", "transformer") for key in adapter.modules
    )
