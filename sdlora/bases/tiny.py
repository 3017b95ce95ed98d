"""The built-in `tiny`, `tiny-v2`, `tiny-xl` and `tiny-sd3` bases: SD-1.x-, SD-2.x-, SDXL- and
SD-3.5-shaped models with random, seeded weights.

`tiny` has the classes and wiring of SD 1.x (UNet2DConditionModel with cross-attention,
AutoencoderKL with a factor-8 latent, CLIPTextModel with quick-GELU, CLIP tokenizer, PNDM
scheduler with SD's betas), only narrow. `tiny-v2` is SD 2.1 the same way: heads per block, Linear
proj_in/proj_out, a GELU text encoder (diffusers' SD 2.x text encoder is OpenCLIP-H's first 23 of 24
layers: the penultimate layer's output), a DDIM scheduler predicting v. `tiny-xl` is SDXL the same way: a CLIP text encoder
(quick-GELU, 32 wide) and a wider GELU one with a projection (OpenCLIP-bigG's place, 48 wide)
whose hidden states are concatenated (80 = the UNet's cross-attention width), the second's pooled
projection and six size/crop numbers through the UNet's added time embedding, SDXL's block
layout (no attention in the first block, two layers per block, more transformer layers in the
last) and its Euler scheduler. `tiny-sd3` is Stable Diffusion 3.5 (MMDiT-X) the same way: an
SD3Transformer2DModel whose first block has the second (dual) attention and RMS-normed queries and
keys, two CLIP text encoders with projections (32 wide each, their pooled outputs concatenated:
64), a T5 encoder (72 wide, the joint attention width; the CLIP states are zero-padded to it as in
SD3), a 16-channel VAE and the flow-matching Euler scheduler with shift 3. Built from configs in well under a second; nothing is downloaded.
"""

from __future__ import annotations

import tempfile

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from sdlora.bases.tokenizer_files import t5_vocab, write_tokenizer_files

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


# SD 2.1 in small: heads per block (SD 2.1: 5, 10, 20, 20 heads of 64), Linear projections,
# cross-attention as wide as the text encoder (64 here, 1024 in SD 2.x; 32 in `tiny`).
UNET_V2_CONFIG = dict(
    UNET_CONFIG,
    cross_attention_dim=64,
    attention_head_dim=(2, 4, 4),  # heads per block: 16 channels each
    use_linear_projection=True,
)

# SD 2.1's scheduler_config.json (DDIM, v-prediction, SD's betas); like it, this keeps
# skip_prk_steps for a switch to PNDM (DDIM itself ignores it)
SCHEDULER_V2_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    prediction_type="v_prediction",
)


# SDXL in small: its block types and layer counts (SDXL: 320/640/1280 channels, 5/10/20 heads,
# 1/2/10 transformer layers), Linear projections, cross-attention as wide as both text encoders
# (80 = 32 + 48; SDXL 2048 = 768 + 1280), and the added embedding of the second encoder's pooled
# projection (48) and six time ids of 8 sinusoids each (SDXL: 1280 + 6 · 256 = 2816).
TEXT_XL_WIDTHS = (32, 48)
UNET_XL_CONFIG = dict(
    sample_size=8,  # latent side; 64 px images (SDXL: 128, 1024 px)
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(1, 2, 4),  # heads per block: 16 channels each
    cross_attention_dim=sum(TEXT_XL_WIDTHS),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + TEXT_XL_WIDTHS[1],
    norm_num_groups=8,
)
VAE_XL_CONFIG = dict(VAE_CONFIG, scaling_factor=0.13025)  # SDXL's VAE scale

# SDXL base's scheduler_config.json: Euler, SD's betas, epsilon; like it, this keeps the DDIM and
# PNDM settings for a switch of sampler (`sdlora generate --scheduler`)
SCHEDULER_XL_CONFIG = dict(
    num_train_timesteps=1000,
    clip_sample=False,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    sample_max_value=1.0,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    prediction_type="epsilon",
    use_karras_sigmas=False,
)


# SD 3.5 in small. SD 3.5 Medium: 24 blocks of 24 heads of 64 (1536 wide), the first 13 with the
# dual attention (MMDiT-X), RMS norm on queries and keys, CLIP-L (768) and CLIP-G (1280) pooled
# together (2048), T5-XXL (4096), a 16-channel VAE, 2x2 patches, flow matching with shift 3.
TEXT_SD3_WIDTHS = (32, 32)  # the two CLIP encoders; pooled projection = their sum
T5_SD3_WIDTH = 72  # the joint attention width (SD3: 4096); at least the CLIP widths' sum
TRANSFORMER_SD3_CONFIG = dict(
    sample_size=8,  # latent side; 64 px images (SD3: 128, 1024 px)
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=T5_SD3_WIDTH,
    caption_projection_dim=32,  # = heads x head width, as in SD3
    pooled_projection_dim=sum(TEXT_SD3_WIDTHS),
    pos_embed_max_size=16,
    dual_attention_layers=(0,),
    qk_norm="rms_norm",
)
VAE_SD3_CONFIG = dict(
    VAE_CONFIG,
    latent_channels=16,
    scaling_factor=1.5305,  # SD3's VAE scale and shift
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
SCHEDULER_SD3_CONFIG = dict(num_train_timesteps=1000, shift=3.0)
T5_SD3_CONFIG = dict(
    d_model=T5_SD3_WIDTH,
    d_kv=8,
    d_ff=2 * T5_SD3_WIDTH,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    feed_forward_proj="gated-gelu",  # T5 v1.1, SD3's T5-XXL
    is_encoder_decoder=False,
    use_cache=False,
)


def text_encoder_config(
    tokenizer: CLIPTokenizer, width: int = 32, act: str = "quick_gelu"
) -> CLIPTextConfig:
    """A 2-layer CLIP text encoder sized to the project's tokenizer (SD 1.x: quick-GELU)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act=act,
        projection_dim=width,
    )


def make_tokenizer() -> CLIPTokenizer:
    """The project's CLIP tokenizer, from vocab/merges files written to a temporary folder."""
    with tempfile.TemporaryDirectory() as folder:
        vocab, merges = write_tokenizer_files(folder)
        return CLIPTokenizer(str(vocab), str(merges), model_max_length=77)


def make_t5_tokenizer() -> T5Tokenizer:
    """The project's T5 tokenizer: a unigram vocabulary built in code (`t5_vocab`)."""
    return T5Tokenizer(vocab=t5_vocab(), extra_ids=0, model_max_length=512)


def build_tiny_pipeline(
    seed: int = SEED, family: str = "sd1"
) -> StableDiffusionPipeline | StableDiffusionXLPipeline | StableDiffusion3Pipeline:
    """Build the tiny SD-1.x-shaped (or with family="sd2", "sdxl" or "sd3", SD-2.x-, SDXL- or
    SD-3.5-shaped) pipeline with deterministic weights (fp32, CPU)."""
    if family == "sdxl":
        return build_tiny_xl_pipeline(seed)
    if family == "sd3":
        return build_tiny_sd3_pipeline(seed)
    tokenizer = make_tokenizer()
    v2 = family == "sd2"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**(UNET_V2_CONFIG if v2 else UNET_CONFIG))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**VAE_CONFIG)
        torch.manual_seed(seed + 2)
        config = (
            text_encoder_config(tokenizer, 64, "gelu") if v2 else text_encoder_config(tokenizer)
        )
        text_encoder = CLIPTextModel(config)
    if v2:
        scheduler = DDIMScheduler.from_config(SCHEDULER_V2_CONFIG)
    else:
        scheduler = PNDMScheduler(**SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    for model in (unet, vae, text_encoder):
        model.eval()
    return pipe


def build_tiny_xl_pipeline(seed: int = SEED) -> StableDiffusionXLPipeline:
    """Build the tiny SDXL-shaped pipeline with deterministic weights (fp32, CPU)."""
    tokenizer = make_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_XL_CONFIG)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**VAE_XL_CONFIG)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(text_encoder_config(tokenizer, TEXT_XL_WIDTHS[0]))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(
            text_encoder_config(tokenizer, TEXT_XL_WIDTHS[1], "gelu")
        )
    return xl_pipeline(unet, vae, text_encoder, text_encoder_2, tokenizer)


def xl_pipeline(unet, vae, text_encoder, text_encoder_2, tokenizer) -> StableDiffusionXLPipeline:
    """An SDXL pipeline of these models in eval mode: the project's tokenizer for the second
    encoder, SDXL base's Euler scheduler, no watermarker, no progress bar."""
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=make_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER_XL_CONFIG),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    for model in (unet, vae, text_encoder, text_encoder_2):
        model.eval()
    return pipe


def build_tiny_sd3_pipeline(seed: int = SEED) -> StableDiffusion3Pipeline:
    """Build the tiny SD-3.5-shaped (MMDiT-X) pipeline with deterministic weights (fp32, CPU)."""
    tokenizer = make_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**TRANSFORMER_SD3_CONFIG)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**VAE_SD3_CONFIG)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModelWithProjection(
            text_encoder_config(tokenizer, TEXT_SD3_WIDTHS[0])
        )
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(
            text_encoder_config(tokenizer, TEXT_SD3_WIDTHS[1], "gelu")
        )
        torch.manual_seed(seed + 4)
        t5_tokenizer = make_t5_tokenizer()
        t5_config = T5Config(
            vocab_size=len(t5_tokenizer),
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
            **T5_SD3_CONFIG,
        )
        text_encoder_3 = T5EncoderModel(t5_config)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_SD3_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=make_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    for model in (transformer, vae, text_encoder, text_encoder_2, text_encoder_3):
        model.eval()
    return pipe
