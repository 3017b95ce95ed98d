"""JSON in an adapter file's header metadata, read within bounds.

A safetensors header holds strings; several of them are JSON (sdlora's `sdlora_training` and
`sdlora_trigger_words`, kohya's `ss_tag_frequency`, diffusers' `lora_adapter_metadata`). A file
from anywhere may hold anything there: `json.loads` of `[[[[…` 100,000 deep raises
RecursionError, and a few megabytes of nesting make every later walk of the value recurse as
deep. So every such string is read here, refused in one line past MAX_DEPTH levels of nesting or
MAX_CHARS characters (the real ones nest 2 or 3 deep and hold kilobytes; kohya's tag counts of a
big dataset some hundreds of kilobytes).
"""

from __future__ import annotations

import json
import re
from typing import Any

from sdlora.errors import SdloraError

MAX_DEPTH = 32  # levels of [ ] / { } nesting
MAX_CHARS = 8 * 2**20  # 8 Mi characters

# a JSON string, escapes included; one left open runs to the end (so no start is tried twice)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def nests_deeper(text: str, limit: int) -> bool:
    """True when `text`'s arrays and objects nest more than `limit` levels deep (brackets
    inside strings do not count)."""
    depth = 0
    for bracket in _NOT_BRACKET.sub("", _STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > limit:
            return True
    return False


def parse_json(text: str, where: str) -> Any:
    """The JSON value of a metadata string; `where` names it in errors ("a.safetensors: its
    sdlora_training metadata"). SdloraError when it is not JSON, longer than MAX_CHARS or
    nested deeper than MAX_DEPTH."""
    if len(text) > MAX_CHARS:
        raise SdloraError(
            f"{where} is {len(text):,} characters long, more than the {MAX_CHARS:,} metadata "
            "may hold; the file is damaged or not an adapter"
        )
    if nests_deeper(text, MAX_DEPTH):
        raise SdloraError(
            f"{where} nests more than {MAX_DEPTH} levels deep; the file is damaged or not an "
            "adapter"
        )
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise SdloraError(f"{where} is not JSON") from None
