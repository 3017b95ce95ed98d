"""Single-file checkpoints in the original Stable Diffusion (LDM / CompVis) layout.

This is the layout AUTOMATIC1111 and ComfyUI read: one file with
`model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and the text encoder where its
family keeps it (`sdlora.families`): SD 1.x `cond_stage_model.transformer.text_model.*` (CLIP,
Hugging Face names), SD 2.x `cond_stage_model.model.*` (OpenCLIP: `transformer.resblocks.N`
with q, k, v fused into `attn.in_proj_weight`). The key mapping is derived from the diffusers
configs (number of blocks, layers per block, which blocks have attention), so the built-in tiny
bases and full SD 1.x/2.x shapes both work. Loading is offline: the file's weights plus a local
diffusers folder's configs and tokenizer.
"""

from __future__ import annotations

import json
import pickle
import re
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from .errors import SdloraError
from .families import FAMILIES, Family, family_of_single_file, family_of_unet_config
from .files import atomic_save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
FULL_KEY = UNET_PREFIX + "output_blocks.11.0.skip_connection.weight"  # 12 output blocks: full size
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# diffusers ResnetBlock2D child -> LDM ResBlock child (Sequentials: in_layers = norm, SiLU, conv).
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v"}

# A rule maps a diffusers module prefix to an LDM prefix; `None` keeps the rest of the key,
# a dict renames the first child of the prefix (e.g. norm1 -> in_layers.0).
Rules = dict[str, tuple[str, dict[str, str] | None]]


def _per_block(value: int | list[int] | tuple[int, ...], n: int) -> list[int]:
    return [value] * n if isinstance(value, int) else list(value)


def _unet_rules(config: Mapping[str, Any]) -> Rules:
    """Prefix rules for UNet2DConditionModel -> `model.diffusion_model.`."""
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    n = len(down_types)
    layers = _per_block(config["layers_per_block"], n)
    rules: Rules = {
        "time_embedding.linear_1.": ("time_embed.0.", None),
        "time_embedding.linear_2.": ("time_embed.2.", None),
        "conv_in.": ("input_blocks.0.0.", None),
        "conv_norm_out.": ("out.0.", None),
        "conv_out.": ("out.2.", None),
    }
    # input_blocks: 0 is conv_in; then each layer is (resnet, attention), each downsampler its own.
    index = 0
    for b in range(n):
        for j in range(layers[b]):
            index += 1
            rules[f"down_blocks.{b}.resnets.{j}."] = (f"input_blocks.{index}.0.", UNET_RESNET)
            rules[f"down_blocks.{b}.attentions.{j}."] = (f"input_blocks.{index}.1.", None)
        if b < n - 1:  # diffusers adds no downsampler to the last block
            index += 1
            rules[f"down_blocks.{b}.downsamplers.0.conv."] = (f"input_blocks.{index}.0.op.", None)
    # middle_block: resnet, attention, resnet.
    for i in range(2):
        rules[f"mid_block.resnets.{i}."] = (f"middle_block.{2 * i}.", UNET_RESNET)
    rules["mid_block.attentions.0."] = ("middle_block.1.", None)
    # output_blocks: up block b has layers[n-1-b] + 1 layers; the upsampler follows the last
    # layer's attention (slot 2) or, in blocks without attention, its resnet (slot 1).
    index = 0
    for b in range(n):
        count = layers[n - 1 - b] + 1
        for j in range(count):
            rules[f"up_blocks.{b}.resnets.{j}."] = (f"output_blocks.{index}.0.", UNET_RESNET)
            rules[f"up_blocks.{b}.attentions.{j}."] = (f"output_blocks.{index}.1.", None)
            if j == count - 1 and b < n - 1:
                slot = 2 if "Attn" in up_types[b] else 1
                rules[f"up_blocks.{b}.upsamplers.0.conv."] = (
                    f"output_blocks.{index}.{slot}.conv.",
                    None,
                )
            index += 1
    return rules


def _vae_rules(config: Mapping[str, Any]) -> Rules:
    """Prefix rules for AutoencoderKL -> `first_stage_model.`."""
    n = len(config["down_block_types"])
    rules: Rules = {
        "quant_conv.": ("quant_conv.", None),
        "post_quant_conv.": ("post_quant_conv.", None),
    }
    for part in ("encoder", "decoder"):
        rules[f"{part}.conv_in."] = (f"{part}.conv_in.", None)
        rules[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", None)
        rules[f"{part}.conv_out."] = (f"{part}.conv_out.", None)
        for i in range(2):
            rules[f"{part}.mid_block.resnets.{i}."] = (f"{part}.mid.block_{i + 1}.", VAE_RESNET)
        attention = f"{part}.mid_block.attentions.0."
        rules[attention] = (f"{part}.mid.attn_1.", VAE_ATTENTION)
        rules[attention + "to_out.0."] = (f"{part}.mid.attn_1.proj_out.", None)
    layers = config["layers_per_block"]
    for i in range(n):
        # LDM numbers decoder levels from the lowest resolution up, diffusers the other way.
        up = n - 1 - i
        for j in range(layers + 1):  # the decoder has one resnet more per level
            if j < layers:
                rules[f"encoder.down_blocks.{i}.resnets.{j}."] = (
                    f"encoder.down.{i}.block.{j}.",
                    VAE_RESNET,
                )
            rules[f"decoder.up_blocks.{i}.resnets.{j}."] = (
                f"decoder.up.{up}.block.{j}.",
                VAE_RESNET,
            )
        rules[f"encoder.down_blocks.{i}.downsamplers.0."] = (f"encoder.down.{i}.downsample.", None)
        rules[f"decoder.up_blocks.{i}.upsamplers.0."] = (f"decoder.up.{up}.upsample.", None)
    return rules


def _rename(key: str, rules: Rules, ordered: list[str], what: str) -> str:
    for prefix in ordered:
        if key.startswith(prefix):
            ldm, children = rules[prefix]
            rest = key[len(prefix) :]
            if children is not None:
                head, dot, tail = rest.partition(".")
                if head not in children:
                    break
                rest = children[head] + dot + tail
            return ldm + rest
    raise SdloraError(
        f"{what} weight {key!r} has no place in the original SD layout; "
        "fuse or remove adapters before exporting"
    )


def _convert(sd: Mapping[str, torch.Tensor], rules: Rules, prefix: str, what: str) -> dict:
    ordered = sorted(rules, key=len, reverse=True)  # longest prefix wins (to_out.0 vs attention)
    out = {prefix + _rename(k, rules, ordered, what): v for k, v in sd.items()}
    if len(out) != len(sd):
        raise SdloraError(f"{what}: two weights mapped to the same name; the config does not fit")
    return out


def _hf_names(text_encoder_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP text weights under `text_model.` (transformers >= 5.6 flattened CLIPTextModel)."""
    return {
        key if key.startswith("text_model.") else "text_model." + key: value
        for key, value in text_encoder_sd.items()
    }


def _clip_to_ldm(text_sd: Mapping[str, torch.Tensor], pad: bool) -> dict[str, torch.Tensor]:
    """SD 1.x: the Hugging Face CLIP names as they are, under `text_model.`."""
    return _hf_names(text_sd)


def _clip_from_ldm(file_sd: Mapping[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    # Old files lack the `text_model.` level under the text encoder prefix.
    return _hf_names(file_sd)


# OpenCLIP (SD 2.x) names of one Hugging Face CLIP encoder layer's children; q, k, v are fused.
OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
OPEN_CLIP_LAYER_KEY = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
# `transformer.resblocks.N.<child>.weight`, and the fused `...attn.in_proj_weight`
OPEN_CLIP_FILE_KEY = re.compile(
    r"transformer\.resblocks\.(\d+)\.(attn\.in_proj|.+(?=\.))[._](weight|bias)"
)


def _open_clip_to_ldm(text_sd: Mapping[str, torch.Tensor], pad: bool) -> dict[str, torch.Tensor]:
    """SD 2.x: Hugging Face CLIP names -> OpenCLIP's (`transformer.resblocks.N...`).

    diffusers' SD 2.x text encoder is OpenCLIP's first L-1 of L layers (SD 2.x conditions on the
    penultimate layer). With `pad` the file gets OpenCLIP's full tower as SD 2.x files have it,
    like kohya's: a last block (a copy of the one before; never used, the penultimate layer's
    output is) and an identity `text_projection`, which loaders that build the whole OpenCLIP
    model (A1111, ComfyUI) expect.
    """
    sd = _hf_names(text_sd)
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key in OPEN_CLIP_TOP:
            out[OPEN_CLIP_TOP[key]] = value
            continue
        if key.endswith("position_ids"):  # a constant buffer, not in OpenCLIP
            continue
        match = OPEN_CLIP_LAYER_KEY.fullmatch(key)
        if match is None:
            raise SdloraError(f"text encoder weight {key!r} has no place in the OpenCLIP layout")
        index, child, kind = int(match[1]), match[2], match[3]
        block = f"transformer.resblocks.{index}."
        if child in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            fused.setdefault((index, kind), {})[child[-6]] = value
        elif child in OPEN_CLIP_LAYER:
            out[block + OPEN_CLIP_LAYER[child] + "." + kind] = value
        else:
            raise SdloraError(f"text encoder weight {key!r} has no place in the OpenCLIP layout")
    for (index, kind), parts in fused.items():
        # in_proj_weight: (3·D, D) = [q; k; v]
        name = f"transformer.resblocks.{index}.attn.in_proj_{kind}"
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if pad and fused:
        last = max(index for index, _ in fused)
        block = f"transformer.resblocks.{last}."
        for key in [k for k in out if k.startswith(block)]:
            out[key.replace(block, f"transformer.resblocks.{last + 1}.")] = out[key].clone()
        width = out["ln_final.weight"].shape[0]
        out["text_projection"] = torch.eye(width, dtype=out["ln_final.weight"].dtype)
    return out


def _open_clip_from_ldm(
    file_sd: Mapping[str, torch.Tensor], layers: int
) -> dict[str, torch.Tensor]:
    """OpenCLIP names -> Hugging Face CLIP names for a `layers`-layer model; the rest is dropped
    (the last block, text_projection, logit_scale: SD 2.x does not use them)."""
    top = {v: k for k, v in OPEN_CLIP_TOP.items()}
    children = {v: k for k, v in OPEN_CLIP_LAYER.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in file_sd.items():
        if key in top:
            out[top[key]] = value
            continue
        match = OPEN_CLIP_FILE_KEY.fullmatch(key)
        if match is None or int(match[1]) >= layers:
            continue
        index, child, kind = int(match[1]), match[2], match[3]
        layer = f"text_model.encoder.layers.{index}."
        if child == "attn.in_proj":  # (3·D, D) = [q; k; v]
            for name, part in zip("qkv", value.chunk(3), strict=True):
                out[f"{layer}self_attn.{name}_proj.{kind}"] = part
        elif child in children:
            out[f"{layer}{children[child]}.{kind}"] = value
    return out


# Text-encoder converters by `Family.text_layout`: (to the file, from the file).
TEXT_LAYOUTS = {
    "clip": (_clip_to_ldm, _clip_from_ldm),
    "open_clip": (_open_clip_to_ldm, _open_clip_from_ldm),
}


def to_single_file_state_dict(
    unet_sd: Mapping[str, torch.Tensor],
    vae_sd: Mapping[str, torch.Tensor],
    text_encoder_sd: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    pad: bool = True,
) -> dict[str, torch.Tensor]:
    """Rename diffusers UNet/VAE/CLIP state dicts into the original single-file layout of the
    UNet's family (`pad`: the unused parts such files carry, see `_open_clip_to_ldm`)."""
    family = family_of_unet_config(unet_config)
    out = _convert(unet_sd, _unet_rules(unet_config), UNET_PREFIX, "unet")
    for key, value in _convert(vae_sd, _vae_rules(vae_config), VAE_PREFIX, "vae").items():
        # LDM's VAE attention uses 1x1 convs where diffusers uses Linear: (C, C) -> (C, C, 1, 1).
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[key] = value
    to_ldm, _ = TEXT_LAYOUTS[family.text_layout]
    for key, value in to_ldm(text_encoder_sd, pad).items():
        out[family.text_prefix + key] = value
    return out


# Every name a Hugging Face CLIP text model has (with or without the `text_model.` level).
CLIP_TEXT_KEY = re.compile(
    r"(text_model\.)?(embeddings\.(token_embedding\.weight|position_embedding\.weight|position_ids)"
    r"|final_layer_norm\.(weight|bias)"
    r"|encoder\.layers\.\d+\.(self_attn\.[qkv]_proj|self_attn\.out_proj|layer_norm[12]|mlp\.fc[12])"
    r"\.(weight|bias))"
)


def _check_keys(
    sd: Mapping[str, torch.Tensor], model_class: Any, config: Mapping[str, Any], what: str
) -> None:
    """Raise unless `sd` has exactly the weight names of `model_class(config)`."""
    with torch.device("meta"):  # names and shapes only: no memory, no init cost
        names = set(model_class.from_config(dict(config)).state_dict())
    extra, missing = sorted(set(sd) - names), sorted(names - set(sd))
    if extra or missing:
        example = f"unexpected {extra[0]!r}" if extra else f"missing {missing[0]!r}"
        raise SdloraError(
            f"{what} weights do not fit its config ({len(extra)} unexpected, {len(missing)} "
            f"missing, e.g. {example}); fuse or remove adapters before exporting"
        )


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise SdloraError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")


def save_single_file(
    unet_sd: Mapping[str, torch.Tensor],
    vae_sd: Mapping[str, torch.Tensor],
    text_encoder_sd: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    path: str | Path,
    dtype: str | torch.dtype = "fp16",
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write one original-layout .safetensors checkpoint atomically; refuse to overwrite."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise SdloraError(f"{path}: single-file checkpoints are saved as .safetensors")
    if path.exists() and not overwrite:
        raise SdloraError(f"{path} already exists; choose another name or pass --overwrite")
    target = _parse_dtype(dtype)
    _check_keys(unet_sd, UNet2DConditionModel, unet_config, "unet")
    _check_keys(vae_sd, AutoencoderKL, vae_config, "vae")
    odd = [k for k in text_encoder_sd if not CLIP_TEXT_KEY.fullmatch(k)]
    if odd:
        raise SdloraError(
            f"text encoder weight {odd[0]!r} is not a CLIP text model weight; "
            "fuse or remove adapters before exporting"
        )
    tensors = {}
    for key, value in to_single_file_state_dict(
        unet_sd, vae_sd, text_encoder_sd, unet_config, vae_config
    ).items():
        cast = value.detach().to("cpu", target if value.is_floating_point() else value.dtype)
        if cast.is_floating_point() and not torch.isfinite(cast).all():
            if torch.isfinite(value).all():
                raise SdloraError(
                    f"{path}: {key} is too large for {dtype} (becomes Inf); "
                    "use bf16 or fp32; nothing was written"
                )
            raise SdloraError(f"{path}: {key} has NaN/Inf values; nothing was written")
        tensors[key] = cast.contiguous()
    layout = family_of_unet_config(unet_config).single_file_layout
    info = {"format": "pt", "sdlora_layout": layout, **(metadata or {})}
    atomic_save_file(tensors, path, {k: str(v) for k, v in info.items()})
    return path


def save_pipeline_single_file(
    pipe: StableDiffusionPipeline,
    path: str | Path,
    dtype: str | torch.dtype = "fp16",
    overwrite: bool = False,
) -> Path:
    """Save a plain (adapter-free) pipeline's UNet, VAE and text encoder as one file."""
    return save_single_file(
        pipe.unet.state_dict(),
        pipe.vae.state_dict(),
        pipe.text_encoder.state_dict(),
        pipe.unet.config,
        pipe.vae.config,
        path,
        dtype=dtype,
        overwrite=overwrite,
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or .ckpt file; pickles only through weights_only loading."""
    if not path.is_file():
        raise SdloraError(f"{path}: no such file")
    try:
        if path.suffix.lower() == ".ckpt":
            with warnings.catch_warnings():  # torch warns about odd pickles before it refuses them
                warnings.simplefilter("ignore")
                data: Any = torch.load(path, map_location="cpu", weights_only=True)
        else:
            data = load_file(str(path))
    except (
        SafetensorError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
    ) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SdloraError(f"{path}: not a readable checkpoint ({first})") from None
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]  # Lightning checkpoints nest the weights
    if not isinstance(data, dict):
        raise SdloraError(f"{path}: not a checkpoint (no dictionary of weights inside)")
    state = {k: v for k, v in data.items() if isinstance(k, str) and torch.is_tensor(v)}
    for part in (UNET_PREFIX, VAE_PREFIX):
        if not any(k.startswith(part) for k in state):
            raise SdloraError(
                f"{path}: not a Stable Diffusion 1.x/2.x single-file checkpoint (no {part}* weights)"
            )
    if not any(k.startswith(f.text_prefix) for f in FAMILIES for k in state):
        prefixes = " or ".join(f"{f.text_prefix}* ({f.label})" for f in FAMILIES)
        raise SdloraError(f"{path}: no text encoder weights ({prefixes}); not a checkpoint we read")
    # Old SD 1.x files lack the `text_model.` level under the CLIP text encoder prefix.
    for prefix in (f.text_prefix for f in FAMILIES if f.text_layout == "clip"):
        state = {
            prefix + "text_model." + k[len(prefix) :]
            if k.startswith(prefix) and not k.startswith(prefix + "text_model.")
            else k: v
            for k, v in state.items()
        }
    return state


def _file_family(state: Mapping[str, torch.Tensor]) -> Family:
    """The family whose text-encoder prefix the file's keys use."""
    found = family_of_single_file(state)
    if found is not None:
        return found
    return next(f for f in FAMILIES if any(k.startswith(f.text_prefix) for k in state))


def _text_state(state: Mapping[str, torch.Tensor], family: Family, layers: int) -> dict:
    """The file's text encoder weights under Hugging Face CLIP names (with `text_model.`)."""
    _, from_ldm = TEXT_LAYOUTS[family.text_layout]
    prefix = family.text_prefix
    return from_ldm({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, layers)


def _expected_shapes(folder: Path) -> dict[str, torch.Size]:
    """Original-layout names and shapes of the models the folder's configs describe."""
    unet_config = UNet2DConditionModel.load_config(folder, subfolder="unet", local_files_only=True)
    vae_config = AutoencoderKL.load_config(folder, subfolder="vae", local_files_only=True)
    text_config = CLIPTextConfig.from_pretrained(folder / "text_encoder", local_files_only=True)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        text_encoder = CLIPTextModel(text_config)
    sd = to_single_file_state_dict(
        unet.state_dict(),
        vae.state_dict(),
        text_encoder.state_dict(),
        unet.config,
        vae.config,
        pad=False,  # the unused parts some files carry are not required
    )
    # position_ids is a constant buffer that some files carry and some do not.
    return {k: v.shape for k, v in sd.items() if not k.endswith("position_ids")}


def _mismatches(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size]) -> list[str]:
    return [
        f"{k} missing" if k not in state else f"{k} is {tuple(state[k].shape)}, not {tuple(s)}"
        for k, s in expected.items()
        if k not in state or state[k].shape != s
    ]


def _write_tiny_configs(folder: Path, family: Family) -> None:
    """Write the family's built-in tiny base's configs, tokenizer and scheduler (no weights)."""
    from .tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(family=family.name)
    pipe.save_config(folder)  # model_index.json
    pipe.unet.save_config(folder / "unet")
    pipe.vae.save_config(folder / "vae")
    pipe.text_encoder.config.save_pretrained(folder / "text_encoder")
    pipe.tokenizer.save_pretrained(folder / "tokenizer")
    pipe.scheduler.save_pretrained(folder / "scheduler")


def _build(
    state: dict[str, torch.Tensor], folder: Path, dtype: torch.dtype
) -> StableDiffusionPipeline:
    """Assemble the pipeline: weights from `state`, configs/tokenizer/scheduler from `folder`."""
    # Models are built in fp32 and the weights cast into them; torch_dtype makes diffusers call
    # model.to(dtype), which logs a spurious fp32-modules warning, so pass it only when needed.
    common = dict(config=str(folder), local_files_only=True)
    if dtype != torch.float32:
        common["torch_dtype"] = dtype
    unet = UNet2DConditionModel.from_single_file(state, subfolder="unet", **common)
    vae = AutoencoderKL.from_single_file(state, subfolder="vae", **common)
    text_config = CLIPTextConfig.from_pretrained(folder / "text_encoder", local_files_only=True)
    with init_empty_weights():  # parameters on meta (skips random init), buffers real
        text_encoder = CLIPTextModel(text_config)
    wrapped = any(k.startswith("text_model.") for k in text_encoder.state_dict())
    text_sd = _text_state(state, _file_family(state), text_config.num_hidden_layers)
    if not wrapped:
        text_sd = {k.removeprefix("text_model."): v for k, v in text_sd.items()}
    # assign=True adopts the file's tensors; the caller checked every parameter is there.
    text_encoder.load_state_dict(text_sd, strict=False, assign=True)
    return StableDiffusionPipeline.from_pretrained(
        folder,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder.to(dtype).eval(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        local_files_only=True,
    )


def load_single_file(
    path: str | Path, config: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> StableDiffusionPipeline:
    """Load an original-layout SD 1.x/2.x .safetensors/.ckpt offline; `config` is a diffusers
    folder whose configs, tokenizer and scheduler (so its prediction type) describe the file.

    Without `config` only the built-in tiny bases are recognised (by their tensor shapes).
    """
    path = Path(path)
    state = _read_state_dict(path)
    family = _file_family(state)
    with tempfile.TemporaryDirectory(prefix="sdlora-config-") as scratch:
        if config is None:
            folder = Path(scratch)
            _write_tiny_configs(folder, family)
            if _mismatches(state, _expected_shapes(folder)):
                full = FULL_KEY in state
                kind = (
                    f"a full {family.label} checkpoint"
                    if full
                    else f"not the {family.builtin} base"
                )
                raise SdloraError(
                    f"{path}: {kind}; pass a diffusers model folder with its configs and "
                    "tokenizer (--config DIR)"
                )
        else:
            folder = Path(config)
            if not (folder / "model_index.json").is_file():
                raise SdloraError(
                    f"{folder}: not a diffusers model folder (no model_index.json); pass the "
                    "folder holding model_index.json, unet/, vae/, text_encoder/, tokenizer/"
                )
            try:
                expected = _expected_shapes(folder)
            except (OSError, ValueError, json.JSONDecodeError) as err:
                raise SdloraError(f"{folder}: cannot read its model configs ({err})") from None
            problems = _mismatches(state, expected)
            if problems:
                raise SdloraError(
                    f"{path} does not match the configs in {folder}: {len(problems)} problems, "
                    f"e.g. {problems[0]}; pass the folder of the model this file came from"
                )
        try:
            return _build(state, folder, dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise SdloraError(f"{path}: cannot build a pipeline from it ({first})") from None
