"""The built-in `tiny` base: a Stable-Diffusion-1.x-shaped model with random, seeded weights.

Same classes and wiring as SD 1.x (UNet2DConditionModel with cross-attention, AutoencoderKL with
a factor-8 latent, CLIPTextModel, CLIP tokenizer, PNDM scheduler with SD's betas), only narrow.
Built from configs in well under a second; nothing is downloaded.
"""

from __future__ import annotations

import tempfile

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .tokenizer_files import write_tokenizer_files

SEED = 0  # fixed: the tiny base is the same model on every machine

UNET_CONFIG = dict(
    sample_size=8,  # latent side; 64 px images
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,  # SD 1.x's name for the number of heads
    norm_num_groups=8,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 16, 32, 32),  # four levels: latents are 8x smaller, as in SD
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.18215,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    skip_prk_steps=True,
    steps_offset=1,
    set_alpha_to_one=False,
    prediction_type="epsilon",
)


def text_encoder_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """A 2-layer CLIP text encoder sized to the project's tokenizer."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="quick_gelu",
        projection_dim=32,
    )


def make_tokenizer() -> CLIPTokenizer:
    """The project's CLIP tokenizer, from vocab/merges files written to a temporary folder."""
    with tempfile.TemporaryDirectory() as folder:
        vocab, merges = write_tokenizer_files(folder)
        return CLIPTokenizer(str(vocab), str(merges), model_max_length=77)


def build_tiny_pipeline(seed: int = SEED) -> StableDiffusionPipeline:
    """Build the tiny SD-1.x-shaped pipeline with deterministic weights (fp32, CPU)."""
    tokenizer = make_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**VAE_CONFIG)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(text_encoder_config(tokenizer))
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
        model.eval()
    return pipe
