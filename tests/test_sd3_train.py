"""Training and generating on SD 3.x (tiny-sd3): flow matching as the diffusers SD3 example does
it, the joint CLIP + T5 conditioning as the pipeline encodes prompts, with and without T5, and
trained adapters that load in diffusers with our outputs; MMDiT-X and plain (Large) blocks."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)
from PIL import Image, ImageDraw

from sdlora.bases.base import BUILTIN, load_base
from sdlora.bases.generate import GenerateSettings, generate
from sdlora.bases.pipelines import adaptable_models
from sdlora.bases.tiny import TRANSFORMER_SD3_CONFIG
from sdlora.errors import SdloraError
from sdlora.io.convert import convert_adapter
from sdlora.io.formats import load_adapter
from sdlora.train import TrainConfig
from sdlora.train.condition import Conditioning
from sdlora.train.data import derived_seed
from sdlora.train.loop import set_up, train
from sdlora.train.setup import base_resolution
from sdlora.train.step import (
    flow_density,
    flow_noisy,
    flow_sigmas,
    flow_weighting,
    training_scheduler,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# SD 3.5 Large's blocks in small: no second attention, no qk-norm
PLAIN_CONFIG = dict(TRANSFORMER_SD3_CONFIG, dual_attention_layers=(), qk_norm=None)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("circles")
    for i, color in enumerate(((200, 30, 30), (30, 30, 200))):
        img = Image.new("RGB", (96, 64), (245, 240, 230))
        ImageDraw.Draw(img).ellipse((10 + 20 * i, 10, 50 + 20 * i, 50), fill=color)
        img.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {'red' if i == 0 else 'blue'} circle", "utf-8")
    return folder


def settings(data: Path, output: Path, **kw) -> TrainConfig:
    values = dict(
        data_dir=str(data),
        base="tiny-sd3",
        output=str(output),
        resolution=64,
        batch_size=2,
        steps=3,
        lr=1e-2,
        save_every=0,
        tensorboard=False,
        workers=0,
        seed=3,
        mixed_precision="no",
    )
    return TrainConfig(**(values | kw))


def fixed_inputs(pipe) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    t = pipe.transformer.config
    ids = pipe.tokenizer(["a red circle"] * 2, padding="max_length", max_length=77,
                         return_tensors="pt").input_ids  # fmt: skip
    return dict(
        latents=torch.randn(2, 16, 8, 8, generator=g),
        context=torch.randn(2, 77 + 12, t.joint_attention_dim, generator=g),
        pooled=torch.randn(2, t.pooled_projection_dim, generator=g),
        timesteps=torch.tensor([30.0, 800.0]),
        ids=ids,
    )


def outputs(pipe, x) -> dict[str, torch.Tensor]:
    """Transformer and both CLIP encoders' outputs (hidden states and pooled) on fixed inputs."""
    with torch.no_grad():
        out = {
            "transformer": pipe.transformer(
                x["latents"], x["context"], x["pooled"], x["timesteps"]
            ).sample
        }
        for name in ("text_encoder", "text_encoder_2"):
            enc = getattr(pipe, name)(x["ids"], output_hidden_states=True)
            out[name] = torch.cat([enc.hidden_states[-2].flatten(1), enc[0]], 1)
    return out


def diffusers_file(path: Path, pipe, out: Path) -> Path:
    """Our adapter file in the diffusers/PEFT layout (`transformer.<path>.lora_A.weight`),
    which diffusers' SD3 loader reads (it converts no kohya-layout SD3 names)."""
    return convert_adapter(load_adapter(path), "diffusers", out, models=adaptable_models(pipe))


def check_loads_in_diffusers(pipe, path: Path, tmp_path: Path, plain: bool = False) -> None:
    """diffusers' load_lora_weights on a fresh copy of the base gives our trained pipeline's
    outputs; what the adapter leaves alone (text encoders of a transformer-only run) unchanged."""
    x = fixed_inputs(pipe)
    ours = outputs(pipe.to("cpu"), x)
    fresh = load_base("tiny-sd3")
    if plain:
        fresh.transformer = plain_transformer()
    theirs = StableDiffusion3Pipeline(**fresh.components)
    base = outputs(theirs, x)
    theirs.load_lora_weights(str(diffusers_file(path, theirs, tmp_path / "peft.safetensors")))
    loaded = outputs(theirs, x)
    trained = {k.split("_")[1] for k in load_adapter(path).modules}
    for name in ours:
        if {"transformer": "transformer", "text_encoder": "te", "text_encoder_2": "te2"}[
            name
        ] in trained:
            assert (ours[name] - base[name]).abs().max() > 1e-4, name  # the adapter changed it
        torch.testing.assert_close(loaded[name], ours[name], rtol=0, atol=1e-5, msg=name)


def plain_transformer() -> SD3Transformer2DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        return SD3Transformer2DModel(**PLAIN_CONFIG).eval().requires_grad_(False)


@pytest.mark.parametrize("t5", [True, False])
def test_trained_sd3_adapter_gives_our_outputs_in_diffusers(pictures, tmp_path, t5):
    assert "tiny-sd3" in BUILTIN
    pipe = load_base("tiny-sd3", t5=t5)
    assert (pipe.text_encoder_3 is not None) == t5
    config = settings(
        pictures, tmp_path / "out", train_text_encoder=True, text_encoder_lr=5e-3, no_t5=not t5
    )
    path = train(config, pipe=pipe)
    adapter = load_adapter(path)
    keys = set(adapter.modules)
    # both streams' attention, MMDiT-X's attn2, both CLIP encoders; never T5
    for name in ("attn_to_q", "attn_add_k_proj", "attn_to_add_out", "attn2_to_v"):
        assert any(k.startswith("lora_transformer_") and k.endswith(name) for k in keys), name
    assert {k.split("_")[1] for k in keys} == {"transformer", "te", "te2"}
    assert adapter.metadata["sdlora_family"] == "sd3"
    check_loads_in_diffusers(pipe, path, tmp_path)


def test_plain_blocks_train_and_load_in_diffusers(pictures, tmp_path):
    """SD 3.5 Large's blocks (no attn2, no qk-norm): the same run, the same agreement."""
    pipe = load_base("tiny-sd3")
    pipe.transformer = plain_transformer()
    assert pipe.transformer.transformer_blocks[0].attn2 is None
    config = settings(
        pictures, tmp_path / "out", targets="all", batch_size=1, validation_split=0.5,
        validate_every=3, sample_every=3, sample_steps=2,
    )  # fmt: skip
    path = train(config, pipe=pipe)
    assert (tmp_path / "out" / "samples" / "step-000003.png").is_file()  # sampled on the way
    keys = set(load_adapter(path).modules)
    assert not any("attn2" in k for k in keys)
    for name in ("ff_context_net_2", "norm1_context_linear", "attn_add_q_proj"):
        assert any(k.endswith(name) for k in keys), name
    check_loads_in_diffusers(pipe, path, tmp_path, plain=True)


@pytest.mark.parametrize("t5", [True, False])
def test_conditioning_is_the_pipelines_prompt_encoding(t5):
    pipe = load_base("tiny-sd3", t5=t5)
    captions = ["a red circle", "a blue square on a red circle"]
    text = Conditioning.of(pipe, t5_max_length=20).encode(captions, torch.device("cpu"))
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            captions, None, None, do_classifier_free_guidance=False, max_sequence_length=20
        )
    assert text.hidden.shape == (2, 77 + 20, pipe.transformer.config.joint_attention_dim)
    torch.testing.assert_close(text.hidden, embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(text.pooled, pooled, rtol=0, atol=1e-6)
    assert bool(text.hidden[:, 77:].abs().sum()) == t5  # without T5: zeros in its place


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform", "cosmap"])
def test_flow_density_and_weighting_are_diffusers(scheme):
    kw = dict(logit_mean=0.3, logit_std=0.8, mode_scale=1.1)
    ours = flow_density(scheme, 4096, torch.Generator().manual_seed(2), **kw)
    theirs = compute_density_for_timestep_sampling(
        scheme, 4096, generator=torch.Generator().manual_seed(2), **kw
    )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-7)
    assert 0 <= ours.min() and ours.max() <= 1
    sigmas = torch.linspace(0.01, 1, 50)
    weight = compute_loss_weighting_for_sd3(scheme, sigmas)
    torch.testing.assert_close(flow_weighting(scheme, sigmas), weight)
    torch.testing.assert_close(
        flow_weighting("sigma_sqrt", sigmas), compute_loss_weighting_for_sd3("sigma_sqrt", sigmas)
    )
    # the formulas themselves
    if scheme == "cosmap":
        expected = 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
        torch.testing.assert_close(flow_weighting(scheme, sigmas), expected)
    if scheme == "logit_normal":
        n = torch.normal(0.3, 0.8, (4096,), generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(ours, torch.sigmoid(n))


@pytest.mark.parametrize("scheme", ["logit_normal", "cosmap"])
def test_flow_matching_step_noisy_input_target_and_weighting(pictures, tmp_path, scheme):
    """One training step on tiny-sd3: the transformer sees x_t = (1-σ)·x0 + σ·ε at timestep
    σ·1000 with σ drawn as diffusers draws it (shift 3), and the loss is the weighted mean
    squared error of its prediction against ε - x0."""
    config = settings(pictures, tmp_path / "out", batch_size=2, weighting_scheme=scheme)
    run = set_up(config, None, None)
    step = run.train_step
    seen = {}

    def record(module, args, kwargs, output):
        seen.update(noisy=args[0].detach().clone(), timestep=kwargs["timestep"].clone())
        seen["pred"] = output.sample.detach().clone()

    transformer = run.models.pipe.transformer
    handle = transformer.register_forward_hook(record, with_kwargs=True)
    batch = next(iter(run.loader))
    loss = step(batch, 0)
    handle.remove()
    # the draws, repeated: noise then u from the step's generator
    latents = step.latent_cache.get(batch["indices"], torch.device("cpu"))
    g = torch.Generator().manual_seed(derived_seed(config.seed, "noise", 0, 0))
    noise = torch.randn(latents.shape, generator=g)
    u = compute_density_for_timestep_sampling(scheme, 2, 0.0, 1.0, 1.29, generator=g)
    scheduler = training_scheduler(run.models.pipe)
    assert scheduler.config.shift == 3.0
    index = (u * 1000).long()
    timesteps, sigmas = scheduler.timesteps[index], scheduler.sigmas[index]
    # σ is the shifted schedule: shift·s / (1 + (shift-1)·s), s = t_unshifted / 1000
    s = (1000 - index).float() / 1000
    torch.testing.assert_close(sigmas, 3 * s / (1 + 2 * s))
    torch.testing.assert_close(seen["timestep"], timesteps)
    torch.testing.assert_close(seen["timestep"], sigmas * 1000)
    x_t = (1 - sigmas.view(-1, 1, 1, 1)) * latents + sigmas.view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(seen["noisy"], x_t, rtol=0, atol=1e-6)
    torch.testing.assert_close(flow_noisy(latents, noise, sigmas), x_t, rtol=0, atol=1e-6)
    weight = compute_loss_weighting_for_sd3(scheme, sigmas).view(-1, 1, 1, 1)
    target = noise - latents
    expected = (weight * (seen["pred"] - target) ** 2).reshape(2, -1).mean(1).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # the step's own draw of (timesteps, σ) is the same
    g = torch.Generator().manual_seed(derived_seed(config.seed, "noise", 0, 0))
    torch.randn(latents.shape, generator=g)
    t2, s2 = flow_sigmas(config, scheduler.timesteps, scheduler.sigmas, 2, g)
    torch.testing.assert_close((t2, s2), (timesteps, sigmas))


def test_sd3_resume_ends_where_a_straight_run_ends(pictures, tmp_path):
    straight = settings(pictures, tmp_path / "straight", steps=4, save_every=2, batch_size=1)
    first = train(straight)
    kept = tmp_path / "straight.safetensors"
    shutil.copy(first, kept)
    first.unlink()
    shutil.rmtree(tmp_path / "straight" / "checkpoints" / "step-000004")
    resumed = train(TrainConfig(**(vars(straight) | {"resume": "latest"})))
    a, b = load_adapter(resumed), load_adapter(kept)
    assert a.modules.keys() == b.modules.keys()
    for key in a.modules:
        torch.testing.assert_close(a.modules[key].down, b.modules[key].down, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.modules[key].up, b.modules[key].up, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("base", "kw", "setting"),
    [
        ("tiny-sd3", {"min_snr_gamma": 5.0}, "min_snr_gamma"),
        ("tiny-sd3", {"prediction_type": "epsilon"}, "prediction_type"),
        ("tiny-sd3", {"loss_type": "huber"}, "huber_schedule"),
        ("tiny", {"weighting_scheme": "cosmap"}, "weighting_scheme"),
        ("tiny", {"t5_max_length": 256}, "t5_max_length"),
        ("tiny", {"no_t5": True}, "no_t5"),
    ],
)
def test_settings_of_the_other_objective_are_refused(pictures, tmp_path, base, kw, setting):
    with pytest.raises(SdloraError) as err:
        train(settings(pictures, tmp_path / "out", base=base, steps=1, **kw))
    assert err.value.setting == setting


def test_generate_runs_flow_matching_at_the_familys_settings():
    pipe = load_base("tiny-sd3")
    s = GenerateSettings(prompt="a red circle", width=64, height=64, steps=2)
    image = generate(pipe, s)[0]
    assert image.size == (64, 64)
    assert s.scheduler == "flow_euler" and s.guidance == 4.5  # SD 3.5's card
    with pytest.raises(SdloraError, match="flow_euler") as err:
        generate(pipe, GenerateSettings(prompt="a", width=64, height=64, steps=2, scheduler="ddim"))
    assert err.value.setting == "scheduler"
    with pytest.raises(SdloraError) as err:
        generate(pipe, GenerateSettings(prompt="a", width=72, height=64, steps=2))
    assert err.value.setting == "width"  # not a multiple of 8 × the 2-pixel patch


def test_a_diffusers_folder_loads_as_sd3_with_or_without_t5(tmp_path):
    load_base("tiny-sd3").save_pretrained(tmp_path / "sd3")
    pipe = load_base(str(tmp_path / "sd3"))
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.text_encoder_3 is not None
    assert load_base(str(tmp_path / "sd3"), t5=False).text_encoder_3 is None
    # --resolution's default from the transformer's config, read without loading the model
    config = TrainConfig(data_dir="d", output="o", base=str(tmp_path / "sd3"))
    assert base_resolution(config) == 64 == base_resolution(config, pipe)


def test_captions_longer_than_t5_max_length_are_named(pictures, tmp_path, caplog, monkeypatch):
    import logging

    from sdlora.train import models as models_module

    class Injecting(Exception):
        pass

    def stop(*args, **kwargs):
        raise Injecting

    data = tmp_path / "data"
    shutil.copytree(pictures, data)
    (data / "1.txt").write_text("a blue circle " * 10, "utf-8")  # 30 words: 31 T5 tokens
    monkeypatch.setattr(models_module, "add_trainable", stop)  # the step after the warnings
    caplog.set_level(logging.INFO, logger="sdlora.train")
    with pytest.raises(Injecting):
        train(settings(data, tmp_path / "out", t5_max_length=20))
    assert "1 caption(s) are longer than T5's 20 tokens" in caplog.text
    assert "(first: 1.png, 31 tokens)" in caplog.text
