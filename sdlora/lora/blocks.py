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
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

from sdlora.errors import SdloraError
from sdlora.lora.adapter import MAX_STRENGTH, Adapter, ModuleFactors

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
GROUPS = {"BASE": "BASE", "TE": "BASE", "IN": "IN", "MID": "M00", "M00": "M00", "OUT": "OUT"}
_DOWN = re.compile(r"^down_blocks[._](\d+)[._](attentions|resnets|downsamplers)[._](\d+)")
_UP = re.compile(r"^up_blocks[._](\d+)[._](attentions|resnets|upsamplers)[._](\d+)")
# the original (LDM/SGM) layout's names, as SDXL adapters spell UNet modules
_ORIGINAL = re.compile(r"^(input_blocks|output_blocks)[._](\d+)[._]")


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


def parse_blocks(spec: str | dict | list | tuple | None) -> dict[str, float]:
    """{block or group name: multiplier} from a spec (see the module docstring); {} for None."""
    if spec is None or spec == "" or spec == {}:
        return {}
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
        names = VECTORS.get(len(spec))
        if names is None:
            raise SdloraError(
                f"block strengths: a vector has 17 or 26 values (SD 1.x/2.x), 12 or 20 (SDXL) "
                f"in LoRA Block Weight's order, not {len(spec)}"
            )
        spec = dict(zip(names, spec, strict=True))
    blocks = {}
    for name, value in spec.items():
        key = str(name).strip().upper()
        key = GROUPS.get(key, key)
        if key not in BLOCKS26 and key not in ("IN", "OUT"):
            raise SdloraError(
                f"block strengths: unknown block {name!r}; use IN, MID, OUT, BASE or one of "
                "IN00..IN11, M00, OUT00..OUT11"
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


def multiplier(blocks: dict[str, float], block: str) -> float:
    """The multiplier of `block` under `blocks`: its own value, else its group's, else 1."""
    if block in blocks:
        return blocks[block]
    group = "IN" if block.startswith("IN") else "OUT" if block.startswith("OUT") else None
    return blocks.get(group, 1.0) if group else 1.0


def scale_blocks(adapter: Adapter, blocks: dict[str, float]) -> Adapter:
    """A copy of `adapter` whose modules carry their block's multiplier (in `up`), for merging."""
    from sdlora.lora.adapter import PREFIXES, component_of

    if not blocks:
        return adapter
    modules = {}
    for key, factors in adapter.modules.items():
        component = component_of(key) or "unet"
        suffix = key.removeprefix(PREFIXES.get(component, ""))
        m = multiplier(blocks, block_of(component, suffix))
        modules[key] = ModuleFactors(factors.down, factors.up * m, factors.alpha)
    return replace(adapter, modules=modules, metadata=dict(adapter.metadata))
