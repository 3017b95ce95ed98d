"""Per-block strengths: one adapter's strength set apart for the UNet's blocks and the text encoder.

What A1111's LoRA Block Weight extension offers, in its block names. SD 1.x/2.x UNets have the
original (LDM) layout's 12 input blocks, the middle block and 12 output blocks:

    BASE         the text encoder
    IN00..IN11   conv_in = IN00; down_blocks.i resnet/attention j = IN(3i+j+1), downsampler IN(3i+3)
    M00          mid_block
    OUT00..OUT11 up_blocks.i resnet/attention j = OUT(3i+j), upsampler OUT(3i+2); conv_out = OUT11

SDXL's UNet has 9 input and 9 output blocks in the same numbering (two layers a down block, three
an up block, as in SD): IN00..IN08, M00, OUT00..OUT08; BASE is both text encoders. Its adapters
name modules in that layout already (`input_blocks_4_1_...` is IN04); conv_out, which the
extension leaves out, follows the OUT group (OUT11 is SD's name for it).

A spec is a dict or text of `NAME=value` pairs where NAME is a block (`IN04`), a group (`IN`, `MID`,
`OUT`, `BASE`; `TE` is BASE), or a vector of numbers in the extension's order: 17 or 26 for SD
1.x/2.x (the blocks an attention-only LoRA has; all), 12 or 20 for SDXL (the same). A module's
multiplier is its block's value, else its group's, else 1; the module then runs at strength ×
multiplier, exactly as whole strengths do.

Where the adapter's family is known (the mixer's base, a merged file's own widths), a spec is
checked against that family's layout: a vector of the other family's length, or a block the
family does not have, would leave modules at full strength without a word (17 zeros on an SDXL
adapter keep its OUT00..OUT02 on), so it is refused, naming the lengths and blocks that fit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from sdlora.bases.families import Family
from sdlora.errors import SdloraError
from sdlora.lora.adapter import MAX_STRENGTH, Adapter, ModuleFactors, adapter_family

BLOCKS26 = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
BLOCKS17 = (
    "BASE",
    "IN01",
    "IN02",
    "IN04",
    "IN05",
    "IN07",
    "IN08",
    "M00",
    *(f"OUT{i:02d}" for i in range(3, 12)),
)
BLOCKS20_XL = ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)))
BLOCKS12_XL = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6)))
VECTORS = {17: BLOCKS17, 26: BLOCKS26, 12: BLOCKS12_XL, 20: BLOCKS20_XL}  # by length


@dataclass(frozen=True)
class BlockLayout:
    """The blocks of one family's UNet (and BASE), and its vectors by length."""

    blocks: tuple[str, ...]  # every block name a spec may give
    vectors: dict[int, tuple[str, ...]]  # length -> the blocks of a vector of that length


SD_LAYOUT = BlockLayout(BLOCKS26, {17: BLOCKS17, 26: BLOCKS26})
XL_LAYOUT = BlockLayout(BLOCKS20_XL, {12: BLOCKS12_XL, 20: BLOCKS20_XL})
LAYOUTS = {"sd1": SD_LAYOUT, "sd2": SD_LAYOUT, "sdxl": XL_LAYOUT}  # by Family.name
GROUPS = {"BASE": "BASE", "TE": "BASE", "IN": "IN", "MID": "M00", "M00": "M00", "OUT": "OUT"}
_DOWN = re.compile(r"^down_blocks[._](\d+)[._](attentions|resnets|downsamplers)[._](\d+)")
_UP = re.compile(r"^up_blocks[._](\d+)[._](attentions|resnets|upsamplers)[._](\d+)")
# the original (LDM/SGM) layout's names, as SDXL adapters spell UNet modules
_ORIGINAL = re.compile(r"^(input_blocks|output_blocks)[._](\d+)[._]")
_NUMBERED = re.compile(r"^([A-Z]+)(\d+)$")  # IN04: group and number


def block_of(component: str, path: str) -> str:
    """The LoRA Block Weight block of a module: `component` "unet" or a text encoder, `path` its
    diffusers module path (dots) or flat key suffix (underscores), or its original-layout name."""
    if component != "unet":
        return "BASE"
    if path.startswith(("mid_block", "mid.", "middle_block")):
        return "M00"
    if path.startswith(("conv_in", "time_embed", "add_embedding", "label_emb")):
        return "IN00"
    if path.startswith(("conv_out", "conv_norm_out", "out.", "out_")):
        return "OUT11"
    original = _ORIGINAL.match(path)
    if original:
        return (
            "IN" if original.group(1) == "input_blocks" else "OUT"
        ) + f"{int(original.group(2)):02d}"
    down = _DOWN.match(path)
    if down:
        i, kind, j = int(down.group(1)), down.group(2), int(down.group(3))
        return f"IN{3 * i + 3:02d}" if kind == "downsamplers" else f"IN{3 * i + j + 1:02d}"
    up = _UP.match(path)
    if up:
        i, kind, j = int(up.group(1)), up.group(2), int(up.group(3))
        return f"OUT{3 * i + 2:02d}" if kind == "upsamplers" else f"OUT{3 * i + j:02d}"
    return "BASE"


def parse_blocks(
    spec: str | dict | list | tuple | None, family: Family | None = None
) -> dict[str, float]:
    """{block or group name: multiplier} from a spec (see the module docstring); {} for None.

    With the adapter's `family`, a vector must have one of that family's lengths and a block
    name must be one of its blocks; without, any known vector and any SD block name passes.
    """
    if spec is None or spec == "" or spec == {}:
        return {}
    layout = LAYOUTS.get(family.name) if family is not None else None
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        if parts and all("=" not in p for p in parts):
            spec = parts  # a vector
        else:
            pairs = {}
            for part in parts:
                name, sep, value = part.partition("=")
                if not sep:
                    raise SdloraError(f"block strengths {spec!r}: {part!r} is not NAME=value")
                pairs[name.strip()] = value.strip()
            spec = pairs
    if isinstance(spec, list | tuple):
        vectors = layout.vectors if layout is not None else VECTORS
        names = vectors.get(len(spec))
        if names is None and layout is None:
            raise SdloraError(
                f"block strengths: a vector has 17 or 26 values (SD 1.x/2.x), 12 or 20 (SDXL) "
                f"in LoRA Block Weight's order, not {len(spec)}"
            )
        if names is None:
            short, full = sorted(vectors)
            raise SdloraError(
                f"block strengths: a vector for an {family.label} adapter has {short} values "
                f"({spans(vectors[short])}) or {full} ({spans(vectors[full])}) in LoRA Block "
                f"Weight's order, not {len(spec)}"
            )
        spec = dict(zip(names, spec, strict=True))
    known = layout.blocks if layout is not None else BLOCKS26
    blocks = {}
    for name, value in spec.items():
        key = str(name).strip().upper()
        key = GROUPS.get(key, key)
        if key not in known and key not in ("IN", "OUT"):
            where = f"an {family.label} adapter has no block" if layout else "unknown block"
            raise SdloraError(
                f"block strengths: {where} {name!r}; use IN, MID, OUT, BASE or one of "
                f"{spans(known[1:])}"
            )
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise SdloraError(f"block strengths: {name}={value!r} is not a number") from None
        if not (math.isfinite(number) and abs(number) <= MAX_STRENGTH):
            raise SdloraError(
                f"block strengths: {name}={value} must be a number from -{MAX_STRENGTH:g} to "
                f"{MAX_STRENGTH:g}"
            )
        blocks[key] = number
    return blocks


def spans(names: tuple[str, ...]) -> str:
    """Block names for a message, runs of three or more shortened: "BASE, IN01, IN02, IN04..IN08"."""
    runs: list[list[str]] = []
    for name in names:
        if runs and _follows(runs[-1][-1], name):
            runs[-1].append(name)
        else:
            runs.append([name])
    return ", ".join(f"{r[0]}..{r[-1]}" if len(r) >= 3 else ", ".join(r) for r in runs)


def _follows(before: str, name: str) -> bool:
    """IN05 follows IN04."""
    a, b = _NUMBERED.match(before), _NUMBERED.match(name)
    return bool(a and b and a[1] == b[1] and int(a[2]) + 1 == int(b[2]))


def multiplier(blocks: dict[str, float], block: str) -> float:
    """The multiplier of `block` under `blocks`: its own value, else its group's, else 1."""
    if block in blocks:
        return blocks[block]
    group = "IN" if block.startswith("IN") else "OUT" if block.startswith("OUT") else None
    return blocks.get(group, 1.0) if group else 1.0


def scale_blocks(adapter: Adapter, blocks: str | dict | list | tuple | None) -> Adapter:
    """A copy of `adapter` whose modules carry their block's multiplier (in `up`), for merging.

    `blocks`: a spec or `parse_blocks`' result, checked against the adapter's own family."""
    from sdlora.lora.adapter import PREFIXES, component_of

    try:
        blocks = parse_blocks(blocks, adapter_family(adapter))
    except SdloraError as err:
        raise SdloraError(f"{adapter.source}: {err}") from None
    if not blocks:
        return adapter
    modules = {}
    for key, factors in adapter.modules.items():
        component = component_of(key) or "unet"
        suffix = key.removeprefix(PREFIXES.get(component, ""))
        m = multiplier(blocks, block_of(component, suffix))
        modules[key] = ModuleFactors(factors.down, factors.up * m, factors.alpha)
    return replace(adapter, modules=modules, metadata=dict(adapter.metadata))
