"""The README's LoRA recipe (samples/style.toml) on the toy base: strength moves pictures to the style.

Trains once per module with the recipe as it is (only checkpoints and TensorBoard logs are
turned off), about a minute on a 2-core CPU, then draws 8 prompts x 3 seeds at strengths 0, 0.5
and 1 and measures `toyworld.style_distance` (color histograms, 4 bins per channel).

The reference is the 12 sample pictures as the toy base's autoencoder draws them (encoded and
decoded once): that is the best an adapter can reach, since every picture is decoded by that
autoencoder, which blurs the 4-px checkerboard and the outlines and shifts their colors. Against
the raw samples the statistic cannot tell anything apart: the autoencoder's own round trip of the
samples scores as far from them as plain toy pictures do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import draw_toy
from PIL import Image

from sdlora.bases import toyworld
from sdlora.bases.base import load_base
from sdlora.io.formats import load_adapter
from sdlora.lora.blend import Mixer
from sdlora.train import load_config, train

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "samples" / "style.toml"
PROMPTS = [
    "a red circle in sks style",
    "a blue square in sks style",
    "a yellow star in sks style",
    "a green heart in sks style",
    "a purple triangle at the left in sks style",
    "a small white ring in sks style",
    "a big orange cross at the top in sks style",
    "a pink circle on the right in sks style",
]
SEEDS = (100, 101, 102)
STRENGTHS = (0.0, 0.5, 1.0)
BINS = 4


def draw(pipe) -> torch.Tensor:
    """(len(PROMPTS) * len(SEEDS), 3, 64, 64) in [0, 1]: each prompt at each seed, as the README."""
    prompts = [p for p in PROMPTS for _ in SEEDS]
    return draw_toy(pipe, prompts, [s for _ in PROMPTS for s in SEEDS])


def style_reference(pipe) -> torch.Tensor:
    """The sample pictures at 64 px, through the base's autoencoder (latent means, no noise)."""
    images = []
    for path in sorted((ROOT / "samples" / "style").glob("*.png")):
        image = Image.open(path).convert("RGB").resize((64, 64), Image.BICUBIC)
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    pixels = torch.stack(images).float() / 255
    with torch.inference_mode():
        latents = pipe.vae.encode(pixels * 2 - 1).latent_dist.mean
        return (pipe.vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("style")
    return train(load_config(RECIPE, output=str(out), save_every=0, tensorboard=False))


@pytest.fixture(scope="module")
def drawn(adapter) -> dict:
    """Pictures of the plain base and of the base with the adapter at each strength."""
    pipe = load_base("toy")
    result = {"base": draw(pipe), "reference": style_reference(pipe)}
    mixer = Mixer(pipe)
    mixer.add(adapter, name="style")
    for strength in STRENGTHS:
        mixer.set_strength("style", strength)
        result[strength] = draw(pipe)
    return result


def test_recipe_is_the_readme_one(adapter) -> None:
    config = load_config(RECIPE)
    assert (config.base, config.resolution, config.trigger) == ("toy", 64, "sks")
    assert Path(config.data_dir) == ROOT / "samples" / "style"
    assert adapter.name == "style.safetensors"
    assert load_adapter(adapter).modules  # a real, non-empty adapter file


def test_strength_zero_is_the_base(drawn) -> None:
    torch.testing.assert_close(drawn[0.0], drawn["base"], rtol=0, atol=0)


def test_strength_moves_pictures_toward_the_style(drawn) -> None:
    reference = drawn["reference"]
    distance = {s: toyworld.style_distance(drawn[s], reference, bins=BINS) for s in STRENGTHS}
    report = {s: round(d, 3) for s, d in distance.items()}
    assert distance[0.0] > 0.5, report  # the base is far from the style to begin with
    assert distance[0.5] < distance[0.0] - 0.15, report
    assert distance[1.0] < distance[0.5] - 0.08, report


def test_every_prompt_moves_toward_the_style(drawn) -> None:
    reference, n = drawn["reference"], len(SEEDS)

    def per_prompt(images: torch.Tensor) -> list[float]:
        return [
            toyworld.style_distance(images[i : i + n], reference, bins=BINS)
            for i in range(0, len(images), n)
        ]

    d0, d05, d1 = (per_prompt(drawn[s]) for s in STRENGTHS)
    rows = list(zip(PROMPTS, np.round(d0, 3), np.round(d05, 3), np.round(d1, 3), strict=True))
    assert all(b < a - 0.1 for a, b in zip(d0, d1, strict=True)), rows
    in_between = sum(c < b < a for a, b, c in zip(d0, d05, d1, strict=True))
    assert in_between >= len(PROMPTS) - 2, rows
