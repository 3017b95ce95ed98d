"""`FILE[:STRENGTH][@NAME][@BLOCKS][@WINDOW]`: how every command names an adapter, its strength,
name, block strengths and the part of the steps it acts over.

WINDOW is `start=0.2`, `stop=0.8` or both (`start=0.2,stop=0.8`; sdlora/lora/schedule.py): split
off first, from the last '@', when the text there holds only start=/stop= parts.

BLOCKS are per-block strengths (sdlora/lora/blocks.py): `IN=0,MID=1,OUT=0.5` (names with `=`), or a
vector of numbers in LoRA Block Weight's order (17 or 26 for SD 1.x/2.x, 12 or 20 for SDXL). They
are split off first, from the last '@', when the text there holds '=' or is a list of two or more
numbers; the mixer then checks them against the adapter's family, so a vector of another length
is an error, never a name.

Parsing keeps file names that hold ':' or '@' whole: STRENGTH is split off only when the text
after the last ':' is a number (so `C:\\loras\\a.safetensors` stays a path), and NAME only after
the last '@', when that text holds no ':', '/' or '\\' and is not a file name
(`me@home.safetensors` stays a path).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sdlora.errors import SdloraError

FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # '@x.safetensors' is a file
VECTOR = re.compile(r"^\s*[-+.\deE]+(\s*,\s*[-+.\deE]+)+\s*,?\s*$")  # two or more numbers


@dataclass
class LoraSpec:
    """One `--lora` value: the adapter file, its strength and the name it is loaded under."""

    path: str
    strength: float = 1.0
    name: str | None = None  # None: named after the file (see `adapter_names`)
    blocks: str | None = None  # per-block strengths (sdlora/lora/blocks.py); None: every block 1
    window: str | None = None  # when over the steps it acts (sdlora/lora/schedule.py); None: all


def parse_lora(spec: str) -> tuple[str, float]:
    """'FILE[:STRENGTH]' -> (file, strength); STRENGTH defaults to 1.0 (an @NAME is dropped)."""
    parsed = parse_lora_spec(spec)
    return parsed.path, parsed.strength


def split_blocks(spec: str) -> tuple[str, str | None]:
    """('FILE[:STRENGTH][@NAME]', BLOCKS or None) from a spec that may end in '@BLOCKS'."""
    head, sep, tail = spec.rpartition("@")
    if sep and head and not any(c in tail for c in "/\\") and ("=" in tail or VECTOR.match(tail)):
        return head, tail
    return spec, None


def split_window(spec: str) -> tuple[str, str | None]:
    """('FILE[:STRENGTH][@NAME][@BLOCKS]', WINDOW as 'start=…,stop=…' or None)."""
    from sdlora.lora.schedule import is_window, parse_window

    head, sep, tail = spec.rpartition("@")
    if sep and head and is_window(tail):
        return head, parse_window(tail, where=f"--lora {spec}").text or None
    return spec, None


def parse_lora_spec(spec: str) -> LoraSpec:
    """'FILE[:STRENGTH][@NAME][@BLOCKS][@WINDOW]' -> LoraSpec; STRENGTH defaults to 1.0, the rest
    to None."""
    spec, window = split_window(spec)
    spec, blocks = split_blocks(spec)
    parsed = _parse_named(spec)
    parsed.blocks, parsed.window = blocks, window
    return parsed


def _parse_named(spec: str) -> LoraSpec:
    head, sep, name = spec.rpartition("@")
    if (
        not sep
        or not head
        or any(c in name for c in ":/\\")
        or name.lower().endswith(FILE_SUFFIXES)
    ):
        head, name = spec, None
    elif not name.strip():
        raise SdloraError(f"--lora {spec}: give a name after '@', or leave the '@' out")
    path, sep, strength = head.rpartition(":")
    if sep:
        try:
            return LoraSpec(path, float(strength), name)
        except ValueError:
            pass
    return LoraSpec(head, 1.0, name)


def adapter_names(specs: list[LoraSpec]) -> tuple[list[str], list[str]]:
    """A distinct name for each adapter, and a note for each name that had to be made unique.

    An adapter without @NAME is named after its file (`style` for `a/style.safetensors`); when
    two would share a name, each of them gets as many parent folders as it takes to tell them
    apart (`a/style`, `b/style`). The same file twice, or one @NAME twice, is an error.
    """
    given = [s.name for s in specs if s.name]
    for name in given:
        if given.count(name) > 1:
            raise SdloraError(
                f"--lora ...@{name}: two adapters are given the name {name!r}; "
                "give each its own @NAME"
            )
    unnamed = [s for s in specs if not s.name]
    parts = {id(s): Path(s.path).resolve().with_suffix("").parts for s in unnamed}
    seen: dict[tuple[str, ...], str] = {}
    for s in unnamed:
        if parts[id(s)] in seen:
            raise SdloraError(
                f"--lora {s.path} is given twice ({seen[parts[id(s)]]}); give it once with the "
                "strength you want, or give each a name with FILE@NAME"
            )
        seen[parts[id(s)]] = s.path
    depth = {id(s): 1 for s in unnamed}

    def auto(s: LoraSpec) -> str:
        return "/".join(parts[id(s)][-depth[id(s)] :])

    while True:
        taken: dict[str, list[LoraSpec]] = {}
        for s in unnamed:
            taken.setdefault(auto(s), []).append(s)
        clashes = [group for name, group in taken.items() if len(group) > 1 or name in given]
        if not clashes:
            break
        for group in clashes:
            for s in group:
                if depth[id(s)] >= len(parts[id(s)]):
                    raise SdloraError(
                        f"--lora {s.path}: the name {auto(s)!r} is taken; give another with "
                        f"{s.path}@NAME"
                    )
                depth[id(s)] += 1
    names = [s.name or auto(s) for s in specs]
    notes = [
        f"--lora {s.path} is loaded as {auto(s)!r}, since another adapter is named "
        f"{parts[id(s)][-1]!r} too (choose names with --lora FILE@NAME)"
        for s in unnamed
        if depth[id(s)] > 1
    ]
    return names, notes
