"""The fast loop (sdlora/bases/fast_sample.py): the pipeline's images from our own loop, the
compiled path equal to the eager one through every change of the mix, and no stale replay.

On the CPU the UNet's regions compile with the "eager" backend: dynamo traces and guards them
exactly as it does for inductor (what a strength change recompiles, which module structure a
graph was traced for) but runs the traced graphs with PyTorch's own kernels, so these tests take
seconds instead of the minutes inductor's CPU kernels would. There is no CUDA graph on the CPU:
`StepGraph` keeps the step as it is, and its refusal of a stale replay is what is tested.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_adapter_file
from diffusers import EulerAncestralDiscreteScheduler
from torch._dynamo.utils import counters

from sdlora.bases import fast_sample
from sdlora.bases.base import load_base
from sdlora.bases.generate import SCHEDULERS, GenerateSettings, generate
from sdlora.errors import SdloraError
from sdlora.lora.blend import Mixer

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6
# our loop sums the same fp32 terms in another order than the scheduler's step: pixels (in
# [0, 1]) agree to 1e-4 (measured: about 1e-6 on the tiny bases)
PIXELS = dict(rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    linear, _ = make_adapter_file(lambda: load_base("tiny"), root / "linear.safetensors", seed=1)
    relu, _ = make_adapter_file(
        lambda: load_base("tiny"), root / "relu.safetensors", nonlinearity="relu", seed=2
    )
    return {"linear": linear, "relu": relu}


@pytest.fixture
def eager_backend(monkeypatch):
    monkeypatch.setattr(fast_sample, "COMPILE_BACKEND", "eager")


def request(pipe, count: int = 1, guidance: float = 2.0) -> fast_sample.Request:
    noise = torch.randn((count, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    return fast_sample.Request(noise, "a red circle", "", guidance, 64, 64)


def draw(pipe, compile: bool, req=None) -> np.ndarray:
    req = req or request(pipe)
    return fast_sample.sampler_for(pipe).sample(req, pipe.scheduler, STEPS, compile)


@pytest.mark.parametrize(
    "base,scheduler",
    [("tiny", "pndm"), ("tiny", "euler"), ("tiny", "dpm++"), ("tiny-xl", "pndm")],
)
def test_our_loop_draws_the_pipelines_image(base, scheduler):
    pipe = load_base(base)
    pipe.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
    req = request(pipe, count=2)
    with torch.inference_mode():
        expected = pipe(
            prompt=[req.prompt] * 2,
            num_inference_steps=STEPS,
            guidance_scale=req.guidance,
            width=64,
            height=64,
            latents=req.noise.clone(),
            output_type="np",
        ).images
    got = draw(pipe, compile=False, req=req)
    np.testing.assert_allclose(got, expected, **PIXELS)
    assert np.abs(got[0] - got[1]).max() > 1e-2  # two images, two seeds: not one image twice


def test_unguided_calls_are_drawn_as_the_pipeline_draws_them():
    """At guidance ≤ 1 the pipeline runs no unconditional half; neither does our loop."""
    pipe = load_base("tiny")
    req = request(pipe, guidance=1.0)
    with torch.inference_mode():
        expected = pipe(
            prompt=req.prompt,
            num_inference_steps=STEPS,
            guidance_scale=1.0,
            width=64,
            height=64,
            latents=req.noise.clone(),
            output_type="np",
        ).images
    np.testing.assert_allclose(draw(pipe, compile=False, req=req), expected, **PIXELS)


def test_a_sampler_that_draws_noise_is_left_to_the_pipeline():
    pipe = load_base("tiny")
    assert fast_sample.linear_schedule(pipe.scheduler, STEPS) is not None
    ancestral = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    assert fast_sample.linear_schedule(ancestral, STEPS) is None
    sampler = fast_sample.sampler_for(pipe)
    assert not sampler.supports(ancestral, STEPS)
    # generate: auto quietly keeps the pipeline, on says why it cannot
    settings = dict(prompt="a red circle", steps=2, scheduler="euler_a")
    assert generate(pipe, GenerateSettings(**settings, compile="auto"))
    with pytest.raises(SdloraError) as err:
        generate(pipe, GenerateSettings(**settings, compile="on"))
    assert err.value.setting == "compile"


def test_compiled_equals_eager_through_every_change_of_the_mix(files, eager_backend):
    """One compiled pipeline and one eager pipeline take the same mix changes; after each the
    images agree, the image moved (so the comparison can fail), and a fused strength change
    neither records the step again nor compiles anything."""
    fast, eager = load_base("tiny"), load_base("tiny")
    mixers = Mixer(fast), Mixer(eager)
    sampler = fast_sample.sampler_for(fast)
    previous = None

    def check(change, recorded: int | None = None):
        nonlocal previous
        for mixer in mixers:
            change(mixer)
        frames = counters["stats"]["unique_graphs"]
        before = sampler.recorded
        got = draw(fast, compile=True)
        np.testing.assert_allclose(got, draw(eager, compile=False), **PIXELS)
        if previous is not None:
            assert np.abs(got - previous).max() > 1e-3, "the change changed nothing"
        if recorded is not None:
            assert sampler.recorded - before == recorded
        previous = got
        return counters["stats"]["unique_graphs"] - frames

    check(lambda m: None)
    check(lambda m: m.add(files["linear"], name="linear", strength=0.8), recorded=1)
    # a fused strength change: weights written in place, the same graph, nothing compiled
    assert check(lambda m: m.set_strength("linear", -0.6), recorded=0) == 0
    check(lambda m: m.add(files["relu"], name="relu", strength=0.9), recorded=1)
    check(lambda m: m.set_strength("relu", 0.4), recorded=1)  # its stack is rebuilt
    assert check(lambda m: m.set_strength("linear", 1.1), recorded=0) == 0
    check(lambda m: m.remove("linear"), recorded=1)
    check(lambda m: m.set_fused("relu", False) or m.remove("relu"), recorded=1)


@pytest.mark.parametrize(
    "change",
    [
        "add a fused adapter",
        "add a nonlinear adapter",
        "remove an adapter",
        "unfuse an adapter",
        "move an unfused strength",
        "switch an unfused adapter off",
    ],
)
def test_a_graph_recorded_before_a_change_refuses_to_replay(files, change):
    """Each change a recorded step cannot follow bumps the Mixer's version: the old graph
    refuses to replay, and the next image is recorded again and equals a fresh pipeline's."""
    pipe = load_base("tiny")
    mixer = Mixer(pipe)
    if change != "add a fused adapter":
        mixer.add(files["linear"], name="linear", strength=0.7)
    if change in ("move an unfused strength", "switch an unfused adapter off"):
        mixer.add(files["relu"], name="relu", strength=0.7)
    before = draw(pipe, compile=False)
    sampler = fast_sample.sampler_for(pipe)
    graph, recorded = sampler.graph, sampler.recorded
    with torch.inference_mode():
        sampler.buffers["k"].zero_()  # back to the first step
    graph.replay()  # current: it replays
    {
        "add a fused adapter": lambda: mixer.add(files["linear"], name="linear", strength=0.7),
        "add a nonlinear adapter": lambda: mixer.add(files["relu"], name="relu", strength=0.7),
        "remove an adapter": lambda: mixer.remove("linear"),
        "unfuse an adapter": lambda: mixer.set_fused("linear", False),
        "move an unfused strength": lambda: mixer.set_strength("relu", -0.5),
        "switch an unfused adapter off": lambda: mixer.enable("relu", False),
    }[change]()
    assert graph.stale
    with pytest.raises(SdloraError, match="stale"):
        graph.replay()
    after = draw(pipe, compile=False)
    assert sampler.recorded == recorded + 1 and sampler.graph is not graph
    reference = load_base("tiny")
    fresh = Mixer(reference)
    for name, entry in mixer.entries.items():
        fresh.add(files[name], name=name, strength=entry.strength, fuse=entry.fused)
        fresh.enable(name, entry.enabled)
    np.testing.assert_allclose(after, draw(reference, compile=False), **PIXELS)
    if change != "unfuse an adapter":  # the same image, only computed another way
        assert np.abs(after - before).max() > 1e-3


def test_a_fused_strength_change_keeps_the_graph(files):
    pipe = load_base("tiny")
    mixer = Mixer(pipe)
    mixer.add(files["linear"], name="linear", strength=0.7)
    draw(pipe, compile=False)
    graph = fast_sample.sampler_for(pipe).graph
    for strength in (0.0, -1.0, 2.5):
        mixer.set_strength(strength=strength, name="linear")
        mixer.enable("linear", strength > 0)
        assert not graph.stale
    with torch.inference_mode():
        fast_sample.sampler_for(pipe).buffers["k"].zero_()
    graph.replay()


def test_shapes_are_part_of_the_key():
    """Another batch, size, step count or guided-ness records a new step over new buffers."""
    pipe = load_base("tiny")
    sampler = fast_sample.sampler_for(pipe)
    draw(pipe, compile=False)
    for req, steps in (
        (request(pipe, count=2), STEPS),
        (request(pipe, guidance=1.0), STEPS),
        (request(pipe), STEPS + 1),
    ):
        recorded = sampler.recorded
        sampler.sample(req, pipe.scheduler, steps, compile=False)
        assert sampler.recorded == recorded + 1


def test_generate_compile_option(files, eager_backend):
    """compile on draws the images compile off (the pipeline, the layers' own forward) draws,
    bare and with a linear and a nonlinear adapter in the mix."""
    pipe = load_base("tiny")
    settings = dict(prompt="a red circle", steps=3, num_images=2)
    mixer = Mixer(pipe)
    for recorded, mix in enumerate(([], ["linear", "relu"]), start=1):
        for name in mix:
            mixer.add(files[name], name=name, strength=0.8)
        off = generate(pipe, GenerateSettings(**settings, compile="off"))
        assert fast_sample.sampler_for(pipe).recorded == recorded - 1  # off: the pipeline's
        on = generate(pipe, GenerateSettings(**settings, compile="on"))
        assert fast_sample.sampler_for(pipe).recorded == recorded
        for a, b in zip(off, on, strict=True):  # 8-bit pixels: at most one level apart
            assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    with pytest.raises(SdloraError) as err:
        generate(pipe, GenerateSettings(**settings, compile="fast"))
    assert err.value.setting == "compile" and "auto, on, off" in str(err.value)


def test_auto_compiles_on_a_gpu_for_enough_images():
    use = fast_sample.use_compile
    many = fast_sample.BREAK_EVEN_IMAGES
    assert not use("auto", "cpu", 10_000)  # no GPU: never
    assert use("auto", "cuda", many) and not use("auto", "cuda", many - 1)
    assert use("on", "cpu", 1) and not use("off", "cuda", 10_000)
    pipe = load_base("tiny")
    fast_sample.expect_images(pipe, fast_sample.UI_IMAGES)  # the web UI's engine says this
    assert fast_sample.sampler_for(pipe).expected_images == fast_sample.UI_IMAGES


def test_generate_help_states_the_break_even(capsys):
    from sdlora.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"for {fast_sample.BREAK_EVEN_IMAGES} images or more" in text


def test_a_block_with_a_nonlinear_adapter_compiles_whole_when_settled(files):
    """Settled, a block's unfused relu layers trace as plain code: one graph, no break (so the
    compiler may put σ into the down matmul's kernel); outside the block the layers' own
    forward is back and gives the same output."""
    from sdlora.lora.layer import LoRALayer

    pipe = load_base("tiny")
    Mixer(pipe).add(files["relu"], name="relu", strength=0.8)
    block = next(m for m in pipe.unet.modules() if type(m).__name__ == "BasicTransformerBlock")
    assert any(isinstance(m, LoRALayer) and m.fused != set(m.adapters) for m in block.modules())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, block.norm1.normalized_shape[0], generator=g)
    text = torch.randn(2, 77, 32, generator=g)
    sampler = fast_sample.sampler_for(pipe)
    with torch.inference_mode():
        own = block(x, encoder_hidden_states=text)
        with sampler.settled_layers():
            settled = block(x, encoder_hidden_states=text)
            explained = torch._dynamo.explain(block)(x, encoder_hidden_states=text)
        again = block(x, encoder_hidden_states=text)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    torch.testing.assert_close(settled, own, rtol=1e-5, atol=1e-6)
    assert torch.equal(again, own)
    assert not any("forward" in vars(m) for m in pipe.unet.modules())  # all put back
