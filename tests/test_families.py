"""Model families: SD 2.x (the built-in tiny-v2) beside SD 1.x, everywhere an SD 1.x base goes.

Training (v-prediction), kohya-layout adapters that diffusers reads as we do, the mixer, single
files in SD 2.x's original layout (OpenCLIP text encoder) that diffusers loads as we do, and a
one-line refusal of an adapter made for the other family.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_adapter_file, run_text, run_unet
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from PIL import Image
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from sdlora.bases.base import load_base
from sdlora.bases.families import SD1, SD2, family_of_pipeline, family_of_unet_config, width_label
from sdlora.bases.recommend import guidance_and_steps, recommended, training_start
from sdlora.cli import main
from sdlora.errors import SdloraError
from sdlora.io.formats import load_adapter
from sdlora.io.single_file import (
    load_single_file,
    save_pipeline_single_file,
    to_single_file_state_dict,
)
from sdlora.lora.blend import Mixer
from sdlora.lora.layer import LoRALayer
from sdlora.tools.export import export_single_file
from sdlora.tools.inspect import inspect_file


def tiny_v2():
    return load_base("tiny-v2")


@pytest.fixture(scope="module")
def inputs_v2(inputs):
    """The shared inputs with a 64-wide condition, as tiny-v2's text encoder makes."""
    g = torch.Generator().manual_seed(99)
    return dict(inputs, hidden=torch.randn(2, 77, 64, generator=g))


def test_family_table():
    assert [width_label(w) for w in (768, 1024, 32, 96, 64, 2048, 48)] == [
        "SD 1.x",
        "SD 2.x",
        "SD 1.x (tiny, sdlora built-in)",
        "SD 1.x (toy, sdlora built-in)",
        "SD 2.x (tiny-v2, sdlora built-in)",
        "SDXL",
        "unknown (cross-attention width 48)",
    ]
    # SD 2.1 / SD 1.5 UNet configs (the parts that matter), and by shape when the width is new
    assert family_of_unet_config({"cross_attention_dim": 1024}) is SD2
    assert family_of_unet_config({"cross_attention_dim": 768}) is SD1
    assert family_of_unet_config({"cross_attention_dim": 512, "use_linear_projection": True}) is SD2
    assert family_of_pipeline(load_base("tiny")) is SD1
    assert family_of_pipeline(load_base("toy")) is SD1
    assert family_of_pipeline(tiny_v2()) is SD2


def test_native_size_and_vae_factor_live_in_the_table(tmp_path, monkeypatch):
    """The image side of a base known only by its family is the table's; a base with configs
    says its own through the one function beside the table."""
    from dataclasses import replace

    from safetensors.torch import save_file

    from sdlora.bases import families
    from sdlora.bases.families import SDXL, config_native_size, vae_factor
    from sdlora.train.config import TrainConfig
    from sdlora.train.setup import base_resolution

    assert [(f.native_size, f.vae_factor) for f in (SD1, SD2, SDXL)] == [
        (512, 8),
        (768, 8),
        (1024, 8),
    ]
    sd15_vae = {"block_out_channels": [128, 256, 512, 512]}
    assert vae_factor(sd15_vae) == 8 and vae_factor({"block_out_channels": [8, 8]}) == 2
    assert config_native_size({"sample_size": 96}, sd15_vae) == 768
    for name in ("toy", "tiny", "tiny-v2", "tiny-xl"):
        pipe = load_base(name)
        assert recommended(pipe).size == pipe.unet.config.sample_size * vae_factor(pipe.vae.config)
    # a single file says only its family: the row's size, and a changed row changes the answer
    files = {}
    for family in (SD1, SD2, SDXL):
        files[family.name] = tmp_path / f"{family.name}.safetensors"
        save_file({family.text_key: torch.zeros(1)}, str(files[family.name]))
        assert base_resolution(TrainConfig(base=str(files[family.name]))) == family.native_size
    small = replace(SDXL, sample_size=40)
    monkeypatch.setattr(families, "FAMILIES", (SD1, SD2, small))
    assert base_resolution(TrainConfig(base=str(files["sdxl"]))) == 320


def test_tiny_v2_is_sd21_shaped():
    pipe = tiny_v2()
    unet, text = pipe.unet, pipe.text_encoder
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert text.config.hidden_act == "gelu" and text.config.num_hidden_layers == 2
    assert unet.config.cross_attention_dim == text.config.hidden_size == 64
    assert isinstance(unet.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
    assert [b.attentions[0].transformer_blocks[0].attn1.heads for b in unet.down_blocks[:2]] == [
        2,
        4,
    ]
    # random but fixed: two builds are the same model
    again = tiny_v2()
    for key, value in unet.state_dict().items():
        assert torch.equal(value, again.unet.state_dict()[key]), key
    rec = recommended(pipe)
    assert (rec.guidance, rec.steps, rec.size) == (7.5, 25, 64)
    assert guidance_and_steps("tiny-v2") == (7.5, 25)
    assert training_start("tiny-v2").resolution == 64


def test_training_on_tiny_v2_targets_velocity_and_diffusers_reads_it(
    tmp_path, monkeypatch, inputs_v2
):
    """A few v-prediction steps on tiny-v2 -> kohya file -> diffusers' load_lora_weights = ours."""
    from test_train import settings

    from sdlora.train import train

    velocity = DDPMScheduler.get_velocity
    calls = []

    def spy(self, sample, noise, timesteps):
        calls.append(tuple(sample.shape))
        return velocity(self, sample, noise, timesteps)

    monkeypatch.setattr(DDPMScheduler, "get_velocity", spy)
    data = tmp_path / "data"
    data.mkdir()
    for i, color in enumerate(((220, 30, 30), (40, 60, 220))):
        Image.new("RGB", (64, 64), color).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a square {i}", encoding="utf-8")
    config = settings(data, tmp_path / "out", base="tiny-v2", train_text_encoder=True, lr=5e-2)
    path = train(config)
    assert calls == [(2, 4, 8, 8)] * 3  # the v-prediction target, every step

    adapter = load_adapter(path)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in adapter.modules
    assert (
        adapter.modules["lora_te_text_model_encoder_layers_0_self_attn_q_proj"].down.shape[1] == 64
    )
    assert inspect_file(path)["architecture"] == "SD 2.x (tiny-v2, sdlora built-in)"

    ours = tiny_v2()
    Mixer(ours).add(path)
    theirs = tiny_v2()
    theirs.load_lora_weights(str(path), adapter_name="style")
    base = tiny_v2()
    assert (run_unet(ours, inputs_v2) - run_unet(base, inputs_v2)).abs().max() > 1e-4
    assert (run_text(ours, inputs_v2) - run_text(base, inputs_v2)).abs().max() > 1e-4
    for run in (run_unet, run_text):
        torch.testing.assert_close(
            run(theirs, inputs_v2), run(ours, inputs_v2), atol=1e-5, rtol=1e-5
        )


def test_random_adapter_on_tiny_v2_agrees_with_diffusers_at_any_strength(tmp_path, inputs_v2):
    path, trained = make_adapter_file(tiny_v2, tmp_path / "v2.safetensors", alpha=8.0, seed=5)
    ours, theirs = tiny_v2(), tiny_v2()
    mixer = Mixer(ours)
    mixer.add(path)
    theirs.load_lora_weights(str(path), adapter_name="v2")
    for run in (run_unet, run_text):
        torch.testing.assert_close(
            run(ours, inputs_v2), run(trained, inputs_v2), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            run(theirs, inputs_v2), run(ours, inputs_v2), atol=1e-5, rtol=1e-5
        )
    mixer.set_strength("v2", 0.3)
    theirs.set_adapters(["v2"], [0.3])
    for run in (run_unet, run_text):
        torch.testing.assert_close(
            run(theirs, inputs_v2), run(ours, inputs_v2), atol=1e-5, rtol=1e-5
        )


@pytest.fixture(scope="module")
def v2_file(tmp_path_factory):
    return save_pipeline_single_file(
        tiny_v2(), tmp_path_factory.mktemp("v2") / "tiny-v2.safetensors", dtype="fp32"
    )


def test_sd2_single_file_layout(v2_file):
    pipe = tiny_v2()
    with safe_open(str(v2_file), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["sdlora_layout"] == "ldm_sd_v2"
        t = "cond_stage_model.model."
        fused = f.get_tensor(t + "transformer.resblocks.1.attn.in_proj_weight")
        text = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)  # transformers 5: flat
        attn = text.encoder.layers[1].self_attn
        want = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        assert torch.equal(fused, want)  # (3·64, 64) = [q; k; v]
        assert torch.equal(f.get_tensor(t + "text_projection"), torch.eye(64))
        # OpenCLIP's last block, which SD 2.x skips (penultimate layer): a copy of the one before
        padded = f.get_tensor(t + "transformer.resblocks.2.mlp.c_fc.weight")
        assert torch.equal(padded, f.get_tensor(t + "transformer.resblocks.1.mlp.c_fc.weight"))
        proj_in = f.get_tensor("model.diffusion_model.input_blocks.1.1.proj_in.weight")
        assert proj_in.shape == (32, 32)  # Linear, not SD 1.x's 1x1 conv
    assert {
        t + n for n in ("ln_final.weight", "positional_embedding", "token_embedding.weight")
    } <= keys
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)


def test_sd2_single_file_round_trips_and_diffusers_agrees(v2_file, tmp_path, inputs_v2):
    pipe = tiny_v2()
    ours = load_single_file(v2_file)  # no config: recognised as tiny-v2 by its shapes
    assert ours.scheduler.config.prediction_type == "v_prediction"
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(pipe, name).state_dict(), getattr(ours, name).state_dict()
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}.{key}"
    folder = tmp_path / "tiny-v2"
    pipe.save_pretrained(folder)
    theirs = StableDiffusionPipeline.from_single_file(
        str(v2_file),
        config=str(folder),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    assert theirs.scheduler.config.prediction_type == "v_prediction"
    for run in (run_unet, run_text):
        torch.testing.assert_close(run(theirs, inputs_v2), run(ours, inputs_v2), atol=1e-5, rtol=0)
    assert load_base(str(v2_file), config=folder).unet.config.cross_attention_dim == 64


def test_exported_sd2_blend_equals_live_blend(tmp_path, inputs_v2):
    path, _ = make_adapter_file(tiny_v2, tmp_path / "a.safetensors", seed=2)
    live = tiny_v2()
    Mixer(live).add(path, strength=0.7)
    out = export_single_file(live, tmp_path / "merged.safetensors", dtype="fp32")
    loaded = load_single_file(out)
    for run in (run_unet, run_text):
        torch.testing.assert_close(run(loaded, inputs_v2), run(live, inputs_v2), atol=1e-5, rtol=0)


def test_sd21_shapes_give_the_well_known_names():
    """Full SD 2.1 shapes (on meta): OpenCLIP-H names, and diffusers' converter reads them back."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=96,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
        )
        text = CLIPTextModel(  # OpenCLIP ViT-H/14's text tower without its last layer
            CLIPTextConfig(
                hidden_size=1024,
                intermediate_size=4096,
                num_attention_heads=16,
                num_hidden_layers=23,
                hidden_act="gelu",
            )
        )
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
        )
    sd = to_single_file_state_dict(
        unet.state_dict(), vae.state_dict(), text.state_dict(), unet.config, vae.config
    )
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    t, m = "cond_stage_model.model.", "model.diffusion_model."
    assert len([k for k in sd if k.startswith(t + "transformer.resblocks.")]) == 24 * 12
    assert shapes[t + "transformer.resblocks.23.attn.in_proj_weight"] == (3072, 1024)
    assert shapes[t + "transformer.resblocks.0.mlp.c_fc.weight"] == (4096, 1024)
    assert shapes[t + "positional_embedding"] == (77, 1024)
    assert shapes[t + "token_embedding.weight"] == (49408, 1024)
    assert shapes[m + "input_blocks.1.1.proj_in.weight"] == (320, 320)
    assert shapes[m + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
    assert shapes[m + "middle_block.1.proj_out.weight"] == (1280, 1280)
    back = convert_open_clip_checkpoint(text, sd)
    want = {
        "text_model." + k.removeprefix("text_model."): tuple(v.shape)
        for k, v in text.state_dict().items()
    }
    want.pop("text_model.embeddings.position_ids", None)
    assert {k: tuple(v.shape) for k, v in back.items()} == want


def test_full_sd2_file_needs_its_config_folder(tmp_path):
    from safetensors.torch import save_file

    names = [
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
        "first_stage_model.decoder.conv_out.weight",
        "cond_stage_model.model.token_embedding.weight",
    ]
    path = tmp_path / "v2-1_768-ema-pruned.safetensors"
    save_file({k: torch.zeros(1) for k in names}, str(path))
    with pytest.raises(SdloraError, match=r"a full SD 2.x checkpoint; .*--config DIR"):
        load_single_file(path)


def plain_weights(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{c}.{k}": v.clone()
        for c in ("unet", "text_encoder")
        for k, v in getattr(pipe, c).state_dict().items()
    }


@pytest.mark.parametrize(
    ("trained_on", "used_on", "trained", "base"),
    [
        (lambda: load_base("tiny"), tiny_v2, "SD 1.x", "SD 2.x"),
        (tiny_v2, lambda: load_base("tiny"), "SD 2.x", "SD 1.x"),
    ],
)
def test_adapter_of_another_family_is_refused_whole(tmp_path, trained_on, used_on, trained, base):
    path, _ = make_adapter_file(trained_on, tmp_path / "style.safetensors")
    pipe = used_on()
    before = plain_weights(pipe)
    mixer = Mixer(pipe)
    with pytest.raises(SdloraError) as err:
        mixer.add(path)
    message = str(err.value)
    width = 32 if trained == "SD 1.x" else 64
    assert message.startswith(
        f"style.safetensors was trained for {trained} (cross-attention width {width}); the base is {base}"
    )
    assert "pick a base of the adapter's family" in message and "\n" not in message
    assert not mixer.entries
    assert not any(
        isinstance(m, LoRALayer)
        for c in ("unet", "text_encoder")
        for m in getattr(pipe, c).modules()
    )
    after = plain_weights(pipe)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("command", ["generate", "export"])
def test_cli_refuses_another_family_in_one_line(tmp_path, capsys, command):
    path, _ = make_adapter_file(lambda: load_base("tiny"), tmp_path / "style.safetensors")
    out = tmp_path / ("o.png" if command == "generate" else "o.safetensors")
    argv = {
        "generate": ["generate", "--prompt", "x", "--steps", "1", "--device", "cpu"],
        "export": ["export", "--dtype", "fp32", "--format", "single-file"],
    }[command]
    code = main([*argv, "--base", "tiny-v2", "--lora", str(path), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert (
        "style.safetensors was trained for SD 1.x (cross-attention width 32); the base is SD 2.x"
        in err
    )
    assert not out.exists()


def test_generate_on_tiny_v2_uses_its_recommendation(tmp_path):
    import json

    out = tmp_path / "v2.png"
    assert (
        main(
            [
                "generate",
                "--base",
                "tiny-v2",
                "--prompt",
                "a square",
                "--steps",
                "2",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    image = Image.open(out)
    assert image.size == (64, 64)
    assert json.loads(image.text["sdlora"])["guidance"] == 7.5


def test_convert_with_a_base_of_another_family_writes_nothing(tmp_path, capsys):
    path, _ = make_adapter_file(tiny_v2, tmp_path / "v2style.safetensors")
    out = tmp_path / "out.safetensors"
    code = main(["convert", str(path), "--to", "diffusers", "--out", str(out), "--base", "tiny"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert (
        "v2style.safetensors was trained for SD 2.x (cross-attention width 64); the base is SD 1.x"
        in err
    )
    assert not out.exists()


def test_adapter_of_another_base_of_the_same_family_says_so(tmp_path):
    path, _ = make_adapter_file(lambda: load_base("tiny"), tmp_path / "t.safetensors")
    with pytest.raises(SdloraError) as err:
        Mixer(load_base("toy")).add(path)
    assert str(err.value) == (
        "t.safetensors was trained for SD 1.x (cross-attention width 32); the base is SD 1.x "
        "(cross-attention width 96); pick the base it was made for"
    )
