"""Strength schedules: an adapter acting over part of the steps (sdlora/lora/schedule.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import make_adapter_file
from diffusers import DDIMScheduler
from PIL import Image

from sdlora.bases.base import load_base
from sdlora.bases.generate import GenerateSettings, generate, png_info
from sdlora.errors import SdloraError
from sdlora.io.lora_spec import parse_lora_spec
from sdlora.lora.blend import Mixer
from sdlora.lora.prompt_tags import lora_windows, parse_parameters
from sdlora.lora.schedule import Window, parse_window

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "text, window, bounds",
    [
        ("start=0.5", Window(0.5, 1.0), (10, 20)),
        ("stop=0.25", Window(0.0, 0.25), (0, 5)),
        ("start=0.2,stop=0.8", Window(0.2, 0.8), (4, 16)),
        ("start=3:stop=10", Window(3, 10), (3, 10)),  # whole numbers count steps (LBW)
        ("stop=40", Window(0.0, 40), (0, 20)),
        ("start=1.0", Window(1.0, 1.0), None),  # stop must come after start
    ],
)
def test_windows_parse_to_step_bounds(text, window, bounds):
    if bounds is None:
        with pytest.raises(SdloraError, match="must come after"):
            parse_window(text)
        return
    assert parse_window(text) == window
    assert window.bounds(20) == bounds
    assert [window(i, 20) for i in range(20)] == [
        1.0 if bounds[0] <= i < bounds[1] else 0.0 for i in range(20)
    ]
    assert parse_window(window.text) == window


@pytest.mark.parametrize(
    "text, message",
    [
        ("begin=0.2", "not start="),
        ("start=1.5", "past the end"),
        ("start=-0.1", "fraction of the steps"),
        ("stop=abc", "fraction of the steps"),
    ],
)
def test_bad_windows_are_refused_naming_the_value(text, message):
    with pytest.raises(SdloraError, match=message):
        parse_window(text)


def test_the_lora_flag_and_the_prompt_tag_carry_the_window():
    spec = parse_lora_spec("a/ink.safetensors:0.8@start=0.2")
    assert (spec.path, spec.strength, spec.window, spec.blocks) == (
        "a/ink.safetensors",
        0.8,
        "start=0.2",
        None,
    )
    spec = parse_lora_spec("ink.safetensors:0.5@style@IN=0,OUT=1@start=0.1,stop=0.9")
    assert (spec.name, spec.blocks, spec.window) == ("style", "IN=0,OUT=1", "start=0.1,stop=0.9")
    assert lora_windows("a cat <lora:ink:0.8:lbw=IN=0:start=0.2:stop=10> <lora:b>") == {
        "ink": "start=0.2,stop=10"
    }
    with pytest.raises(SdloraError, match="<lora:ink:1:start=2.5>"):
        lora_windows("<lora:ink:1:start=2.5>")


def test_the_png_record_keeps_the_window_and_history_reads_it_back():
    settings = GenerateSettings(
        prompt="a cat",
        steps=20,
        guidance=2.0,
        adapters={"ink": 0.8},
        schedules={"ink": "start=0.5"},
    )
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=png_info(settings))
    parameters = Image.open(buffer).info["parameters"]
    assert "<lora:ink:0.8:start=0.5>" in parameters
    back = parse_parameters(parameters)
    assert back["adapters"] == {"ink": 0.8}
    assert back["schedules"] == {"ink": "start=0.5"}


def _recording(pipe):
    """Record every UNet call's (input, output) while the pipeline runs."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = pipe.unet.register_forward_hook(
        lambda module, args, output: calls.append((args[0].clone(), output[0].clone()))
    )
    return calls, handle


@pytest.fixture(scope="module")
def toy_mix(tmp_path_factory):
    path, _ = make_adapter_file(
        lambda: load_base("toy"), tmp_path_factory.mktemp("a") / "ink.safetensors", seed=3
    )
    pipe = load_base("toy")
    mixer = Mixer(pipe)
    mixer.add(path, name="ink", strength=1.0)
    return pipe, mixer


def _settings(**kw) -> GenerateSettings:
    return GenerateSettings(
        prompt="a red circle on the left", steps=10, guidance=2.0, seed=5, scheduler="ddim", **kw
    )


def test_start_half_draws_the_bases_latents_for_the_first_half(toy_mix):
    pipe, mixer = toy_mix
    mixer.set_strength("ink", 0.0)
    base_calls, handle = _recording(pipe)
    try:
        base_image = generate(pipe, _settings())[0]
    finally:
        handle.remove()
    mixer.set_strength("ink", 1.0)
    full_calls, handle = _recording(pipe)
    try:
        full_image = generate(pipe, _settings())[0]
    finally:
        handle.remove()
    calls, handle = _recording(pipe)
    try:
        image = generate(pipe, _settings(schedules={"ink": "start=0.5"}), mixer=mixer)[0]
    finally:
        handle.remove()
    assert len(calls) == 10
    for i in range(5):  # the first half: exactly the base model
        assert torch.equal(calls[i][0], base_calls[i][0])
        assert torch.equal(calls[i][1], base_calls[i][1])
    assert not torch.equal(calls[5][1], base_calls[5][1])  # then the adapter acts
    assert mixer.strengths() == {"ink": 1.0}  # the user's strength is back
    assert np.asarray(image).tolist() != np.asarray(base_image).tolist()
    assert np.asarray(image).tolist() != np.asarray(full_image).tolist()


def _hand_loop(pipe, mixer, settings, switch_at: int) -> Image.Image:
    """The denoising loop written out: base until `switch_at`, then the adapter at 1."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(settings.steps)

    def encode():
        pos, neg = pipe.encode_prompt([settings.prompt], "cpu", 1, True, None)
        return torch.cat([neg, pos])

    generator = torch.Generator().manual_seed(settings.seed)
    latents = torch.randn((1, 4, 8, 8), generator=generator) * scheduler.init_noise_sigma
    with torch.inference_mode():
        mixer.set_strength("ink", 0.0)
        embeds = encode()
        for i, t in enumerate(scheduler.timesteps):
            if i == switch_at:
                mixer.set_strength("ink", 1.0)
                embeds = encode()
            model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise = pipe.unet(model_in, t, encoder_hidden_states=embeds).sample
            uncond, cond = noise.chunk(2)
            noise = uncond + settings.guidance * (cond - uncond)
            latents = scheduler.step(noise, t, latents).prev_sample
        pixels = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    pixels = (pixels / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    return Image.fromarray((pixels * 255).round().astype(np.uint8))


def test_the_whole_image_equals_a_hand_run_loop_that_switches_at_that_step(toy_mix):
    pipe, mixer = toy_mix
    mixer.set_strength("ink", 1.0)
    settings = _settings(schedules={"ink": "start=0.3"})
    image = generate(pipe, settings, mixer=mixer)[0]
    hand = _hand_loop(pipe, mixer, settings, switch_at=3)
    mixer.set_strength("ink", 1.0)
    difference = np.abs(np.asarray(image, int) - np.asarray(hand, int))
    assert difference.max() <= 1  # 8-bit images of the same floats (rounding at most)
    # a function of the step does the same as its window
    again = generate(
        pipe, _settings(), mixer=mixer, schedules={"ink": lambda step, steps: float(step >= 3)}
    )[0]
    assert np.asarray(again).tolist() == np.asarray(image).tolist()


def test_a_schedule_without_the_mixer_or_for_an_unknown_adapter_is_refused(toy_mix):
    pipe, mixer = toy_mix
    with pytest.raises(SdloraError, match="pass the Mixer"):
        generate(pipe, _settings(schedules={"ink": "start=0.5"}))
    with pytest.raises(SdloraError, match="'ghost', which is not in the mix"):
        generate(pipe, _settings(schedules={"ghost": "start=0.5"}), mixer=mixer)
    assert mixer.strengths() == {"ink": 1.0}


def test_generate_command_takes_a_window_from_the_flag_and_the_tag(tmp_path, capsys):
    from sdlora.cli import main

    path, _ = make_adapter_file(lambda: load_base("toy"), tmp_path / "ink.safetensors", seed=3)
    common = ["generate", "--base", "toy", "--steps", "6", "--scheduler", "ddim", "--seed", "5"]
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    flag = f"{path}:0.9@start=0.5"
    assert main([*common, "--prompt", "a red circle", "--lora", flag, "--out", str(a)]) == 0
    tag = "a red circle <lora:ink:0.9:start=0.5>"
    assert main([*common, "--prompt", tag, "--lora", f"{path}:0.2", "--out", str(b)]) == 0
    assert np.asarray(Image.open(a)).tolist() == np.asarray(Image.open(b)).tolist()
    assert "<lora:ink:0.9:start=0.5>" in Image.open(a).info["parameters"]
    out = tmp_path / "x.safetensors"
    capsys.readouterr()
    export = ["export", "--base", "toy", "--lora", f"{path}@start=0.5", "--out", str(out)]
    assert main(export) == 2
    assert "leave the window out" in capsys.readouterr().err
    assert not out.exists()
