"""Sample images during training: each prompt once, with a fixed seed, as one PNG grid.

A prompt may carry kohya sd-scripts' per-line options (its `--sample_prompts` file format):
`a red circle --n blurry --w 768 --h 512 --s 28 --l 5.5 --d 42` is the prompt "a red circle"
with negative prompt "blurry", 768×512 px, 28 steps, guidance 5.5 and seed 42.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from PIL import Image

from sdlora.errors import SdloraError

# kohya's option letter -> (SamplePrompt field, type)
PROMPT_OPTIONS = {
    "n": ("negative", str),
    "w": ("width", int),
    "h": ("height", int),
    "s": ("steps", int),
    "l": ("guidance", float),
    "d": ("seed", int),
}
# " --x" starts an option (kohya splits lines on " --")
_OPTION = re.compile(r"(?:^|\s)--(\S+)")
MAX_SIDE = 4096
MAX_STEPS = 1000


@dataclass(frozen=True)
class SamplePrompt:
    """One sample: the prompt and the settings its line gives (None: the run's own)."""

    prompt: str
    negative: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None


def parse_prompt_line(line: str, where: str = "", setting: str | None = None) -> SamplePrompt:
    """A kohya-style prompt line -> SamplePrompt; for an unknown option or a bad value a
    SdloraError naming `where` (FILE:3, or "number 2" of --sample-prompt: setting) and the
    option."""
    at = f"{where}: " if where else ""
    marks = list(_OPTION.finditer(line))
    prompt = (line[: marks[0].start()] if marks else line).strip()
    values: dict[str, object] = {}
    for i, mark in enumerate(marks):
        key = mark.group(1)
        end = marks[i + 1].start() if i + 1 < len(marks) else len(line)
        text = line[mark.end() : end].strip()
        if key not in PROMPT_OPTIONS:
            known = ", ".join(f"--{k}" for k in PROMPT_OPTIONS)
            raise SdloraError(
                f"{at}unknown option --{key}; a prompt line takes {known}",
                setting=setting,
            )
        name, kind = PROMPT_OPTIONS[key]
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise SdloraError(
                f"{at}--{key} ({name}) must be {what} (got {text!r})", setting=setting
            ) from None
        bad = {
            "width": not (isinstance(value, int) and 8 <= value <= MAX_SIDE and value % 8 == 0),
            "height": not (isinstance(value, int) and 8 <= value <= MAX_SIDE and value % 8 == 0),
            "steps": not (isinstance(value, int) and 1 <= value <= MAX_STEPS),
            "guidance": not (isinstance(value, float) and 0 <= value <= 100),
            "seed": not (isinstance(value, int) and 0 <= value < 2**63),
        }.get(name, False)
        if bad:
            bounds = {
                "width": f"a multiple of 8 from 8 to {MAX_SIDE}",
                "height": f"a multiple of 8 from 8 to {MAX_SIDE}",
                "steps": f"from 1 to {MAX_STEPS}",
                "guidance": "from 0 to 100",
                "seed": "from 0 to 2**63 - 1",
            }[name]
            raise SdloraError(
                f"{at}--{key} ({name}) must be {bounds} (got {text})", setting=setting
            )
        values[name] = value
    if not prompt:
        raise SdloraError(f"{at}the line has options but no prompt", setting=setting)
    return SamplePrompt(prompt=prompt, **values)


def sample_grid(
    pipe,
    prompts: list[str | SamplePrompt],
    seed: int,
    steps: int | None,
    width: int,
    height: int,
    columns: int = 4,
    guidance: float | None = None,
) -> Image.Image:
    """Generate one image per prompt (seed, seed+1, ... unless its line gives --d) and tile
    them, `columns` per row, each in a cell of the largest width and height.

    Each prompt text may carry kohya's per-line options (`parse_prompt_line`; a SamplePrompt is
    taken as it is, e.g. a caption that must not be read for options); steps and guidance
    left at None are the base's recommendation (`sdlora.bases.recommend`).
    """
    from sdlora.bases.recommend import recommended

    rec = recommended(pipe)
    steps = rec.steps if steps is None else steps
    guidance = rec.guidance if guidance is None else guidance
    images = []
    for i, line in enumerate(prompts):
        sample = (
            line
            if isinstance(line, SamplePrompt)
            else parse_prompt_line(line, f"number {i + 1}", "sample_prompts")
        )
        generator = torch.Generator(pipe.device).manual_seed(
            seed + i if sample.seed is None else sample.seed
        )
        result = pipe(
            sample.prompt,
            negative_prompt=sample.negative,
            num_inference_steps=steps if sample.steps is None else sample.steps,
            guidance_scale=guidance if sample.guidance is None else sample.guidance,
            width=width if sample.width is None else sample.width,
            height=height if sample.height is None else sample.height,
            generator=generator,
            output_type="pil",
        )
        images.append(result.images[0])
    cell_w, cell_h = max(im.width for im in images), max(im.height for im in images)
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * cell_w, (i // columns) * cell_h))
    return grid
