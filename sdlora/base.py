"""Base models: `tiny` (built in), a local diffusers folder, or a single-file SD checkpoint.

Nothing here downloads: every load is local-only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from .errors import SdloraError
from .recommend import ATTRIBUTE, recommend_builtin

BUILTIN = ("toy", "tiny")
TOY_FOLDER = Path(__file__).parent / "assets" / "toy"  # pretrained by pretrain/toy_base.py
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def _quiet(pipe: StableDiffusionPipeline) -> StableDiffusionPipeline:
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder"):
        getattr(pipe, name).eval().requires_grad_(False)
    return pipe


def _load_toy() -> StableDiffusionPipeline:
    """The built-in `toy` base from its packaged fp16 folder, built from configs, upcast to fp32."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = TOY_FOLDER
    if not (folder / "model_index.json").exists():
        raise SdloraError(f"base 'toy': its weights are missing from {folder}; reinstall sdlora")

    def weights(model: torch.nn.Module, file: Path) -> torch.nn.Module:
        model.load_state_dict(load_file(file))  # copies fp16 into the fp32 parameters
        return model.eval()

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    text_config = CLIPTextConfig.from_json_file(folder / "text_encoder" / "config.json")
    text_encoder = CLIPTextModel(text_config)
    weights(unet, folder / "unet" / "diffusion_pytorch_model.safetensors")
    weights(vae, folder / "vae" / "diffusion_pytorch_model.safetensors")
    weights(text_encoder, folder / "text_encoder" / "model.safetensors")
    tokenizer = CLIPTokenizer(
        str(folder / "tokenizer" / "vocab.json"),
        str(folder / "tokenizer" / "merges.txt"),
        model_max_length=77,
    )
    scheduler = PNDMScheduler.from_config(PNDMScheduler.load_config(folder / "scheduler"))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load_base(
    spec: str = "tiny",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    config: str | Path | None = None,
) -> StableDiffusionPipeline:
    """Load a base model: "toy", "tiny", a diffusers model folder, or a single .safetensors/.ckpt file.

    `config` is a diffusers model folder whose configs and tokenizer describe a single file.
    A built-in base carries its recommended generation settings (see `sdlora.recommend`).
    """
    if spec == "toy":
        pipe = _load_toy()
    elif spec == "tiny":
        from .tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline()
    else:
        path = Path(spec)
        if not path.exists():
            raise SdloraError(
                f"base {spec!r}: no such file or folder; use one of {', '.join(BUILTIN)}, "
                "a diffusers model folder, or a single .safetensors checkpoint"
            )
        if path.is_dir():
            if not (path / "model_index.json").exists():
                raise SdloraError(f"{path}: not a diffusers model folder (no model_index.json)")
            try:
                pipe = StableDiffusionPipeline.from_pretrained(
                    path, local_files_only=True, safety_checker=None, requires_safety_checker=False
                )
            except (OSError, ValueError, KeyError) as err:
                raise SdloraError(f"{path}: cannot load this model folder ({err})") from None
        elif path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            from .single_file import load_single_file

            pipe = load_single_file(path, config=config)
        else:
            raise SdloraError(
                f"{path}: unknown base file type; give a .safetensors checkpoint or a model folder"
            )
    pipe = _quiet(pipe)
    if spec in BUILTIN:
        setattr(pipe, ATTRIBUTE, recommend_builtin(spec, pipe))
    if dtype is not None or device is not None:
        pipe.to(device=device, dtype=dtype)
    return pipe
