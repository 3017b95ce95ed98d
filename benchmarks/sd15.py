"""Stable Diffusion 1.5-shaped models with random weights, built from configs (nothing downloaded).

The configs are SD 1.5's own (UNet 860M, AutoencoderKL 84M, CLIP ViT-L/14 text encoder 123M), so
every matrix and activation has the size a real SD 1.5 run has; only the values are random.
`build_pipeline(smoke=True)` gives the tiny built-in base instead, for CPU smoke runs.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from importlib import metadata

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sdlora.bases.base import load_base
from sdlora.bases.tiny import SCHEDULER_CONFIG, make_tokenizer

# runwayml/stable-diffusion-v1-5 unet/config.json
UNET_CONFIG = dict(
    sample_size=64,  # latent side: 512 px images
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,  # SD 1.x's name for the number of heads: head dims 40, 80, 160
)

# runwayml/stable-diffusion-v1-5 vae/config.json
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

# openai/clip-vit-large-patch14 text_config, as SD 1.5's text_encoder/config.json
TEXT_ENCODER_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    layer_norm_eps=1e-5,
)

SEED = 0


def build_pipeline(
    smoke: bool, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> StableDiffusionPipeline:
    """An SD 1.5-shaped pipeline with seeded random weights on `device` in `dtype`.

    smoke=True gives the tiny built-in base (64 px) instead: the same code paths in seconds on a CPU.
    The tokenizer is the project's own small CLIP tokenizer (its ids fit SD 1.5's vocabulary).
    """
    if smoke:
        return load_base("tiny", device=device, dtype=None if dtype == torch.float32 else dtype)
    device = torch.device(device)
    tokenizer = make_tokenizer()
    text_config = CLIPTextConfig(
        **TEXT_ENCODER_CONFIG,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # built on the device itself: initialising 1.1 B parameters there takes a fraction of the
    # time the CPU needs
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoder = CLIPTextModel(text_config)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    for model in (unet, vae, text_encoder):
        model.eval().requires_grad_(False)
        torch.nn.Module.to(model, dtype=dtype)  # diffusers' .to(dtype) warns about nothing here
    return pipe


def parameter_counts(pipe: StableDiffusionPipeline) -> dict[str, int]:
    """Parameters per component (SD 1.5: UNet 859.5 M, VAE 83.7 M, text encoder 123.1 M)."""
    return {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("unet", "vae", "text_encoder")
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def device_info(device: str | torch.device | None = None) -> dict[str, str]:
    """What the numbers were measured on: device, library versions, date (UTC)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        memory = torch.cuda.get_device_properties(device).total_memory / 2**30
        name = f"{name} ({memory:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    return {
        "device": name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "accelerate": _version("accelerate"),
    }
