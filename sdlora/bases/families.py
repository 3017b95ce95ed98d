"""Model families: one entry per Stable Diffusion family, everything that tells them apart.

A family says how to recognise a base or an adapter of its kind (the cross-attention width, i.e.
the text encoders' hidden size: 768 for SD 1.x's CLIP ViT-L/14, 1024 for SD 2.x's OpenCLIP ViT-H,
2048 for SDXL's two), which pipeline runs it, how its single-file checkpoints and adapter files
name things, and what it draws well with. Trainer, mixer, exporter and inspector ask this table
instead of branching on a family themselves; a new family is one more `Family(...)` in
`FAMILIES` plus, where its layout is new, one converter named by `TextEncoder.layout` in
`single_file.py`.

SD 2.x prediction type: the 768-px SD 2.x models (2.0-v, 2.1) predict v, the 512-px ones (2.0-base,
2.1-base) predict ε. A single file does not say which (kohya and A1111 need a `--v_parameterization`
flag or a yaml), so sdlora takes it from the diffusers configs that describe the file: the
`scheduler/scheduler_config.json` of the `--config` folder (or Hub id); a diffusers folder or Hub id
base carries its own. The built-in `tiny-v2` is a v-prediction model, like SD 2.1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sdlora.errors import SdloraError


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a family: the pipeline attribute, its single-file and adapter names."""

    component: str  # pipeline attribute: "text_encoder", "text_encoder_2"
    file_prefix: str  # single files: "cond_stage_model.transformer." / "...model." / ...
    layout: str  # "clip": Hugging Face names as they are; "open_clip": resblocks, fused qkv
    adapter_prefix: str  # kohya flat-name prefix in adapter files: lora_te_, lora_te1_, lora_te2_
    # the transformers class diffusers runs it as: SDXL's second one keeps its projection, whose
    # output is the pooled text embedding the UNet takes
    model_class: str = "CLIPTextModel"
    # whether sdlora trains a LoRA on it (--train-text-encoder): SD3's T5-XXL stays frozen
    trainable: bool = True


@dataclass(frozen=True)
class Family:
    """One Stable Diffusion family: how to recognise it, its file layout, its defaults."""

    name: str  # short id used in metadata: "sd1", "sd2", "sdxl"
    label: str  # what users read: "SD 1.x"
    # Cross-attention width (= text encoder hidden size, both encoders' together for SDXL) of
    # this family's real bases, and of sdlora's built-in small ones. An adapter's attn2.to_k
    # input width says its family.
    cross_attention_dim: int
    small_bases: dict[int, str]  # width -> built-in base of this family with that width
    linear_projection: bool  # transformer proj_in/proj_out are Linear (SD 2.x, SDXL), not 1x1 Conv
    pipeline: str  # the diffusers pipeline class that runs it
    text_encoders: tuple[TextEncoder, ...]
    # Single-file layout: where the text encoders live (above), a key every file has, and the
    # `sdlora_layout` metadata of the single files sdlora writes.
    text_key: str
    single_file_layout: str
    # How kohya-layout adapters name UNet modules: "diffusers" (down_blocks_1_attentions_0_...,
    # SD 1.x/2.x) or "original" (the LDM/SGM names, input_blocks_4_1_..., SDXL).
    adapter_unet_names: str
    base_model_version: str  # kohya's `ss_base_model_version` metadata for this family
    # The image side its real bases were made for is the UNet's `sample_size` (latent pixels)
    # times the VAE's downscale factor (2 per VAE level: 8 for SD's four): `native_size`. A
    # loaded base or a diffusers folder says its own (`config_native_size`); these are for a
    # base known only by its family (a single file without --config).
    sample_size: int
    vae_factor: int
    # Recommended generation settings at the family's native size.
    guidance: float
    steps: int
    builtin: str  # the built-in small base of this family, for tests and trying things out
    # The model that denoises, by pipeline attribute ("unet"; SD3: "transformer", an MMDiT), the
    # channels of its latents, and the names of its attention's Linear modules (the "attn"
    # target preset: a name matches a module path ending in "." + name).
    denoiser: str = "unet"
    latent_channels: int = 4
    attention_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    # More --targets presets of the denoiser beside "attn" (and, for a UNet, UNET_TARGETS), as
    # (name, module names) pairs: SD3's MLPs and adaLN modulations.
    target_presets: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # What the denoiser learns: "diffusion" (DDPM noising, ε or v target, SD 1.x/2.x/SDXL) or
    # "flow_matching" (rectified flow, x_t = (1-σ)·x0 + σ·ε, target ε - x0: SD 3.x).
    objective: str = "diffusion"
    # The generation samplers that run it (`sdlora.bases.generate.SCHEDULERS`), the first the
    # default where the user chose none of them.
    samplers: tuple[str, ...] = ("pndm", "ddim", "euler", "euler_a", "dpm++")

    # Stability's model-spec id (`modelspec.architecture`, SwarmUI and model sites read it) of
    # this family's bases by prediction type ("epsilon", "v_prediction"; the first where the
    # type is not known); adapters add "/lora".
    # Ids as kohya's library/sai_model_spec.py writes them.
    modelspec_architecture: Mapping[str, str] = field(default_factory=dict)

    @property
    def flow_matching(self) -> bool:
        """True for families trained by flow matching (SD 3.x)."""
        return self.objective == "flow_matching"

    @property
    def native_size(self) -> int:
        """Image side in px its real bases were made for: SD 1.x 512, SD 2.x 768, SDXL 1024."""
        return self.sample_size * self.vae_factor


SD1 = Family(
    name="sd1",
    label="SD 1.x",
    cross_attention_dim=768,  # CLIP ViT-L/14
    small_bases={32: "tiny", 96: "toy"},
    linear_projection=False,
    pipeline="StableDiffusionPipeline",
    text_encoders=(
        TextEncoder("text_encoder", "cond_stage_model.transformer.", "clip", "lora_te_"),
    ),
    text_key="cond_stage_model.transformer.text_model.final_layer_norm.weight",
    single_file_layout="ldm_sd_v1",
    adapter_unet_names="diffusers",
    base_model_version="sd_v1",
    sample_size=64,  # 512 px
    vae_factor=8,
    guidance=7.5,
    steps=25,
    builtin="tiny",
    modelspec_architecture={
        "epsilon": "stable-diffusion-v1",
        "v_prediction": "stable-diffusion-v1",
    },
)

SD2 = Family(
    name="sd2",
    label="SD 2.x",
    cross_attention_dim=1024,  # OpenCLIP ViT-H/14
    small_bases={64: "tiny-v2"},
    linear_projection=True,
    pipeline="StableDiffusionPipeline",
    text_encoders=(
        TextEncoder("text_encoder", "cond_stage_model.model.", "open_clip", "lora_te_"),
    ),
    text_key="cond_stage_model.model.token_embedding.weight",
    single_file_layout="ldm_sd_v2",
    adapter_unet_names="diffusers",
    base_model_version="sd_v2",
    sample_size=96,  # 768 px: SD 2.0-v / 2.1 (2.0-base / 2.1-base are 64, 512 px)
    vae_factor=8,
    guidance=7.5,
    steps=25,
    builtin="tiny-v2",
    modelspec_architecture={
        "v_prediction": "stable-diffusion-v2-768-v",  # 2.0-v, 2.1 (first: the default)
        "epsilon": "stable-diffusion-v2-512",  # 2.0-base, 2.1-base
    },
)

# SDXL: CLIP ViT-L (768) and OpenCLIP ViT-bigG (1280) side by side; the UNet attends to both
# encoders' penultimate hidden states concatenated (2048) and takes bigG's pooled embedding and
# six size/crop numbers through an added time embedding (`addition_embed_type="text_time"`).
# Single files use Stability's SGM layout (`conditioner.embedders.0/1`), kohya-layout adapters
# the SGM UNet names and lora_te1_/lora_te2_. Native size 1024 px.
SDXL = Family(
    name="sdxl",
    label="SDXL",
    cross_attention_dim=2048,  # 768 (CLIP ViT-L) + 1280 (OpenCLIP ViT-bigG)
    small_bases={80: "tiny-xl"},
    linear_projection=True,
    pipeline="StableDiffusionXLPipeline",
    text_encoders=(
        TextEncoder("text_encoder", "conditioner.embedders.0.transformer.", "clip", "lora_te1_"),
        TextEncoder(
            "text_encoder_2",
            "conditioner.embedders.1.model.",
            "open_clip",
            "lora_te2_",
            "CLIPTextModelWithProjection",
        ),
    ),
    text_key="conditioner.embedders.1.model.positional_embedding",
    single_file_layout="sgm_sdxl",
    adapter_unet_names="original",
    base_model_version="sdxl_base_v1-0",
    sample_size=128,  # 1024 px
    vae_factor=8,
    guidance=5.0,  # diffusers' StableDiffusionXLPipeline default
    steps=30,
    builtin="tiny-xl",
    modelspec_architecture={
        "epsilon": "stable-diffusion-xl-v1-base",
        "v_prediction": "stable-diffusion-xl-v1-base",
    },
)

# SD 3.x: an MMDiT (SD3Transformer2DModel) instead of a UNet. Image and text tokens attend jointly:
# the image side's to_q/to_k/to_v/to_out.0, the text side's add_q_proj/add_k_proj/add_v_proj/
# to_add_out; SD 3.5's MMDiT-X blocks have a second, image-only attention (attn2.*, the same
# names). Text: CLIP-L and CLIP-G (with projections: their pooled outputs, 768 + 1280, go in
# through the time embedding) and T5-XXL, whose 4096-wide states (the CLIP ones zero-padded to
# 4096 beside them) are the joint attention's context. 16-channel latents, native size 1024 px.
SD3_ATTENTION = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)
SD3_MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
SD3_ADALN = ("norm1.linear", "norm1_context.linear")
SD3 = Family(
    name="sd3",
    label="SD 3.x",
    cross_attention_dim=4096,  # the joint attention width: T5-XXL's
    small_bases={72: "tiny-sd3"},
    linear_projection=True,
    pipeline="StableDiffusion3Pipeline",
    text_encoders=(
        TextEncoder(
            "text_encoder",
            "text_encoders.clip_l.transformer.",
            "clip",
            "lora_te1_",
            "CLIPTextModelWithProjection",
        ),
        TextEncoder(
            "text_encoder_2",
            "text_encoders.clip_g.transformer.",
            "clip",
            "lora_te2_",
            "CLIPTextModelWithProjection",
        ),
        TextEncoder(
            "text_encoder_3",
            "text_encoders.t5xxl.transformer.",
            "t5",
            "lora_te3_",
            "T5EncoderModel",
            # frozen: 4.7 B parameters, and diffusers' SD3 loader reads no T5 LoRA (only
            # text_encoder and text_encoder_2), so a T5 adapter would load nowhere else
            trainable=False,
        ),
    ),
    text_key="text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight",
    single_file_layout="sd3",
    adapter_unet_names="diffusers",
    base_model_version="sd3",
    sample_size=128,  # 1024 px
    vae_factor=8,
    guidance=4.5,  # SD 3.5 Medium's model card
    steps=40,
    builtin="tiny-sd3",
    modelspec_architecture={"flow": "stable-diffusion-3"},
    denoiser="transformer",
    latent_channels=16,
    attention_modules=SD3_ATTENTION,
    target_presets=(
        # attention plus both streams' MLPs (image ff, text ff_context)
        ("attn-mlp", (*SD3_ATTENTION, *SD3_MLP)),
        # and the adaLN modulations (the norm1 / norm1_context linears)
        ("all", (*SD3_ATTENTION, *SD3_MLP, *SD3_ADALN)),
    ),
    objective="flow_matching",
    samplers=("flow_euler",),
)

FAMILIES: tuple[Family, ...] = (SD1, SD2, SDXL, SD3)
BY_NAME = {f.name: f for f in FAMILIES}


def vae_factor(vae_config: Mapping[str, Any]) -> int:
    """Pixels per latent pixel of a VAE, from its config (a diffusers `vae.config` or the
    parsed `vae/config.json`): each level but the last halves the side, so SD's four make 8."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def config_native_size(unet_config: Mapping[str, Any], vae_config: Mapping[str, Any]) -> int:
    """Image side in px a base was made for, from its UNet and VAE configs: the UNet's sample
    size (latent pixels) times the VAE factor (SD 1.5 512, SD 2.1 768, SDXL 1024)."""
    return int(unet_config["sample_size"]) * vae_factor(vae_config)


def family_of_width(width: int) -> Family | None:
    """The family whose bases have cross-attention width `width`, if any."""
    return next(
        (f for f in FAMILIES if width == f.cross_attention_dim or width in f.small_bases), None
    )


def family_of_unet_config(config: Mapping[str, Any]) -> Family:
    """The family of a UNet2DConditionModel config: SDXL by its added text/time embedding, else
    by its cross-attention width, else by shape."""
    if config.get("addition_embed_type") == "text_time":
        return SDXL
    width = config.get("cross_attention_dim")
    found = family_of_width(width) if isinstance(width, int) else None
    if found is not None:
        return found
    linear = bool(config.get("use_linear_projection", False))
    return next(f for f in FAMILIES if f.linear_projection == linear and f is not SDXL)


def family_of_transformer_config(config: Mapping[str, Any]) -> Family | None:
    """The family of a diffusion transformer's config: SD 3.x by its joint attention, else None."""
    return SD3 if "joint_attention_dim" in config else None


def family_of_pipeline(pipe) -> Family:
    """The family of a loaded pipeline (from its UNet config, or its transformer's)."""
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        return family_of_unet_config(unet.config)
    transformer = getattr(pipe, "transformer", None)
    found = family_of_transformer_config(transformer.config) if transformer is not None else None
    if found is None:
        raise SdloraError(f"{type(pipe).__name__}: not a model family sdlora knows", setting="base")
    return found


def family_of_single_file(keys) -> Family | None:
    """The family of an original-layout checkpoint from its key names, if it is one we know."""
    keys = set(keys)
    return next((f for f in FAMILIES if f.text_key in keys), None)


def family_of_adapter_keys(keys, metadata: Mapping[str, str] | None = None) -> Family | None:
    """SD 3.x when an adapter's names show it (the MMDiT's, T5's lora_te3_) or its metadata does;
    SDXL when they show a second text encoder (lora_te2_), original-layout UNet names, or kohya's
    `ss_base_model_version` "sdxl_..."; else None (the names of SD 1.x and 2.x adapters are the
    same: their widths tell them apart)."""
    original = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
    version = (metadata or {}).get("ss_base_model_version", "")
    sd3 = ("lora_transformer_", "lora_te3_", "lora_unet_joint_blocks_", "lora_unet_final_layer_")
    if any(k.startswith(sd3) for k in keys) or version in (
        "sd3",
        "5-large",  # kohya's SD3 model types (sd3_utils.load_mmdit)
        "5-medium",
        "medium",  # SD3 Medium
    ):
        return SD3
    if version.startswith("sdxl"):
        return SDXL
    if version.startswith(("sd_v1", "sd_v2")):
        return None  # labelled SD 1.x/2.x: original names too (ComfyUI's files), widths tell
    if any(k.startswith(("lora_te2_", *original)) for k in keys):
        return SDXL
    return None


def width_label(width: int) -> str:
    """What a cross-attention width says about a model: `SD 2.x`, `SD 1.x (tiny, sdlora
    built-in)`, `SDXL`, or `unknown (cross-attention width 48)`."""
    family = family_of_width(width)
    if family is None:
        return f"unknown (cross-attention width {width})"
    small = family.small_bases.get(width)
    return f"{family.label} ({small}, sdlora built-in)" if small else family.label


def describe_width(width: int) -> str:
    """`SD 2.x (cross-attention width 1024)`: the family and the width, for messages."""
    family = family_of_width(width)
    name = family.label if family else "a model"
    return f"{name} (cross-attention width {width})"
