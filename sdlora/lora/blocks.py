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

SD 3.x has no UNet: its MMDiT is a stack of joint blocks (`transformer_blocks.N`, 24 in SD3 /
SD3.5 Medium, 38 in SD3.5 Large; kohya's files spell them `joint_blocks_N`). Its blocks are

    BASE         the text encoders (both CLIPs and T5)
    J00..Jnn     joint block N (two digits, as LBW numbers blocks)
    EMBED        pos_embed, time_text_embed, context_embedder: in the FIRST group
    FINAL        norm_out, proj_out (kohya's final_layer): in the LAST group

and its groups are thirds of the stack, FIRST, MIDDLE and LAST, of k, n - 2k and k blocks where
k = (n + 1) // 3 (24 blocks: 8/8/8; 38: 13/12/13; tiny-sd3's 2: J00 / none / J01). A vector has
one value per joint block after BASE (25 for 24 blocks), in that order, checked against the base's
block count; EMBED takes J00's value and FINAL the last block's, as the LBW vector's IN00 and
OUT11 carry conv_in and conv_out. UNet names (IN04, MID) on an SD 3.x base, and SD 3.x names
on a UNet base, are refused naming the family.
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
# SD 3.x: a joint block, by diffusers' path or kohya's flat name
_JOINT = re.compile(r"^(?:transformer_blocks|joint_blocks)[._](\d+)(?:[._]|$)")
_FINAL = ("norm_out", "proj_out")
_KOHYA_SD3_EMBED = ("x_embedder", "t_embedder", "y_embedder", "context_embedder")
SD3_GROUPS = ("FIRST", "MIDDLE", "LAST")
_JOINT_NAME = re.compile(r"^J\d\d+$")


def joint_blocks(family: Family | None, models: dict) -> int | None:
    """The joint block count of an SD 3.x base (its transformer's), else None."""
    transformer = models.get("transformer")
    if family is None or family.name != "sd3" or transformer is None:
        return None
    return len(transformer.transformer_blocks)


def sd3_blocks(depth: int) -> tuple[str, ...]:
    """BASE and the joint blocks of an SD 3.x transformer of `depth` blocks: a vector's order."""
    return ("BASE", *(f"J{i:02d}" for i in range(depth)))


def third(i: int, depth: int) -> str:
    """The group of joint block i of `depth`: FIRST, MIDDLE or LAST (k, n - 2k, k; k = (n+1)//3)."""
    k = (depth + 1) // 3
    return "FIRST" if i < k else "LAST" if i >= depth - k else "MIDDLE"


def block_of(component: str, path: str) -> str:
    """The LoRA Block Weight block of a module: `component` "unet" or a text encoder, `path` its
    diffusers module path (dots) or flat key suffix (underscores), or its original-layout name.

    `component` "transformer" (SD 3.x): J00.., EMBED or FINAL (kohya's SD3 names under "unet"
    too)."""
    joint = _JOINT.match(path) if component in ("unet", "transformer") else None
    if joint:
        return f"J{int(joint.group(1)):02d}"
    if component == "transformer":  # its other modules: the embedders, the final layer
        return "FINAL" if path.startswith(_FINAL) else "EMBED"
    if component != "unet":
        return "BASE"
    if path.startswith(_KOHYA_SD3_EMBED):
        return "EMBED"
    if path.startswith("final_layer"):
        return "FINAL"
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
    spec: str | dict | list | tuple | None, family: Family | None = None, depth: int | None = None
) -> dict[str, float]:
    """{block or group name: multiplier} from a spec (see the module docstring); {} for None.

    With the adapter's `family`, a vector must have one of that family's lengths and a block
    name must be one of its blocks; without, any known vector and any block name passes. SD 3.x:
    `depth` is the base's joint block count, which a vector's length must fit and which turns
    FIRST/MIDDLE/LAST (and a vector's ends) into values of the blocks they hold.
    """
    if spec is None or spec == "" or spec == {}:
        return {}
    sd3 = family is not None and family.name == "sd3"
    layout = LAYOUTS.get(family.name) if family is not None else None
    if sd3 and depth is not None:
        layout = BlockLayout((*sd3_blocks(depth), "EMBED", "FINAL"), {depth + 1: sd3_blocks(depth)})
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
    vector = isinstance(spec, list | tuple)
    if vector:
        spec = dict(zip(_vector_names(len(spec), family, layout), spec, strict=True))
    blocks = {}
    for name, value in spec.items():
        key = _block_name(name, family, layout)
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
    if sd3 and depth is not None:
        if vector:  # the embedders with the first block, the final layer with the last
            blocks["EMBED"], blocks["FINAL"] = blocks["J00"], blocks[f"J{depth - 1:02d}"]
        return _thirds(blocks, depth)
    return blocks


def _vector_names(length: int, family: Family | None, layout: BlockLayout | None) -> tuple:
    """The block names of a vector of `length` values, or a one-line refusal naming what fits."""
    sd3 = family is not None and family.name == "sd3"
    if sd3 and layout is None:  # block count unknown: a vector of any length after BASE
        if length < 2:
            raise SdloraError(
                "block strengths: a vector for an SD 3.x adapter has BASE then one value per "
                f"joint block, not {length} value(s)"
            )
        return sd3_blocks(length - 1)
    vectors = layout.vectors if layout is not None else VECTORS
    names = vectors.get(length)
    if names is not None:
        return names
    if layout is None:
        raise SdloraError(
            f"block strengths: a vector has 17 or 26 values (SD 1.x/2.x), 12 or 20 (SDXL) "
            f"in LoRA Block Weight's order, not {length}"
        )
    if sd3:
        (full,) = vectors
        raise SdloraError(
            f"block strengths: a vector for this SD 3.x base has {full} values (BASE, then "
            f"{spans(vectors[full][1:])}: one per joint block), not {length}"
        )
    short, full = sorted(vectors)
    raise SdloraError(
        f"block strengths: a vector for an {family.label} adapter has {short} values "
        f"({spans(vectors[short])}) or {full} ({spans(vectors[full])}) in LoRA Block "
        f"Weight's order, not {length}"
    )


def _block_name(name, family: Family | None, layout: BlockLayout | None) -> str:
    """The block or group a spec's name means (MID -> M00), or a one-line refusal that names
    the family and what it has."""
    key = str(name).strip().upper()
    key = GROUPS.get(key, key) if key != "TE" else "BASE"
    sd3_name = key in SD3_GROUPS or key in ("EMBED", "FINAL") or bool(_JOINT_NAME.match(key))
    if family is not None and family.name == "sd3":
        if key == "BASE" or (sd3_name and (layout is None or key in (*layout.blocks, *SD3_GROUPS))):
            return key
        joint = spans(layout.blocks[1:-2]) if layout is not None else "J00, J01, .."
        raise SdloraError(
            f"block strengths: an SD 3.x adapter has no block {name!r}; use FIRST, MIDDLE, "
            f"LAST, BASE, EMBED, FINAL or one of {joint}"
        )
    known = layout.blocks if layout is not None else BLOCKS26
    if key in known or key in ("IN", "OUT") or (layout is None and sd3_name):
        return key
    where = f"an {family.label} adapter has no block" if layout else "unknown block"
    raise SdloraError(
        f"block strengths: {where} {name!r}; use IN, MID, OUT, BASE or one of {spans(known[1:])}"
    )


def _thirds(blocks: dict[str, float], depth: int) -> dict[str, float]:
    """SD 3.x: FIRST/MIDDLE/LAST given as the values of the blocks they hold (EMBED in FIRST,
    FINAL in LAST), where those have none of their own."""
    members = {f"J{i:02d}": third(i, depth) for i in range(depth)}
    members.update(EMBED="FIRST", FINAL="LAST")
    out = {k: v for k, v in blocks.items() if k not in SD3_GROUPS}
    for block, group in members.items():
        if block not in out and group in blocks:
            out[block] = blocks[group]
    return out


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

    `blocks`: a spec or `parse_blocks`' result, checked against the adapter's own family; an
    SD 3.x adapter's joint blocks are counted from its own keys (highest block + 1)."""
    from sdlora.lora.adapter import PREFIXES, component_of

    family = adapter_family(adapter)
    depth = None
    if family is not None and family.name == "sd3":
        found = [
            _JOINT.match(key.removeprefix(PREFIXES.get(component_of(key) or "unet", "")))
            for key in adapter.modules
        ]
        depth = max((int(m.group(1)) + 1 for m in found if m), default=None)
    try:
        blocks = parse_blocks(blocks, family, depth)
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
