"""Conflict report: where two or more adapters move the same blocks, and in which directions.

For each pair of adapters (A, B), per LoRA Block Weight block (`sdlora.lora.blocks.block_of`:
BASE, IN00.., M00, OUT00..) and overall, on their exact ΔW in fp32 (`module_delta`, the LoRA
layer's `delta_weight`):

- cosine: <a, b> / (‖a‖·‖b‖) of the ΔW flattened and concatenated. Per block, over the block's
  modules present in both adapters (a block only one adapter moves is reported as "only A" /
  "only B", with cosine and overlap 0). Overall, over every module either adapter has, a module
  one adapter lacks counting as ΔW = 0 there (it does not change that module), so two adapters
  on disjoint blocks have cosine 0.
- overlap: the relative overlap of their magnitudes, Σ min(|a|, |b|) / Σ max(|a|, |b|) over
  the same entries (1 for an adapter with itself or its negation, 0 for disjoint blocks).
- conflicts: the blocks where they push against each other: cosine < -0.1 and each adapter's
  ΔW norm in that block (all its modules there) at least 0.1 × its own largest block norm.

Only linear adapters: a nonlinear one's ΔW depends on the input, so it is refused with the
reason. Adapters of different model families are refused in one line.
"""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path

import torch

from sdlora.errors import SdloraError
from sdlora.lora.adapter import PREFIXES, Adapter, component_of
from sdlora.lora.blocks import BLOCKS26, LAYOUTS, block_of
from sdlora.tools.merge import check_linear_one_family, family_of, module_delta

CONFLICT_COSINE = -0.1  # a block's cosine below this ...
CONFLICT_NORM = 0.1  # ... with both norms at least this fraction of their largest block norm
RULE = (
    f"cosine < {CONFLICT_COSINE:g} and each ΔW norm in the block >= {CONFLICT_NORM:g} x "
    "that adapter's largest block norm"
)
OVERLAP = "sum min(|a|,|b|) / sum max(|a|,|b|) over the ΔW entries"


def check_comparable(adapters: list[Adapter]) -> None:
    """Refuse nonlinear adapters and adapters of different model families, in one line."""
    check_linear_one_family(adapters, "compared", "a nonlinear one's ΔW depends on the input")


def module_block(key: str) -> str:
    """The block of a flat module key."""
    component = component_of(key) or "unet"
    return block_of(component, key.removeprefix(PREFIXES.get(component, "")))


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def compare(adapters: list[Adapter]) -> dict:
    """The conflict report of `adapters` (see the module docstring), JSON-ready:
    {"files", "blocks", "rule", "overlap", "pairs": [{"a", "b", "blocks": {block: {...}},
    "overall": {...}, "conflicts": [...]}]}. ΔW are formed one module at a time."""
    if len(adapters) < 2:
        raise SdloraError("a conflict report needs two or more adapters")
    check_comparable(adapters)
    n = len(adapters)
    pairs = list(combinations(range(n), 2))
    keys = sorted({k for a in adapters for k in a.modules})
    # per adapter per block: squared norm and Σ|ΔW|; per pair per block: sums over shared modules
    sq = [dict() for _ in range(n)]
    absum = [dict() for _ in range(n)]
    shared = {p: {} for p in pairs}  # block -> [dot, sq_a, sq_b, Σmin, Σmax]
    for key in keys:
        block = module_block(key)
        present = [i for i in range(n) if key in adapters[i].modules]
        deltas = {}
        for i in present:
            d = module_delta(adapters[i].modules[key]).float().flatten().cpu()
            deltas[i] = d
            sq[i][block] = sq[i].get(block, 0.0) + float(d.dot(d))
            absum[i][block] = absum[i].get(block, 0.0) + float(d.abs().sum())
        for i, j in combinations(present, 2):
            a, b = deltas[i], deltas[j]
            if a.numel() != b.numel():
                raise SdloraError(
                    f"{adapters[i].source}: module {key} has {a.numel()} weights but "
                    f"{adapters[j].source} has {b.numel()}; the adapters were made for "
                    "different bases"
                )
            s = shared[(i, j)].setdefault(block, [0.0] * 5)
            s[0] += float(a.dot(b))
            s[1] += float(a.dot(a))
            s[2] += float(b.dot(b))
            s[3] += float(torch.minimum(a.abs(), b.abs()).sum())
            s[4] += float(torch.maximum(a.abs(), b.abs()).sum())
        del deltas
    family = next((f for a in adapters if (f := family_of(a)) is not None), None)
    order = (
        LAYOUTS[family.name].blocks if family is not None and family.name in LAYOUTS else BLOCKS26
    )
    seen = {b for per in sq for b in per}
    blocks = [b for b in order if b in seen] + sorted(seen - set(order))
    largest = [max((math.sqrt(v) for v in per.values()), default=0.0) for per in sq]
    report = []
    for i, j in pairs:
        rows, conflicts = {}, []
        dot = mins = 0.0
        for block in blocks:
            in_a, in_b = block in sq[i], block in sq[j]
            if not (in_a or in_b):
                continue
            s = shared[(i, j)].get(block)
            norm_a, norm_b = math.sqrt(sq[i].get(block, 0.0)), math.sqrt(sq[j].get(block, 0.0))
            if s is None:
                rows[block] = {
                    "status": "only A" if in_a else "only B",
                    "cosine": 0.0,
                    "overlap": 0.0,
                    "norm_a": norm_a,
                    "norm_b": norm_b,
                }
                continue
            dot += s[0]
            mins += s[3]
            cosine = _ratio(s[0], math.sqrt(s[1]) * math.sqrt(s[2]))
            rows[block] = {
                "status": "both",
                "cosine": cosine,
                "overlap": _ratio(s[3], s[4]),
                "norm_a": norm_a,
                "norm_b": norm_b,
            }
            if (
                cosine < CONFLICT_COSINE
                and norm_a >= CONFLICT_NORM * largest[i]
                and norm_b >= CONFLICT_NORM * largest[j]
            ):
                conflicts.append(block)
        total_a, total_b = sum(sq[i].values()), sum(sq[j].values())
        # Σ max over the union: Σ|a| + Σ|b| − Σ min (max + min = |a| + |b| entrywise)
        maxes = sum(absum[i].values()) + sum(absum[j].values()) - mins
        report.append(
            {
                "a": adapters[i].source,
                "b": adapters[j].source,
                "files": [i + 1, j + 1],  # their places in `files`, from 1
                "blocks": rows,
                "overall": {
                    "cosine": _ratio(dot, math.sqrt(total_a) * math.sqrt(total_b)),
                    "overlap": _ratio(mins, maxes),
                    "norm_a": math.sqrt(total_a),
                    "norm_b": math.sqrt(total_b),
                },
                "conflicts": conflicts,
            }
        )
    return {
        "files": [a.source for a in adapters],
        "blocks": blocks,
        "rule": RULE,
        "overlap_definition": OVERLAP,
        "pairs": report,
    }


def format_report(report: dict) -> str:
    """The report as text: one table per pair (block, cosine, overlap, norms), then conflicts."""
    lines = [
        f"overlap = {report['overlap_definition']}",
        f"conflict: {report['rule']}",
        "|A|, |B| = ΔW norm of all the adapter's modules in the block; cosine and overlap per "
        "block over the modules both have",
    ]
    for pair in report["pairs"]:
        lines += ["", f"A = {pair['a']}", f"B = {pair['b']}"]
        lines.append(f"  {'block':<8} {'cosine':>8} {'overlap':>8} {'|A|':>10} {'|B|':>10}")
        rows = [*pair["blocks"].items(), ("overall", {**pair["overall"], "status": "both"})]
        for block, row in rows:
            if row["status"] != "both":
                lines.append(
                    f"  {block:<8} {row['status']:>17} {row['norm_a']:>10.4g} {row['norm_b']:>10.4g}"
                )
                continue
            lines.append(
                f"  {block:<8} {row['cosine']:>8.4f} {row['overlap']:>8.4f} "
                f"{row['norm_a']:>10.4g} {row['norm_b']:>10.4g}"
            )
        lines.append("  push against each other: " + (", ".join(pair["conflicts"]) or "none"))
    return "\n".join(lines)


CELL = 24  # heat-map cell size in pixels
LEFT = 48  # room for the pair labels
TOP = 48  # room for the block names


def heatmap_size(report: dict) -> tuple[int, int]:
    """(width, height) of the heat map: a column per block and one for overall, a row per pair."""
    return LEFT + CELL * (len(report["blocks"]) + 1), TOP + CELL * len(report["pairs"])


def _colour(cosine: float) -> tuple[int, int, int]:
    """-1 red, 0 white, +1 blue."""
    c = max(-1.0, min(1.0, cosine))
    fade = int(round(255 * (1 - abs(c))))
    return (255, fade, fade) if c < 0 else (fade, fade, 255)


def heatmap(report: dict):
    """The cosines as a PIL image: rows = pairs ("1-2": files 1 and 2 in the order given),
    columns = blocks then overall; red -1, white 0, blue +1, grey where only one side has the
    block, black where neither has it; a conflict cell gets a black frame."""
    from PIL import Image, ImageDraw

    width, height = heatmap_size(report)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    names = [*report["blocks"], "all"]
    for col, name in enumerate(names):
        label = Image.new("RGB", (TOP, CELL), "white")
        ImageDraw.Draw(label).text((2, 6), name, fill="black")
        image.paste(label.rotate(90, expand=True), (LEFT + col * CELL, 0))
    for row, pair in enumerate(report["pairs"]):
        y = TOP + row * CELL
        label = "-".join(map(str, pair["files"]))
        draw.text((4, y + 6), label, fill="black")
        for col, name in enumerate(names):
            x = LEFT + col * CELL
            cell = pair["overall"] if name == "all" else pair["blocks"].get(name)
            if cell is None:
                fill = (0, 0, 0)
            elif cell.get("status", "both") != "both":
                fill = (160, 160, 160)
            else:
                fill = _colour(cell["cosine"])
            outline = (0, 0, 0) if name in pair["conflicts"] else (220, 220, 220)
            draw.rectangle([x, y, x + CELL - 1, y + CELL - 1], fill=fill, outline=outline)
    return image


def write_heatmap(report: dict, path: str | Path) -> Path:
    """Write the heat map as a PNG, whole or not at all (`sdlora.io.writing.written_file`)."""
    from sdlora.io.writing import written_file

    path = Path(path)
    image = heatmap(report)
    with written_file(path) as tmp:
        image.save(tmp, format="PNG")
    return path
