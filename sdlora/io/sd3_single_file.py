"""SD 3.x single files in Stability's (SAI) layout, as `sd3.5_medium.safetensors` ships and ComfyUI
reads: the MMDiT under `model.diffusion_model.` (SAI names, `sdlora.io.sd3_names`), the VAE under
`first_stage_model.` (LDM names, no quant convs), the text encoders under
`text_encoders.clip_l.transformer.`, `text_encoders.clip_g.transformer.` (Hugging Face CLIP names)
and, when the file has it, `text_encoders.t5xxl.transformer.` (Hugging Face T5 names).

Reading goes through diffusers' own single-file converters for the MMDiT and the VAE
(`from_single_file`, config from a folder); the text encoders keep their names. Writing is the
inverse of diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`: q, k, v fused into
`qkv` (rows [q; k; v]), qk-norms as `ln_q`/`ln_k`, and the two-chunk modulations (the last
block's text side, the final layer) with their halves swapped back to SAI's (shift, scale).

CLIP-L's projection: diffusers reads an SAI file's CLIP-L with an identity `text_projection` (and
ComfyUI uses its pooled output unprojected, the same thing), as SD3's is; sdlora writes the
projection it has into the file and reads it back when present.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DiffusionPipeline, SD3Transformer2DModel

from sdlora.bases.families import SD3
from sdlora.bases.pipelines import pipeline_class
from sdlora.errors import SdloraError
from sdlora.io.ldm_names import convert, vae_rules
from sdlora.io.sd3_names import BLOCK_PATHS, TOP_PATHS

PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
MARKER = PREFIX + "joint_blocks.0.x_block.attn.qkv.weight"  # every SD3 file has it
# qk-norm weights of a block (RMSNorm, SD 3.5): diffusers path -> SAI path
NORMS = {
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
}
ENCODERS = {enc.component: enc for enc in SD3.text_encoders}


def is_sd3_file(keys) -> bool:
    """True for an SD 3.x single file (its MMDiT's first fused qkv)."""
    return MARKER in set(keys)


def _swap(value: torch.Tensor) -> torch.Tensor:
    """(scale, shift) <-> (shift, scale) along the first dim."""
    first, second = value.chunk(2, dim=0)
    return torch.cat([second, first])


def transformer_to_sai(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict:
    """SD3Transformer2DModel state dict -> SAI MMDiT names under `model.diffusion_model.`."""
    last = int(config["num_layers"]) - 1
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in sd.items():
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = value
            continue
        path, _, kind = key.rpartition(".")  # kind: weight or bias
        if path.startswith("transformer_blocks."):
            _, index, leaf = path.split(".", 2)
            block = f"joint_blocks.{index}."
            if leaf in NORMS:
                out[f"{block}{NORMS[leaf]}.{kind}"] = value
                continue
            if leaf not in BLOCK_PATHS:
                raise SdloraError(f"transformer weight {key!r} has no place in the SD3 layout")
            sai, slot = BLOCK_PATHS[leaf]
            if slot is not None:
                fused.setdefault(f"{block}{sai}.{kind}", {})[slot] = value
                continue
            if leaf == "norm1_context.linear" and int(index) == last:
                value = _swap(value)
            out[f"{block}{sai}.{kind}"] = value
        elif path in TOP_PATHS:
            out[f"{TOP_PATHS[path]}.{kind}"] = _swap(value) if path == "norm_out.linear" else value
        else:
            raise SdloraError(f"transformer weight {key!r} has no place in the SD3 layout")
    for name, parts in fused.items():
        if sorted(parts) != [0, 1, 2]:
            raise SdloraError(f"{name}: the MMDiT lacks one of q, k, v")
        out[name] = torch.cat([parts[0], parts[1], parts[2]])
    return {PREFIX + k: v for k, v in out.items()}


def to_sd3_state_dict(
    transformer_sd: Mapping[str, torch.Tensor],
    vae_sd: Mapping[str, torch.Tensor],
    texts: Mapping[str, Mapping[str, torch.Tensor] | None],
    transformer_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    """diffusers state dicts -> one SAI-layout state dict. `texts` by pipeline attribute
    (text_encoder = CLIP-L, text_encoder_2 = CLIP-G, text_encoder_3 = T5, which may be None)."""
    out = transformer_to_sai(transformer_sd, transformer_config)
    for key, value in convert(vae_sd, vae_rules(vae_config), VAE_PREFIX, "vae").items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention: 1x1 convs
        out[key] = value
    for component, encoder in ENCODERS.items():
        sd = texts.get(component)
        if sd is None:
            if component != "text_encoder_3":
                raise SdloraError(f"an SD 3.x checkpoint needs the {component} weights")
            continue
        for key, value in sd.items():
            if encoder.layout == "clip" and key.startswith(("embeddings.", "encoder.", "final_")):
                key = "text_model." + key  # transformers 5 flattened CLIPTextModel; files do not
            if key.endswith("position_ids"):
                continue  # a constant buffer
            if key == "encoder.embed_tokens.weight":
                # T5's input embedding is tied to `shared.weight`; diffusers' single-file T5
                # loader ties nothing, so the file carries both (a copy: safetensors stores no
                # shared memory)
                value = value.clone()
            out[encoder.file_prefix + key] = value
    return out


def _text_encoder(state: Mapping[str, torch.Tensor], folder: Path, component: str, dtype):
    """One text encoder from the file's weights (Hugging Face names under its prefix), or None
    when the file lacks it (T5)."""
    encoder = ENCODERS[component]
    prefix = encoder.file_prefix
    sd = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not sd:
        return None
    config_class = getattr(transformers, encoder.model_class).config_class
    config = config_class.from_pretrained(folder / component, local_files_only=True)
    with init_empty_weights():  # parameters on meta (no random init); buffers real
        model = getattr(transformers, encoder.model_class)(config)
    names = set(model.state_dict())
    if not any(k.startswith("text_model.") for k in names):  # transformers 5: flat CLIPTextModel
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    if "text_projection.weight" in names and "text_projection.weight" not in sd:
        sd["text_projection.weight"] = torch.eye(config.hidden_size)  # as diffusers reads it
    if component == "text_encoder_3":  # T5: the input embedding is `shared`, tied
        sd.setdefault("encoder.embed_tokens.weight", sd.get("shared.weight"))
        sd.setdefault("shared.weight", sd.get("encoder.embed_tokens.weight"))
    missing = sorted(n for n in names - set(sd) if not n.endswith("position_ids"))
    if missing:
        raise SdloraError(f"{prefix}* lacks {len(missing)} weights, e.g. {missing[0]!r}")
    model.load_state_dict({k: v for k, v in sd.items() if k in names}, strict=False, assign=True)
    return model.to(dtype).eval()


def expected_shapes(folder: Path, t5: bool) -> dict[str, torch.Size]:
    """SAI names and shapes of the models the folder's configs describe (T5 if `t5`)."""
    config = SD3Transformer2DModel.load_config(
        folder, subfolder="transformer", local_files_only=True
    )
    vae_config = AutoencoderKL.load_config(folder, subfolder="vae", local_files_only=True)
    texts = {}
    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(config)
        vae = AutoencoderKL.from_config(vae_config)
        for component, encoder in ENCODERS.items():
            if component == "text_encoder_3" and not t5:
                continue
            model_class = getattr(transformers, encoder.model_class)
            text_config = model_class.config_class.from_pretrained(
                folder / component, local_files_only=True
            )
            texts[component] = model_class(text_config).state_dict()
    sd = to_sd3_state_dict(
        transformer.state_dict(), vae.state_dict(), texts, transformer.config, vae.config
    )
    optional = ("text_encoders.clip_l.transformer.text_projection.weight",)
    return {k: v.shape for k, v in sd.items() if k not in optional}


def build_sd3(
    state: dict[str, torch.Tensor], folder: Path, dtype: torch.dtype
) -> DiffusionPipeline:
    """The SD 3.x pipeline of an SAI-layout state dict, configs/tokenizers/scheduler from
    `folder`; without T5 in the file, a pipeline without T5 (text_encoder_3 = None)."""
    common: dict[str, Any] = dict(config=str(folder), local_files_only=True)
    if dtype != torch.float32:
        common["torch_dtype"] = dtype
    transformer = SD3Transformer2DModel.from_single_file(state, subfolder="transformer", **common)
    vae = AutoencoderKL.from_single_file(state, subfolder="vae", **common)
    models: dict[str, Any] = dict(transformer=transformer, vae=vae)
    for component in ENCODERS:
        models[component] = _text_encoder(state, folder, component, dtype)
    if models["text_encoder_3"] is None:
        models["tokenizer_3"] = None
    cls = pipeline_class(SD3)
    return cls.from_pretrained(folder, **models, local_files_only=True)
