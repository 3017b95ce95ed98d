"""A1111's prompt conventions: `<lora:name:0.7>` tags and the PNG `parameters` text.

A1111 and its forks let a prompt name adapters inline, `a cat <lora:ink:0.7>`: the tag is taken
out of the prompt and the adapter `ink` joins the mix at strength 0.7 (1 when left out). The same
programs write each image's recipe into a PNG text chunk `parameters`:

    a cat <lora:ink:0.7>
    Negative prompt: blurry
    Steps: 20, Sampler: pndm, CFG scale: 7.5, Seed: 42, Size: 512x512

`sdlora.bases.generate.png_info` writes that form; `parse_parameters` reads it back, for images whose
full sdlora record is missing.
"""

from __future__ import annotations

import math
import re

from sdlora.errors import SdloraError

# <lora:NAME>, <lora:NAME:STRENGTH>, then named parts `:key=value`: LoRA Block Weight's `lbw=`
# (the adapter's block strengths) and `start=`/`stop=` (when over the steps it acts, see
# sdlora/lora/schedule.py). NAME may hold '/', '.', '-', spaces.
LORA_TAG = re.compile(
    r"<lora:([^:<>]+)(?::([^:<>=]*))?((?::\s*[A-Za-z_]+\s*=[^:<>]*)*)>", re.IGNORECASE
)
NAMED = ("lbw", "start", "stop")


def _named(match: re.Match) -> dict[str, str]:
    """The tag's `key=value` parts; a key sdlora does not read is refused, naming the tag."""
    parts: dict[str, str] = {}
    for part in (p for p in match.group(3).split(":") if p.strip()):
        key, _, value = part.partition("=")
        key = key.strip().lower()
        if key not in NAMED:
            raise SdloraError(
                f"{match.group(0)}: {key}= is not read here; a tag takes a strength, "
                "lbw= (block strengths), start= and stop= (fractions of the steps)"
            )
        parts[key] = value.strip()
    return parts


def _tags(prompt: str):
    """(tag text, name, strength, {key: value}) for each <lora:…> tag of `prompt`."""
    for match in LORA_TAG.finditer(prompt or ""):
        name = match.group(1).strip().removesuffix(".safetensors")
        text = (match.group(2) or "").strip()
        try:
            strength = float(text) if text else 1.0
        except ValueError:
            raise SdloraError(
                f"{match.group(0)}: the strength after the name must be a number, "
                "e.g. <lora:name:0.7>"
            ) from None
        if not math.isfinite(strength):
            raise SdloraError(f"{match.group(0)}: the strength must be a finite number")
        yield match.group(0), name, strength, _named(match)


def split_lora_tags(prompt: str) -> tuple[str, dict[str, float], dict[str, str]]:
    """(prompt without tags, {name: strength}, {name: block spec}) from `prompt`.

    Whitespace left behind by a removed tag is collapsed. A strength that is not a finite
    number raises, naming the tag.
    """
    strengths: dict[str, float] = {}
    blocks: dict[str, str] = {}
    for _, name, strength, named in _tags(prompt):
        strengths[name] = strength
        if named.get("lbw"):
            blocks[name] = named["lbw"]
    clean = LORA_TAG.sub(" ", prompt or "")
    clean = re.sub(r"[ \t]{2,}", " ", clean).strip()
    clean = re.sub(r"\s+,", ",", clean).strip(" ,")
    return clean, strengths, blocks


def lora_windows(prompt: str) -> dict[str, str]:
    """{name: 'start=…,stop=…'} for the tags of `prompt` that say when their adapter acts;
    each is checked (`schedule.parse_window`), naming the tag."""
    from sdlora.lora.schedule import parse_window

    windows: dict[str, str] = {}
    for tag, name, _, named in _tags(prompt):
        text = ",".join(f"{key}={named[key]}" for key in ("start", "stop") if key in named)
        if text:
            windows[name] = parse_window(text, where=tag).text
    return windows


def lora_tag(
    name: str, strength: float, blocks: str | None = None, window: str | None = None
) -> str:
    """`<lora:name:strength>` (with `:lbw=blocks` and `:start=…:stop=…` when given), as A1111
    and LoRA Block Weight write it."""
    extra = (f":lbw={blocks}" if blocks else "") + "".join(
        f":{part}" for part in (window or "").split(",") if part
    )
    return f"<lora:{name}:{strength:g}{extra}>"


_FIELDS = {
    "steps": ("Steps", int),
    "scheduler": ("Sampler", str),
    "guidance": ("CFG scale", float),
    "seed": ("Seed", int),
}


def parse_parameters(text: str) -> dict:
    """The settings an A1111-style `parameters` text holds, as GenerateSettings field names:
    prompt, negative_prompt, steps, scheduler, guidance, seed, width, height, adapters, blocks,
    schedules.

    Fields the text lacks are left out; a text with no settings line raises.
    """
    lines = (text or "").strip().split("\n")
    settings_at = next(
        (i for i in range(len(lines) - 1, -1, -1) if re.match(r"^\s*Steps:", lines[i])), None
    )
    if settings_at is None:
        raise SdloraError("the image's parameters hold no settings line (Steps: ..., Seed: ...)")
    head = lines[:settings_at]
    negative = [i for i, line in enumerate(head) if line.startswith("Negative prompt:")]
    prompt_lines = head[: negative[0]] if negative else head
    prompt, adapters, blocks = split_lora_tags("\n".join(prompt_lines))
    out: dict = {"prompt": prompt, "adapters": adapters, "blocks": blocks}
    schedules = lora_windows("\n".join(prompt_lines))
    if schedules:
        out["schedules"] = schedules
    if negative:
        out["negative_prompt"] = (
            "\n".join(head[negative[0] :]).removeprefix("Negative prompt:").strip()
        )
    pairs = dict(
        (key.strip(), value.strip())
        for key, _, value in (
            part.partition(":") for part in re.split(r",\s*(?=[A-Za-z ]+:)", lines[settings_at])
        )
    )
    for field_name, (key, kind) in _FIELDS.items():
        if key in pairs:
            try:
                out[field_name] = kind(pairs[key])
            except ValueError:
                raise SdloraError(
                    f"the image's parameters: {key} {pairs[key]!r} is not valid"
                ) from None
    size = re.fullmatch(r"(\d+)x(\d+)", pairs.get("Size", ""))
    if size:
        out["width"], out["height"] = int(size.group(1)), int(size.group(2))
    return out
