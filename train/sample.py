"""Sample images during training: each prompt once, with a fixed seed, as one PNG grid."""

from __future__ import annotations

import torch
from PIL import Image

from sdlora.bases.recommend import recommended


def sample_grid(
    pipe,
    prompts: list[str],
    seed: int,
    steps: int | None,
    width: int,
    height: int,
    columns: int = 4,
    guidance: float | None = None,
) -> Image.Image:
    """Generate one image per prompt (seed, seed+1, ...) and tile them, `columns` per row.

    Steps and guidance left at None are the base's recommendation (`sdlora.bases.recommend`).
    """
    rec = recommended(pipe)
    steps = rec.steps if steps is None else steps
    guidance = rec.guidance if guidance is None else guidance
    images = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator(pipe.device).manual_seed(seed + i)
        result = pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            generator=generator,
            output_type="pil",
        )
        images.append(result.images[0])
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid
