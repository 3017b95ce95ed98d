"""Each base's recommended settings fill in what the user did not choose (issue 12)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.bases import toyworld
from sdlora.bases.base import load_base
from sdlora.bases.generate import GenerateSettings, generate
from sdlora.bases.recommend import Recommended, recommended
from sdlora.cli import main
from sdlora.train.sample import sample_grid

COLOR_PROMPTS = ["a red circle", "a blue square", "a green star", "a yellow heart"]


@pytest.fixture(scope="module")
def toy():
    return load_base("toy")


def _pixels(paths) -> torch.Tensor:
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255 for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def _record(path) -> dict:
    return json.loads(Image.open(path).text["sdlora"])


def test_builtin_bases_carry_their_recommendation(toy, tiny):
    assert recommended(toy) == Recommended(guidance=2.0, steps=20, size=64)
    assert recommended(tiny) == Recommended(guidance=7.5, steps=25, size=64)


def test_cli_generate_on_toy_draws_the_prompted_color_by_default(tmp_path, capsys):
    """No --guidance/--steps: the toy base's 2 and 20, and the prompt's colour wins."""
    hits, drawn = 0, []
    for prompt in COLOR_PROMPTS:
        out = tmp_path / f"{prompt.split()[1]}.png"
        args = ["generate", "--prompt", prompt, "--out", str(out), "--num-images", "2"]
        assert main([*args, "--device", "cpu"]) == 0
        paths = [out.with_name(f"{out.stem}-{i}.png") for i in range(2)]
        assert all(_record(p)["guidance"] == 2.0 and _record(p)["steps"] == 20 for p in paths)
        assert "Steps: 20, Sampler: pndm, CFG scale: 2.0" in Image.open(paths[0]).text["parameters"]
        found = toyworld.dominant_shape_color(_pixels(paths))
        drawn += [(prompt, f) for f in found]
        hits += sum(f == prompt.split()[1] for f in found)
    assert hits / len(drawn) >= 0.75, drawn


def test_api_fills_in_the_recommendation(toy):
    settings = GenerateSettings(prompt="a red circle", num_images=3, seed=10)
    assert settings.guidance is None and settings.steps is None
    images = generate(toy, settings)
    assert (settings.guidance, settings.steps) == (2.0, 20)
    pixels = torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32) / 255) for i in images])
    found = toyworld.dominant_shape_color(pixels.permute(0, 3, 1, 2))
    assert found.count("red") >= 2, found


def test_explicit_guidance_and_steps_override(toy, tmp_path, capsys):
    out = tmp_path / "x.png"
    args = ["generate", "--prompt", "a red circle", "--out", str(out), "--device", "cpu"]
    assert main([*args, "--guidance", "7.5", "--steps", "2"]) == 0
    record = _record(out)
    assert (record["guidance"], record["steps"]) == (7.5, 2)
    explicit = generate(toy, GenerateSettings(prompt="a red circle", guidance=7.5, steps=2))
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(explicit[0]))
    # guidance alone: steps still from the base
    assert main([*args, "--guidance", "3", "--overwrite"]) == 0
    assert (_record(out)["guidance"], _record(out)["steps"]) == (3.0, 20)


def test_folder_base_gets_sd_defaults(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "folder")
    pipe = load_base(str(tmp_path / "folder"))
    assert recommended(pipe) == Recommended(guidance=7.5, steps=25, size=64)
    settings = GenerateSettings(prompt="x")
    generate(pipe, settings)
    assert (settings.guidance, settings.steps) == (7.5, 25)
    assert pipe.scheduler.num_inference_steps == 25


class _FakePipe:
    """Records what sample_grid asks for; draws 8 px grey squares."""

    device = torch.device("cpu")

    def __init__(self, rec: Recommended) -> None:
        self.sdlora_recommended = rec
        self.calls: list[dict] = []

    def __call__(self, prompt, **kwargs):
        self.calls.append(kwargs)
        return type("Result", (), {"images": [Image.new("RGB", (8, 8), "grey")]})()


def test_training_samples_use_the_recommendation_unless_given():
    pipe = _FakePipe(Recommended(guidance=2.0, steps=20, size=64))
    sample_grid(pipe, ["a", "b"], seed=0, steps=None, width=8, height=8)
    assert [(c["guidance_scale"], c["num_inference_steps"]) for c in pipe.calls] == [(2.0, 20)] * 2
    pipe.calls.clear()
    sample_grid(pipe, ["a"], seed=0, steps=3, width=8, height=8, guidance=5.0)
    assert (pipe.calls[0]["guidance_scale"], pipe.calls[0]["num_inference_steps"]) == (5.0, 3)


def _ui_values(app) -> dict:
    """Starting values of the app's components that have an elem_id."""
    blocks = app.blocks.values()
    return {b.elem_id: getattr(b, "value", None) for b in blocks if getattr(b, "elem_id", None)}


def test_web_ui_starts_at_the_base_recommendation(tmp_path):
    from sdlora.ui.app import build_app

    folders = [tmp_path / name for name in ("adapters", "datasets", "outputs")]
    toy_ui = _ui_values(build_app("toy", *folders, device="cpu"))
    assert (toy_ui["steps"], toy_ui["guidance"]) == (20, 2.0)
    assert (toy_ui["resolution"], toy_ui["batch-size"], toy_ui["train-lr"]) == (64, 4, 1e-3)
    # a model folder (not loaded to build the page) starts at the Stable Diffusion values
    sd_ui = _ui_values(build_app(str(tmp_path / "some-sd-model"), *folders, device="cpu"))
    assert (sd_ui["steps"], sd_ui["guidance"]) == (25, 7.5)
    assert (sd_ui["resolution"], sd_ui["batch-size"], sd_ui["train-lr"]) == (512, 1, 1e-4)


def test_web_ui_api_defaults_to_the_base_recommendation(tmp_path):
    from sdlora.ui import handlers as h

    settings = h.make_settings("a red circle")
    assert settings.steps is None and settings.guidance is None  # filled in from the base
    ctx = h.Context("toy", tmp_path / "a", tmp_path / "d", tmp_path / "o")
    (path,) = h.run_generate(ctx, "toy", {}, settings)
    record = _record(path)
    assert (record["steps"], record["guidance"]) == (20, 2.0)
