"""SDXL: the built-in tiny-xl, bases from a folder, a Hub id and an SGM single file, the mixer,
adapter files in kohya's SDXL layout that diffusers reads as we do, and exports."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from sdlora.base import load_base
from sdlora.blend import Mixer
from sdlora.cli import main
from sdlora.families import SDXL, family_of_pipeline, width_label
from sdlora.recommend import recommended
from sdlora.single_file import save_pipeline_single_file

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tiny_xl():
    return load_base("tiny-xl")


@pytest.fixture(scope="module")
def xl_inputs(inputs):
    """UNet inputs as SDXL takes them (80-wide context, pooled 48-wide text, six time ids)."""
    g = torch.Generator().manual_seed(7)
    return dict(
        inputs,
        hidden=torch.randn(2, 77, 80, generator=g),
        text_embeds=torch.randn(2, 48, generator=g),
        time_ids=torch.tensor(
            [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [96.0, 80.0, 8.0, 0.0, 64.0, 64.0]]
        ),
    )


def run_unet(pipe, x) -> torch.Tensor:
    extra = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
    with torch.no_grad():
        return pipe.unet(x["latents"], x["timesteps"], x["hidden"], added_cond_kwargs=extra).sample


def run_text(pipe, x) -> torch.Tensor:
    with torch.no_grad():
        return pipe.text_encoder(x["ids"])[0]


def run_text_2(pipe, x) -> torch.Tensor:
    """The second encoder's penultimate hidden states and pooled projection, side by side."""
    with torch.no_grad():
        out = pipe.text_encoder_2(x["ids"], output_hidden_states=True)
    return torch.cat([out.hidden_states[-2].flatten(1), out.text_embeds], dim=1)


RUNS = (run_unet, run_text, run_text_2)


def assert_same_outputs(a, b, x, atol=1e-5):
    for run in RUNS:
        torch.testing.assert_close(run(a, x), run(b, x), atol=atol, rtol=0, msg=run.__name__)


def draw(pipe, seed=0) -> torch.Tensor:
    with torch.inference_mode():
        return pipe(
            "a red circle",
            num_inference_steps=2,
            output_type="pt",
            generator=torch.Generator().manual_seed(seed),
        ).images


def test_tiny_xl_is_sdxl_shaped():
    pipe = tiny_xl()
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert family_of_pipeline(pipe) is SDXL
    te1, te2, unet = pipe.text_encoder.config, pipe.text_encoder_2.config, pipe.unet.config
    assert (te1.hidden_size, te2.hidden_size, unet.cross_attention_dim) == (32, 48, 80)
    assert (te1.hidden_act, te2.hidden_act) == ("quick_gelu", "gelu")
    assert unet.addition_embed_type == "text_time"
    assert unet.projection_class_embeddings_input_dim == 6 * 8 + te2.projection_dim
    assert width_label(80) == "SDXL (tiny-xl, sdlora built-in)"
    assert width_label(2048) == "SDXL"
    rec = recommended(pipe)
    assert (rec.guidance, rec.steps, rec.size) == (5.0, 30, 64)
    again = tiny_xl()
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        mine, theirs = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in mine.items()), name


def test_tiny_xl_draws_and_the_time_ids_matter(xl_inputs):
    pipe = tiny_xl()
    image = draw(pipe)
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    other = dict(xl_inputs, time_ids=xl_inputs["time_ids"].flip(0))
    assert (run_unet(pipe, xl_inputs) - run_unet(pipe, other)).abs().max() > 1e-4


@pytest.fixture(scope="module")
def xl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl") / "tiny-xl"
    tiny_xl().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def xl_file(tmp_path_factory):
    return save_pipeline_single_file(
        tiny_xl(), tmp_path_factory.mktemp("xlfile") / "tiny-xl.safetensors", dtype="fp32"
    )


def test_folder_and_single_file_load_as_sdxl(xl_folder, xl_file, xl_inputs):
    want = tiny_xl()
    for pipe in (
        load_base(str(xl_folder)),
        load_base(str(xl_file)),  # no config: recognised as tiny-xl by its shapes
        load_base(str(xl_file), config=xl_folder),
    ):
        assert isinstance(pipe, StableDiffusionXLPipeline)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            got, mine = getattr(pipe, name).state_dict(), getattr(want, name).state_dict()
            assert got.keys() == mine.keys(), name
            assert all(torch.equal(got[k], v) for k, v in mine.items()), name
    assert_same_outputs(load_base(str(xl_file)), want, xl_inputs, atol=0)


def test_cached_hub_id_loads_offline_as_sdxl(tmp_path, monkeypatch, xl_inputs):
    repo = tmp_path / "hf" / "hub" / "models--sdlora-test--tiny-xl"
    tiny_xl().save_pretrained(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_base("sdlora-test/tiny-xl")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert_same_outputs(pipe, tiny_xl(), xl_inputs, atol=0)


def make_xl_adapter(path, **kwargs):
    """A random rank-4 adapter on tiny-xl's UNet and both text encoders, saved at `path`."""
    from sdlora.files import save_adapter
    from sdlora.inject import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_trainable, collect_adapter

    pipe = tiny_xl()
    g = torch.Generator().manual_seed(kwargs.get("seed", 0))
    injected = add_trainable(pipe.unet, "unet", UNET_TARGETS["attn"], 4, 8.0, generator=g)
    for comp in ("text_encoder", "text_encoder_2"):
        model = getattr(pipe, comp)
        injected.update(add_trainable(model, comp, TEXT_ENCODER_TARGETS["attn"], 4, generator=g))
    for weights in injected.values():
        with torch.no_grad():
            weights.up.normal_(0.0, 0.2, generator=g)
    save_adapter(collect_adapter(injected), path, overwrite=True)
    return path, pipe


def test_mixer_on_tiny_xl_equals_the_trained_adapter(tmp_path, xl_inputs):
    path, trained = make_xl_adapter(tmp_path / "xl.safetensors")
    pipe = tiny_xl()
    mixer = Mixer(pipe)
    mixer.add(path)
    assert mixer.describe()[0]["modules"] == {"unet": 136, "text_encoder": 8, "text_encoder_2": 8}
    base = tiny_xl()
    for run in RUNS:
        assert (run(pipe, xl_inputs) - run(base, xl_inputs)).abs().max() > 1e-4, run.__name__
    assert_same_outputs(pipe, trained, xl_inputs)
    torch.testing.assert_close(draw(pipe), draw(trained), atol=1e-5, rtol=0)
    mixer.set_strength("xl", 0.0)
    assert_same_outputs(pipe, base, xl_inputs)


def test_generate_cli_on_tiny_xl(tmp_path):
    import json

    path, _ = make_xl_adapter(tmp_path / "xl.safetensors")
    out = tmp_path / "xl.png"
    argv = ["generate", "--base", "tiny-xl", "--prompt", "a red circle", "--steps", "2"]
    assert main([*argv, "--out", str(out), "--device", "cpu", "--lora", str(path)]) == 0
    image = Image.open(out)
    assert image.size == (64, 64)
    assert json.loads(image.text["sdlora"])["guidance"] == 5.0
