"""Single-file checkpoints in the original Stable Diffusion (LDM / CompVis) layout.

This is the layout AUTOMATIC1111 and ComfyUI read: one file with
`model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and the text encoder where its
family keeps it (`sdlora.bases.families`): SD 1.x `cond_stage_model.transformer.text_model.*` (CLIP,
Hugging Face names), SD 2.x `cond_stage_model.model.*` (OpenCLIP: `transformer.resblocks.N`
with q, k, v fused into `attn.in_proj_weight`), SDXL (Stability's SGM layout) both:
`conditioner.embedders.0.transformer.text_model.*` (CLIP ViT-L) and
`conditioner.embedders.1.model.*` (OpenCLIP ViT-bigG with its `text_projection`). The UNet and
VAE names come from `sdlora.io.ldm_names`, derived from the diffusers configs, so the built-in tiny
bases and full-size models both work. Loading is offline: the file's weights plus a local
diffusers folder's configs and tokenizers.
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
import transformers
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import CLIPTextConfig

from sdlora.bases.families import (
    FAMILIES,
    SD3,
    Family,
    TextEncoder,
    family_of_single_file,
    family_of_unet_config,
)
from sdlora.bases.pipelines import load_options, pipeline_class
from sdlora.errors import SdloraError
from sdlora.io.files import atomic_save_file, check_input, check_output, load_failure
from sdlora.io.ldm_names import convert, unet_rules, vae_rules
from sdlora.io.sd3_single_file import build_sd3, is_sd3_file
from sdlora.io.sd3_single_file import expected_shapes as sd3_expected_shapes

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
FULL_KEY = UNET_PREFIX + "output_blocks.11.0.skip_connection.weight"  # 12 output blocks: full size
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

CLIP_TOP = ("embeddings.", "encoder.", "final_layer_norm.")  # under `text_model.` in files


def _hf_names(text_encoder_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP text weights under `text_model.` (transformers >= 5.6 flattened CLIPTextModel);
    a projection (`text_projection.weight`) stays beside it."""
    return {
        "text_model." + key if key.startswith(CLIP_TOP) else key: value
        for key, value in text_encoder_sd.items()
    }


def _clip_to_ldm(text_sd: Mapping[str, torch.Tensor], pad: bool) -> dict[str, torch.Tensor]:
    """SD 1.x: the Hugging Face CLIP names as they are, under `text_model.`."""
    return _hf_names(text_sd)


def _clip_from_ldm(
    file_sd: Mapping[str, torch.Tensor], layers: int, projection: bool
) -> dict[str, torch.Tensor]:
    # Old files lack the `text_model.` level under the text encoder prefix.
    return _hf_names(file_sd)


# OpenCLIP (SD 2.x, SDXL's second encoder) names of one Hugging Face CLIP encoder layer's children; q, k, v are fused.
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
    """Hugging Face CLIP names -> OpenCLIP's (`transformer.resblocks.N...`).

    SDXL's second encoder is OpenCLIP-bigG whole: every layer, and its projection, whose
    `text_projection` (width, dim) is applied as x @ P where Hugging Face's Linear holds Pᵀ.
    diffusers' SD 2.x text encoder is OpenCLIP's first L-1 of L layers (SD 2.x conditions on the
    penultimate layer) without a projection. With `pad` such a file gets OpenCLIP's full tower as
    SD 2.x files have it, like kohya's: a last block (a copy of the one before; never used, the
    penultimate layer's output is) and an identity `text_projection`, which loaders that build
    the whole OpenCLIP model (A1111, ComfyUI) expect.
    """
    sd = _hf_names(text_sd)
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    projected = "text_projection.weight" in sd
    for key, value in sd.items():
        if key in OPEN_CLIP_TOP:
            out[OPEN_CLIP_TOP[key]] = value
            continue
        if key == "text_projection.weight":  # (dim, width) -> OpenCLIP's (width, dim)
            out["text_projection"] = value.T.contiguous()
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
    if pad and fused and not projected:
        last = max(index for index, _ in fused)
        block = f"transformer.resblocks.{last}."
        for key in [k for k in out if k.startswith(block)]:
            out[key.replace(block, f"transformer.resblocks.{last + 1}.")] = out[key].clone()
        width = out["ln_final.weight"].shape[0]
        out["text_projection"] = torch.eye(width, dtype=out["ln_final.weight"].dtype)
    return out


def _open_clip_from_ldm(
    file_sd: Mapping[str, torch.Tensor], layers: int, projection: bool
) -> dict[str, torch.Tensor]:
    """OpenCLIP names -> Hugging Face CLIP names for a `layers`-layer model, with the projection
    when the model has one (SDXL); the rest is dropped (SD 2.x's unused last block and
    text_projection, logit_scale)."""
    top = {v: k for k, v in OPEN_CLIP_TOP.items()}
    children = {v: k for k, v in OPEN_CLIP_LAYER.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in file_sd.items():
        if key in top:
            out[top[key]] = value
            continue
        if key == "text_projection" and projection:
            out["text_projection.weight"] = value.T.contiguous()
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


# Text-encoder converters by `TextEncoder.layout`: (to the file, from the file).
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
    text_encoder_2_sd: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Rename diffusers UNet/VAE/CLIP state dicts into the original single-file layout of the
    UNet's family (`pad`: the unused parts such files carry, see `_open_clip_to_ldm`); SDXL
    needs its second text encoder's too."""
    family = family_of_unet_config(unet_config)
    texts = {"text_encoder": text_encoder_sd, "text_encoder_2": text_encoder_2_sd}
    out = convert(unet_sd, unet_rules(unet_config), UNET_PREFIX, "unet")
    for key, value in convert(vae_sd, vae_rules(vae_config), VAE_PREFIX, "vae").items():
        # LDM's VAE attention uses 1x1 convs where diffusers uses Linear: (C, C) -> (C, C, 1, 1).
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[key] = value
    for encoder in family.text_encoders:
        if texts.get(encoder.component) is None:
            raise SdloraError(f"a {family.label} checkpoint needs the {encoder.component} weights")
        to_ldm, _ = TEXT_LAYOUTS[encoder.layout]
        for key, value in to_ldm(texts[encoder.component], pad).items():
            out[encoder.file_prefix + key] = value
    return out


# Every name a Hugging Face CLIP text model has (with or without the `text_model.` level).
CLIP_TEXT_KEY = re.compile(
    r"(text_model\.)?(embeddings\.(token_embedding\.weight|position_embedding\.weight|position_ids)"
    r"|final_layer_norm\.(weight|bias)"
    r"|encoder\.layers\.\d+\.(self_attn\.[qkv]_proj|self_attn\.out_proj|layer_norm[12]|mlp\.fc[12])"
    r"\.(weight|bias))"
    r"|text_projection\.weight"  # SDXL's second encoder, CLIPTextModelWithProjection
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
    text_encoder_2_sd: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write one original-layout .safetensors checkpoint atomically; refuse to overwrite.
    An SDXL UNet's file needs `text_encoder_2_sd` too."""
    path = check_output(path, overwrite, setting=None, suffix=".safetensors", make_parents=True)
    target = _parse_dtype(dtype)
    _check_keys(unet_sd, UNet2DConditionModel, unet_config, "unet")
    _check_keys(vae_sd, AutoencoderKL, vae_config, "vae")
    odd = [
        k for k in (*text_encoder_sd, *(text_encoder_2_sd or ())) if not CLIP_TEXT_KEY.fullmatch(k)
    ]
    if odd:
        raise SdloraError(
            f"text encoder weight {odd[0]!r} is not a CLIP text model weight; "
            "fuse or remove adapters before exporting"
        )
    tensors = {}
    for key, value in to_single_file_state_dict(
        unet_sd, vae_sd, text_encoder_sd, unet_config, vae_config, True, text_encoder_2_sd
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
    pipe: DiffusionPipeline,
    path: str | Path,
    dtype: str | torch.dtype = "fp16",
    overwrite: bool = False,
) -> Path:
    """Save a plain (adapter-free) pipeline's UNet, VAE and text encoder(s) as one file."""
    second = getattr(pipe, "text_encoder_2", None)
    return save_single_file(
        pipe.unet.state_dict(),
        pipe.vae.state_dict(),
        pipe.text_encoder.state_dict(),
        pipe.unet.config,
        pipe.vae.config,
        path,
        dtype=dtype,
        overwrite=overwrite,
        text_encoder_2_sd=None if second is None else second.state_dict(),
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or .ckpt file; pickles only through weights_only loading."""
    if check_input(path).is_dir():
        raise SdloraError(f"{path} is a folder; give the checkpoint file, or the folder as a base")
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
        raise SdloraError(f"{path}: not a readable checkpoint ({load_failure(err)})") from None
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]  # Lightning checkpoints nest the weights
    if not isinstance(data, dict):
        raise SdloraError(f"{path}: not a checkpoint (no dictionary of weights inside)")
    state = {k: v for k, v in data.items() if isinstance(k, str) and torch.is_tensor(v)}
    for part in (UNET_PREFIX, VAE_PREFIX):
        if not any(k.startswith(part) for k in state):
            raise SdloraError(
                f"{path}: not a Stable Diffusion 1.x/2.x/XL single-file checkpoint (no {part}* "
                "weights)"
            )
    encoders = [enc for f in FAMILIES for enc in f.text_encoders]
    if not any(k.startswith(enc.file_prefix) for enc in encoders for k in state):
        prefixes = " or ".join(f"{f.text_encoders[-1].file_prefix}* ({f.label})" for f in FAMILIES)
        raise SdloraError(f"{path}: no text encoder weights ({prefixes}); not a checkpoint we read")
    # Old SD 1.x files lack the `text_model.` level under the CLIP text encoder prefix.
    for prefix in {enc.file_prefix for enc in encoders if enc.layout == "clip"}:
        state = {
            prefix + "text_model." + k[len(prefix) :]
            if k.startswith(prefix)
            and not k.startswith((prefix + "text_model.", prefix + "text_projection"))
            else k: v
            for k, v in state.items()
        }
    return state


def _file_family(state: Mapping[str, torch.Tensor]) -> Family:
    """The family whose text-encoder prefixes the file's keys use (the most specific first)."""
    found = family_of_single_file(state)
    if found is not None:
        return found
    return next(
        f
        for f in reversed(FAMILIES)
        if any(k.startswith(f.text_encoders[-1].file_prefix) for k in state)
    )


def _is_full_size(state: Mapping[str, torch.Tensor], family: Family) -> bool:
    """True for a file of a real model of the family (its cross-attention width), not a tiny one."""
    return FULL_KEY in state or any(
        k.startswith(UNET_PREFIX)
        and k.endswith("attn2.to_k.weight")
        and v.shape[-1] == family.cross_attention_dim
        for k, v in state.items()
    )


def _text_state(
    state: Mapping[str, torch.Tensor], encoder: TextEncoder, layers: int, projection: bool
) -> dict:
    """The file's weights of one text encoder under Hugging Face CLIP names (with `text_model.`)."""
    _, from_ldm = TEXT_LAYOUTS[encoder.layout]
    prefix = encoder.file_prefix
    inner = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return from_ldm(inner, layers, projection)


def _text_model_class(encoder: TextEncoder) -> type:
    return getattr(transformers, encoder.model_class)


def _expected_shapes(folder: Path) -> dict[str, torch.Size]:
    """Original-layout names and shapes of the models the folder's configs describe."""
    unet_config = UNet2DConditionModel.load_config(folder, subfolder="unet", local_files_only=True)
    vae_config = AutoencoderKL.load_config(folder, subfolder="vae", local_files_only=True)
    family = family_of_unet_config(unet_config)
    texts = {}
    with torch.device("meta"):  # shapes only: no memory, no init cost
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        for enc in family.text_encoders:
            config = CLIPTextConfig.from_pretrained(folder / enc.component, local_files_only=True)
            texts[enc.component] = _text_model_class(enc)(config).state_dict()
    sd = to_single_file_state_dict(
        unet.state_dict(),
        vae.state_dict(),
        texts["text_encoder"],
        unet.config,
        vae.config,
        pad=False,  # the unused parts some files carry are not required
        text_encoder_2_sd=texts.get("text_encoder_2"),
    )
    # position_ids is a constant buffer that some files carry and some do not.
    return {k: v.shape for k, v in sd.items() if not k.endswith("position_ids")}


def _mismatches(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size]) -> list[str]:
    return [
        f"{k} missing" if k not in state else f"{k} is {tuple(state[k].shape)}, not {tuple(s)}"
        for k, s in expected.items()
        if k not in state or state[k].shape != s
    ]


def _write_builtin_configs(folder: Path, name: str) -> None:
    """Write built-in base `name`'s configs, tokenizers and scheduler (no weights): the packaged
    `toy` folder's files, or those of a `tiny` base built from its configs."""
    import shutil

    from sdlora.bases.base import TINY_FAMILIES, TOY_FOLDER

    if name == "toy":
        for file in TOY_FOLDER.rglob("*"):
            if file.is_file() and file.suffix != ".safetensors":
                target = folder / file.relative_to(TOY_FOLDER)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, target)
        return
    from sdlora.bases.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(family=TINY_FAMILIES[name])
    pipe.save_config(folder)  # model_index.json
    for name, part in pipe.components.items():
        if isinstance(part, transformers.PreTrainedModel):
            part.config.save_pretrained(folder / name)
        elif hasattr(part, "save_config"):  # UNet, VAE, scheduler
            part.save_config(folder / name)
        elif part is not None:  # tokenizers
            part.save_pretrained(folder / name)


def _builtin_configs(scratch: Path, state: Mapping[str, torch.Tensor], family: Family):
    """The configs folder (under `scratch`) of the family's built-in base whose shapes the
    file's weights have, or None when it is none of them."""
    for name in family.small_bases.values():
        folder = scratch / name
        _write_builtin_configs(folder, name)
        if not _mismatches(state, _expected_shapes(folder)):
            return folder
    return None


def _build(state: dict[str, torch.Tensor], folder: Path, dtype: torch.dtype) -> DiffusionPipeline:
    """Assemble the pipeline: weights from `state`, configs/tokenizers/scheduler from `folder`."""
    # Models are built in fp32 and the weights cast into them; torch_dtype makes diffusers call
    # model.to(dtype), which logs a spurious fp32-modules warning, so pass it only when needed.
    common = dict(config=str(folder), local_files_only=True)
    if dtype != torch.float32:
        common["torch_dtype"] = dtype
    unet = UNet2DConditionModel.from_single_file(state, subfolder="unet", **common)
    vae = AutoencoderKL.from_single_file(state, subfolder="vae", **common)
    family = family_of_unet_config(unet.config)
    models = dict(unet=unet, vae=vae)
    for enc in family.text_encoders:
        config = CLIPTextConfig.from_pretrained(folder / enc.component, local_files_only=True)
        with init_empty_weights():  # parameters on meta (skips random init), buffers real
            model = _text_model_class(enc)(config)
        names = model.state_dict()
        text_sd = _text_state(
            state, enc, config.num_hidden_layers, "text_projection.weight" in names
        )
        if not any(k.startswith("text_model.") for k in names):  # transformers 5: flat
            text_sd = {k.removeprefix("text_model."): v for k, v in text_sd.items()}
        # assign=True adopts the file's tensors; the caller checked every parameter is there.
        model.load_state_dict(text_sd, strict=False, assign=True)
        models[enc.component] = model.to(dtype).eval()
    cls = pipeline_class(family)
    return cls.from_pretrained(folder, **models, **load_options(cls), local_files_only=True)


def load_single_file(
    path: str | Path, config: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> DiffusionPipeline:
    """Load an original-layout SD 1.x/2.x/XL .safetensors/.ckpt offline; `config` is a diffusers
    folder whose configs, tokenizers and scheduler (so its prediction type) describe the file.

    Without `config` the family's built-in bases are recognised by their tensor shapes (an
    exported `toy` or `tiny` loads back as it is).
    """
    path = Path(path)
    state = _read_state_dict(path)
    if is_sd3_file(state):
        return _load_sd3(path, state, config, dtype)
    family = _file_family(state)
    with tempfile.TemporaryDirectory(prefix="sdlora-config-") as scratch:
        if config is None:
            folder = _builtin_configs(Path(scratch), state, family)
            if folder is None:
                builtins = " or ".join(family.small_bases.values())
                kind = (
                    f"a full {family.label} checkpoint"
                    if _is_full_size(state, family)
                    else f"not a built-in base ({builtins})"
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


def _load_sd3(
    path: Path, state: dict[str, torch.Tensor], config: str | Path | None, dtype: torch.dtype
) -> DiffusionPipeline:
    """An SD 3.x file (sdlora/io/sd3_single_file.py): configs from `config`, or those of the
    built-in `tiny-sd3` when its shapes are the file's; with or without T5 inside."""
    t5 = any(k.startswith(SD3.text_encoders[-1].file_prefix) for k in state)
    with tempfile.TemporaryDirectory(prefix="sdlora-config-") as scratch:
        if config is None:
            folder = Path(scratch) / SD3.builtin
            _write_builtin_configs(folder, SD3.builtin)
            if _mismatches(state, sd3_expected_shapes(folder, t5)):
                raise SdloraError(
                    f"{path}: a full {SD3.label} checkpoint or not the built-in {SD3.builtin}; "
                    "pass a diffusers model folder with its configs and tokenizers (--config DIR)"
                )
        else:
            folder = Path(config)
            if not (folder / "model_index.json").is_file():
                raise SdloraError(
                    f"{folder}: not a diffusers model folder (no model_index.json); pass the "
                    "folder holding model_index.json, transformer/, vae/, text_encoder*/, "
                    "tokenizer*/"
                )
            try:
                problems = _mismatches(state, sd3_expected_shapes(folder, t5))
            except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
                raise SdloraError(f"{folder}: cannot read its model configs ({err})") from None
            if problems:
                raise SdloraError(
                    f"{path} does not match the configs in {folder}: {len(problems)} problems, "
                    f"e.g. {problems[0]}; pass the folder of the model this file came from"
                )
        try:
            return build_sd3(state, folder, dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise SdloraError(f"{path}: cannot build a pipeline from it ({first})") from None
