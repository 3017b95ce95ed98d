"""Original-layout (A1111/ComfyUI) single files: round trips through our loader and diffusers'."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from sdlora.bases.tiny import UNET_CONFIG, build_tiny_pipeline
from sdlora.errors import SdloraError
from sdlora.io.single_file import (
    load_single_file,
    save_pipeline_single_file,
    save_single_file,
    to_single_file_state_dict,
)


@pytest.fixture(scope="session")
def tiny() -> StableDiffusionPipeline:
    return build_tiny_pipeline()


@pytest.fixture(scope="session")
def tiny_folder(tiny, tmp_path_factory):
    """The tiny base as a diffusers folder: the configs and tokenizer diffusers' loader needs."""
    folder = tmp_path_factory.mktemp("tiny_diffusers")
    tiny.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_file(tiny, tmp_path_factory):
    return save_pipeline_single_file(
        tiny, tmp_path_factory.mktemp("single") / "tiny.safetensors", dtype="fp32"
    )


@pytest.fixture(scope="session")
def inputs(tiny) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = tiny.tokenizer(
        "a watercolor fox", padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    return {
        "latents": torch.randn(2, 4, 8, 8, generator=g),
        "timestep": torch.tensor([10, 700]),
        "context": torch.randn(2, 77, 32, generator=g),
        "input_ids": ids,
    }


@torch.no_grad()
def outputs(pipe: StableDiffusionPipeline, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """UNet noise prediction, text-encoder hidden states and VAE decode for fixed inputs."""
    unet = pipe.unet.float()
    return {
        "unet": unet(x["latents"], x["timestep"], encoder_hidden_states=x["context"]).sample,
        "text": pipe.text_encoder.float()(x["input_ids"])[0],
        "vae": pipe.vae.float().decode(x["latents"] / pipe.vae.config.scaling_factor).sample,
    }


def assert_outputs_close(a: StableDiffusionPipeline, b: StableDiffusionPipeline, x, atol: float):
    want, got = outputs(a, x), outputs(b, x)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=0, msg=name)


def test_our_loader_round_trip_is_exact(tiny, tiny_file, inputs):
    loaded = load_single_file(tiny_file)  # no config: recognised as the tiny base by shapes
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(tiny, name).state_dict(), getattr(loaded, name).state_dict()
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}.{key}"
    assert_outputs_close(tiny, loaded, inputs, atol=1e-5)
    assert loaded.tokenizer("a fox").input_ids == tiny.tokenizer("a fox").input_ids
    assert loaded.scheduler.config.beta_schedule == tiny.scheduler.config.beta_schedule


def test_diffusers_loader_agrees(tiny, tiny_file, tiny_folder, inputs):
    theirs = StableDiffusionPipeline.from_single_file(
        str(tiny_file),
        config=str(tiny_folder),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    assert_outputs_close(tiny, theirs, inputs, atol=1e-5)
    assert_outputs_close(load_single_file(tiny_file), theirs, inputs, atol=1e-5)


def test_ckpt_loads_through_weights_only(tiny, tiny_file, tmp_path, inputs):
    with safe_open(str(tiny_file), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"global_step": 1, "state_dict": state}, ckpt)  # Lightning-style nesting
    assert_outputs_close(tiny, load_single_file(ckpt), inputs, atol=1e-5)


def test_fp16_is_half_size_and_close(tiny, tiny_file, tmp_path, inputs):
    half = save_pipeline_single_file(tiny, tmp_path / "half.safetensors", dtype="fp16")
    ratio = half.stat().st_size / tiny_file.stat().st_size
    assert 0.49 < ratio < 0.52
    with safe_open(str(half), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    loaded = load_single_file(half)
    for name in ("unet", "vae", "text_encoder"):  # loads as fp32 unless asked otherwise
        assert {p.dtype for p in getattr(loaded, name).parameters()} == {torch.float32}
    assert_outputs_close(tiny, loaded, inputs, atol=2e-2)


def test_bf16_export_and_load(tiny, tmp_path):
    path = save_pipeline_single_file(tiny, tmp_path / "bf16.safetensors", dtype=torch.bfloat16)
    with safe_open(str(path), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    loaded = load_single_file(path, dtype=torch.bfloat16)
    for name in ("unet", "vae", "text_encoder"):
        assert {p.dtype for p in getattr(loaded, name).parameters()} == {torch.bfloat16}


def test_overwrite_refused_unless_asked(tiny, tmp_path):
    path = save_pipeline_single_file(tiny, tmp_path / "m.safetensors", dtype="fp16")
    before = path.read_bytes()
    with pytest.raises(SdloraError, match="already exists"):
        save_pipeline_single_file(tiny, path, dtype="fp32")
    assert path.read_bytes() == before
    save_pipeline_single_file(tiny, path, dtype="fp32", overwrite=True)
    assert path.stat().st_size > len(before)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp files left


def test_bad_arguments_write_nothing(tiny, tmp_path):
    sds = [tiny.unet.state_dict(), tiny.vae.state_dict(), tiny.text_encoder.state_dict()]
    configs = [tiny.unet.config, tiny.vae.config]
    with pytest.raises(SdloraError, match="dtype"):
        save_single_file(*sds, *configs, tmp_path / "a.safetensors", dtype="fp8")
    with pytest.raises(SdloraError, match=".safetensors"):
        save_single_file(*sds, *configs, tmp_path / "a.ckpt", dtype="fp16")
    wrapped = {k.replace("to_q.weight", "to_q.base.weight"): v for k, v in sds[0].items()}
    with pytest.raises(SdloraError, match="to_q.base.weight"):
        save_single_file(wrapped, *sds[1:], *configs, tmp_path / "a.safetensors")
    wrapped = {k.replace("q_proj.weight", "q_proj.base.weight"): v for k, v in sds[2].items()}
    with pytest.raises(SdloraError, match="q_proj.base.weight"):
        save_single_file(*sds[:2], wrapped, *configs, tmp_path / "a.safetensors")
    big = dict(sds[0], **{"conv_out.weight": sds[0]["conv_out.weight"] * 1e9})
    with pytest.raises(SdloraError, match="too large for fp16"):
        save_single_file(big, *sds[1:], *configs, tmp_path / "a.safetensors", dtype="fp16")
    broken = dict(sds[0], **{"conv_out.bias": torch.full_like(sds[0]["conv_out.bias"], torch.nan)})
    with pytest.raises(SdloraError, match="NaN/Inf"):
        save_single_file(broken, *sds[1:], *configs, tmp_path / "a.safetensors", dtype="fp32")
    assert list(tmp_path.iterdir()) == []


class NotAllowed:
    """A class torch.load(weights_only=True) must refuse to rebuild."""


def test_unreadable_files_raise(tiny_file, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + b"\0" * 64)
    pickled = tmp_path / "code.ckpt"
    torch.save({"state_dict": {}, "x": NotAllowed()}, pickled)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny_file.read_bytes()[:5000])
    for path in (garbage, pickled, truncated, tmp_path / "missing.safetensors"):
        with pytest.raises(SdloraError, match=path.name):
            load_single_file(path)


def test_broken_ckpt_gives_only_the_error(tmp_path):
    """A truncated pickle: the one-line SdloraError, no torch warning printed before it."""
    import warnings

    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"\x80\x04")  # protocol-4 pickle header, then nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning on the way would raise instead
        with pytest.raises(SdloraError, match=r"^.*broken.ckpt: not a readable checkpoint"):
            load_single_file(broken)


def test_not_sd_checkpoint_raises(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(SdloraError, match="model.diffusion_model"):
        load_single_file(path)
    # Only the names matter before the configs are needed: a stand-in for a 2 GB SD 1.5 file.
    names = [
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
        "first_stage_model.decoder.conv_out.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ]
    save_file({k: torch.zeros(1) for k in names}, str(path))
    with pytest.raises(SdloraError, match=r"lora.safetensors: a full SD 1.x .*--config DIR"):
        load_single_file(path)


def test_other_shapes_need_a_config_folder(tiny, tiny_folder, tmp_path, inputs):
    torch.manual_seed(3)
    wide = UNet2DConditionModel(**{**UNET_CONFIG, "block_out_channels": (32, 64, 96)}).eval()
    pipe = StableDiffusionPipeline(**{**tiny.components, "unet": wide})
    path = save_pipeline_single_file(pipe, tmp_path / "wide.safetensors", dtype="fp32")
    with pytest.raises(SdloraError, match="--config DIR"):
        load_single_file(path)
    with pytest.raises(SdloraError, match="does not match the configs"):
        load_single_file(path, config=tiny_folder)
    with pytest.raises(SdloraError, match="model_index.json"):
        load_single_file(path, config=tmp_path)
    folder = tmp_path / "wide"
    pipe.save_pretrained(folder)
    assert_outputs_close(pipe, load_single_file(path, config=folder), inputs, atol=1e-5)


SD15_UNET = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)


def test_sd15_shapes_give_the_well_known_names():
    with torch.device("meta"):  # full size, no memory
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        # CLIP ViT-L/14's text tower, as in SD 1.x
        text = CLIPTextModel(
            CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12)
        )
    u, v = unet.state_dict(), vae.state_dict()
    sd = to_single_file_state_dict(u, v, text.state_dict(), unet.config, vae.config)
    shapes = {k: tuple(t.shape) for k, t in sd.items()}
    unet_keys = [k for k in sd if k.startswith("model.diffusion_model.")]
    assert len(unet_keys) == len(u) == 686
    assert len([k for k in sd if k.startswith("first_stage_model.")]) == len(v) == 248
    m = "model.diffusion_model."
    assert shapes[m + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"] == (320, 320)
    assert shapes[m + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert shapes[m + "middle_block.1.proj_in.weight"] == (1280, 1280, 1, 1)
    assert shapes[m + "out.2.weight"] == (4, 320, 3, 3)
    assert shapes[m + "time_embed.0.weight"] == (1280, 320)
    assert shapes[m + "input_blocks.3.0.op.weight"] == (320, 320, 3, 3)
    assert shapes[m + "output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes[m + "output_blocks.5.2.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes[m + "output_blocks.11.0.skip_connection.weight"] == (320, 640, 1, 1)
    f = "first_stage_model."
    assert shapes[f + "encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes[f + "decoder.mid.attn_1.proj_out.weight"] == (512, 512, 1, 1)
    assert shapes[f + "decoder.up.3.block.2.conv1.weight"] == (512, 512, 3, 3)
    assert shapes[f + "decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert shapes[f + "encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    t = "cond_stage_model.transformer.text_model."
    assert shapes[t + "encoder.layers.11.self_attn.q_proj.weight"] == (768, 768)
    assert shapes[t + "embeddings.token_embedding.weight"] == (49408, 768)
    # diffusers' own LDM -> diffusers converters invert our mapping name for name.
    back = convert_ldm_unet_checkpoint(sd, unet.config)
    assert {k: tuple(t.shape) for k, t in back.items()} == {k: tuple(t.shape) for k, t in u.items()}
    back = convert_ldm_vae_checkpoint(sd, vae.config)
    assert {k: tuple(t.shape) for k, t in back.items()} == {k: tuple(t.shape) for k, t in v.items()}
