"""Write samples/style/: 12 toy-world pictures in a style the `toy` base has never seen, with captions.

The style: a teal and sand checkerboard background and thick black outlines around the shape.
Captions describe the content and end with the trigger phrase "in sks style". Deterministic:
running this again rewrites the same files.

    python samples/make_samples.py [--out samples/style]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from sdlora.bases import toyworld

TRIGGER = "sks"
SEED = 1234
COUNT = 12
TEAL = (40, 140, 140)
SAND = (230, 200, 140)
OUTLINE_PX = 2.5  # at 64 px; scales with the picture (5 px at 128)
CHECKER_PX = 8  # checker cell at 64 px
# (height, width): mostly square, a few wide and tall ones so aspect-ratio bucketing has work to do.
SIZES = [(128, 128)] * 8 + [(128, 160), (128, 160), (160, 128), (160, 128)]


def style_scenes() -> toyworld.Scenes:
    """The 12 sample scenes: every shape, every color and position, in the sample style."""
    scenes = toyworld.sample_scenes(COUNT, SEED)
    index = torch.arange(COUNT)
    colors = torch.tensor(list(toyworld.COLORS.values()), dtype=torch.float32) / 255
    color = (index * 3) % len(toyworld.COLORS)
    size = (index // 2) % 2
    radius = torch.tensor([toyworld.RADIUS[toyworld.SIZES[s]][1] for s in size.tolist()]) - 0.02
    position = index % len(toyworld.POSITIONS)
    xy = torch.tensor([toyworld.POSITION_XY[p] for p in toyworld.POSITIONS])[position]
    center = torch.maximum(torch.minimum(xy, 1 - radius[:, None] - 0.03), radius[:, None] + 0.03)
    return replace(
        scenes,
        shape=index % len(toyworld.SHAPES),
        color=color,
        background=torch.full((COUNT,), -1),
        position=position,
        size=size,
        shape_rgb=colors[color],
        background_rgb=torch.tensor(TEAL, dtype=torch.float32).expand(COUNT, 3) / 255,
        pattern=torch.full((COUNT,), toyworld.PATTERNS.index("checker")),
        pattern_rgb=torch.tensor(SAND, dtype=torch.float32).expand(COUNT, 3) / 255,
        pattern_period=torch.full((COUNT,), float(CHECKER_PX)),
        center=center,
        radius=radius,
        outline=torch.full((COUNT,), OUTLINE_PX),
        outline_rgb=torch.zeros(COUNT, 3),
    )


def make_samples() -> list[tuple[Image.Image, str]]:
    """The sample pictures and their captions."""
    scenes = style_scenes()
    out = []
    for i, (height, width) in enumerate(SIZES):
        one = scenes.select(slice(i, i + 1))
        image = toyworld.render(one, height=height, width=width)[0]
        pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        text = toyworld.caption(one, 0)
        out.append((Image.fromarray(pixels), f"{text} in {TRIGGER} style"))
    return out


def main() -> None:
    """Write the samples as NN.png + NN.txt."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "style")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for i, (image, text) in enumerate(make_samples()):
        image.save(args.out / f"{i:02d}.png")
        (args.out / f"{i:02d}.txt").write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
