"""The toy world generator, the sample style and the pretrained `toy` base (CPU)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import draw_toy
from PIL import Image

from sdlora.bases import toyworld
from sdlora.bases.base import load_base
from sdlora.bases.tokenizer_files import WORDS
from sdlora.errors import SdloraError

ROOT = Path(__file__).resolve().parent.parent


def test_generator_is_deterministic() -> None:
    a, captions_a = toyworld.toy_batch(8, seed=3)
    b, captions_b = toyworld.toy_batch(8, seed=3)
    c, _ = toyworld.toy_batch(8, seed=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert captions_a == captions_b
    assert (a - c).abs().max() > 0.1
    assert a.shape == (8, 3, 64, 64) and 0 <= float(a.min()) and float(a.max()) <= 1


def test_captions_use_only_tokenizer_words() -> None:
    scenes = toyworld.sample_scenes(200, seed=0)
    rng = random.Random(0)
    words = set(WORDS)
    for i in range(200):
        assert set(toyworld.caption(scenes, i, rng).split()) <= words


def test_drawn_color_is_the_captioned_color() -> None:
    images, _ = toyworld.toy_batch(32, seed=1)
    scenes = toyworld.sample_scenes(32, seed=1)
    wanted = [list(toyworld.COLORS)[int(i)] for i in scenes.color]
    assert toyworld.dominant_shape_color(images) == wanted


def test_bad_sizes_raise() -> None:
    with pytest.raises(SdloraError):
        toyworld.sample_scenes(0, seed=0)
    with pytest.raises(SdloraError):
        toyworld.render(toyworld.sample_scenes(1, seed=0), height=4, width=4)


def test_samples_match_their_script() -> None:
    sys.path.insert(0, str(ROOT / "samples"))
    try:
        from make_samples import make_samples
    finally:
        sys.path.pop(0)
    made = make_samples()
    assert len(made) == 12
    for i, (image, text) in enumerate(made):
        stored = np.asarray(Image.open(ROOT / "samples" / "style" / f"{i:02d}.png").convert("RGB"))
        fresh = np.asarray(image)
        assert stored.shape == fresh.shape
        # Identical up to rare edge pixels where CPUs round differently.
        assert (np.abs(stored.astype(int) - fresh.astype(int)).max(axis=2) > 2).mean() < 0.005
        caption = (ROOT / "samples" / "style" / f"{i:02d}.txt").read_text().strip()
        assert caption == text and caption.endswith("in sks style")


def _style_reference() -> torch.Tensor:
    images = []
    for path in sorted((ROOT / "samples" / "style").glob("*.png")):
        image = Image.open(path).convert("RGB").resize((64, 64), Image.BICUBIC)
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    return torch.stack(images).float() / 255


def test_style_distance_orders_mixtures() -> None:
    style = _style_reference()
    toy, _ = toyworld.toy_batch(12, seed=5)
    far = toyworld.style_distance(toy, style)
    half = toyworld.style_distance(torch.cat([toy[:6], style[:6]]), style)
    assert toyworld.style_distance(style, style) == pytest.approx(0.0, abs=1e-6)
    assert 0 < half < far <= 1


def test_toy_base_draws_the_prompted_color() -> None:
    pipe = load_base("toy")
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    colors = list(toyworld.COLORS)
    prompts = [f"a {colors[i % 8]} {toyworld.SHAPES[i % 7]}" for i in range(12)]
    images = draw_toy(pipe, prompts, list(range(len(prompts))))
    found = toyworld.dominant_shape_color(images)
    hits = sum(f == p.split()[1] for f, p in zip(found, prompts, strict=True))
    assert hits / len(prompts) >= 0.8, list(zip(prompts, found, strict=True))
