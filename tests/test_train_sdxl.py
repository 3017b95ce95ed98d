"""Training on SDXL and SD 2.x bases (tiny-xl, tiny-v2): SDXL's conditioning reaches the UNet as
diffusers builds it, trained adapters load in diffusers with our outputs, resumes are exact."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image, ImageDraw
from safetensors import safe_open

from sdlora.bases.base import load_base
from sdlora.io.formats import load_adapter
from sdlora.train import TrainConfig
from sdlora.train.data import to_bucket_cropped
from sdlora.train.loop import train
from sdlora.train.setup import base_resolution

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """Two 150 x 100 pictures with captions: at --resolution 128 they go to the 128 x 128 bucket,
    scaled to 192 x 128 and cropped."""
    folder = tmp_path_factory.mktemp("wide")
    for i, color in enumerate(((200, 30, 30), (30, 30, 200))):
        img = Image.new("RGB", (150, 100), (245, 240, 230))
        ImageDraw.Draw(img).ellipse((10 + 40 * i, 20, 70 + 40 * i, 80), fill=color)
        img.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {'red' if i == 0 else 'blue'} circle", "utf-8")
    return folder


def settings(data: Path, output: Path, **kw) -> TrainConfig:
    values = dict(
        data_dir=str(data),
        base="tiny-xl",
        output=str(output),
        resolution=128,
        batch_size=2,
        steps=3,
        lr=1e-2,
        save_every=0,
        tensorboard=False,
        workers=0,
        seed=3,
    )
    return TrainConfig(**(values | kw))


def test_a_random_crop_reports_where_the_window_sits_also_when_flipped():
    img = Image.effect_noise((150, 100), 60).convert("RGB")
    scaled = img.resize((192, 128), Image.Resampling.LANCZOS)
    for seed in range(6):
        pixels, (top, left) = to_bucket_cropped(
            img, (128, 128), "random", True, random.Random(seed)
        )
        window = scaled.crop((left, top, left + 128, top + 128))
        flipped = scaled.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        mirrored = flipped.crop((left, top, left + 128, top + 128))
        got = ((pixels.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8)
        as_seen = [torch.from_numpy(np.array(w)) for w in (window, mirrored)]
        # the offset is that of the window in the image as the pixels show it (flipped or not)
        assert any(torch.equal(got, w) for w in as_seen), seed
        assert top == 0 and 0 <= left <= 64


@pytest.mark.parametrize("cache", [True, False])
def test_sdxl_size_ids_and_pooled_text_reach_the_unet(wide, tmp_path, cache):
    pipe = load_base("tiny-xl")
    seen = []

    def record(module, args, kwargs):
        seen.append({k: v.detach().clone() for k, v in kwargs["added_cond_kwargs"].items()})
        seen[-1]["hidden"] = kwargs["encoder_hidden_states"].detach().clone()

    fresh = load_base("tiny-xl")  # what diffusers' own pipeline makes of the captions
    with torch.no_grad():
        hidden, _, pooled, _ = fresh.encode_prompt(
            ["a red circle", "a blue circle"], do_classifier_free_guidance=False
        )
    pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    config = settings(wide, tmp_path / "out", steps=1, batch_size=2, cache=cache)
    train(config, pipe=pipe)
    assert len(seen) == 1
    # original (h, w) = (100, 150); scaled to 192 x 128, the center crop starts at left 32
    expected = torch.tensor([[100.0, 150.0, 0.0, 32.0, 128.0, 128.0]] * 2)
    torch.testing.assert_close(seen[0]["time_ids"], expected, rtol=0, atol=0)
    # both images are in the batch in the seeded order: match them by their pooled text
    order = [0, 1] if torch.allclose(seen[0]["text_embeds"][0], pooled[0], atol=1e-5) else [1, 0]
    torch.testing.assert_close(seen[0]["text_embeds"], pooled[order], rtol=0, atol=1e-5)
    torch.testing.assert_close(seen[0]["hidden"], hidden[order], rtol=0, atol=1e-5)
    assert seen[0]["hidden"].shape == (2, 77, 80)  # 32 (CLIP-L-shaped) + 48 (bigG-shaped)


def xl_inputs():
    g = torch.Generator().manual_seed(5)
    ids = load_base("tiny-xl").tokenizer(
        ["a red circle", "a green square"], padding="max_length", max_length=77,
        return_tensors="pt",
    ).input_ids  # fmt: skip
    return dict(
        latents=torch.randn(2, 4, 16, 16, generator=g),
        timesteps=torch.tensor([10, 700]),
        hidden=torch.randn(2, 77, 80, generator=g),
        text_embeds=torch.randn(2, 48, generator=g),
        time_ids=torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * 2),
        ids=ids,
    )


def outputs(pipe, x) -> dict[str, torch.Tensor]:
    """UNet, first and second text encoder outputs on fixed inputs."""
    with torch.no_grad():
        extra = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
        unet = pipe.unet(x["latents"], x["timesteps"], x["hidden"], added_cond_kwargs=extra)
        out = {"unet": unet.sample, "text_encoder": pipe.text_encoder(x["ids"])[0]}
        second = pipe.text_encoder_2(x["ids"], output_hidden_states=True)
        out["text_encoder_2"] = torch.cat([second.hidden_states[-2].flatten(1), second[0]], 1)
    return out


def test_trained_sdxl_adapter_gives_our_outputs_in_diffusers(wide, tmp_path):
    pipe = load_base("tiny-xl")
    config = settings(
        wide, tmp_path / "out", train_text_encoder=True, text_encoder_lr=5e-3,
        text_encoder_2_lr=2e-3, mixed_precision="no",
    )  # fmt: skip
    path = train(config, pipe=pipe)
    x = xl_inputs()
    ours = outputs(pipe.to("cpu"), x)
    theirs = StableDiffusionXLPipeline(**load_base("tiny-xl").components)
    base = outputs(theirs, x)
    theirs.load_lora_weights(str(path))
    loaded = outputs(theirs, x)
    for name in ours:
        assert (ours[name] - base[name]).abs().max() > 1e-4, name  # the adapter changed it
        torch.testing.assert_close(loaded[name], ours[name], rtol=0, atol=1e-5, msg=name)
    adapter = load_adapter(path)
    meta = adapter.metadata
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    with safe_open(str(path), framework="pt") as f:  # kohya's SDXL names in the file
        assert {k.split("_")[1] for k in f.keys()} == {"unet", "te1", "te2"}


def test_trained_sd2_adapter_gives_our_outputs_in_diffusers(wide, tmp_path):
    pipe = load_base("tiny-v2")
    config = settings(
        wide, tmp_path / "out", base="tiny-v2", train_text_encoder=True, mixed_precision="no"
    )
    path = train(config, pipe=pipe)
    g = torch.Generator().manual_seed(5)
    width = pipe.unet.config.cross_attention_dim
    x = dict(
        latents=torch.randn(2, 4, 16, 16, generator=g),
        timesteps=torch.tensor([10, 700]),
        hidden=torch.randn(2, 77, width, generator=g),
        ids=pipe.tokenizer(["a red circle"] * 2, padding="max_length", max_length=77,
                           return_tensors="pt").input_ids,
    )  # fmt: skip

    def run(p):
        with torch.no_grad():
            unet = p.unet(x["latents"], x["timesteps"], x["hidden"]).sample
            return {"unet": unet, "text_encoder": p.text_encoder(x["ids"])[0]}

    ours = run(pipe.to("cpu"))
    theirs = StableDiffusionPipeline(**load_base("tiny-v2").components)
    base = run(theirs)
    theirs.load_lora_weights(str(path))
    loaded = run(theirs)
    for name in ours:
        assert (ours[name] - base[name]).abs().max() > 1e-4, name
        torch.testing.assert_close(loaded[name], ours[name], rtol=0, atol=1e-5, msg=name)
    meta = load_adapter(path).metadata
    # tiny-v2 predicts v, as SD 2.1 does: the scheduler config says so, kohya's version too
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["ss_v2"] == "True"


def test_sdxl_resume_ends_where_a_straight_run_ends(wide, tmp_path):
    straight = settings(wide, tmp_path / "straight", steps=4, save_every=2, crop="random")
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
    assert b.modules[key].up.abs().max() > 0


def test_default_resolution_is_the_bases_own(tmp_path):
    folder = tmp_path / "sdxl-like"
    for name, config in (
        ("unet", {"sample_size": 128}),
        ("vae", {"block_out_channels": [128, 256, 512, 512]}),
    ):
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(json.dumps(config), "utf-8")
    assert base_resolution(TrainConfig(base=str(folder))) == 1024  # 128 latents × 8
    assert base_resolution(TrainConfig(base="tiny-xl")) == 64
    assert base_resolution(TrainConfig(base="tiny"), pipe=load_base("tiny-v2")) == 64
