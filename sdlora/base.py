"""Base models: `tiny` (built in), a local diffusers folder, or a single-file SD checkpoint.

Nothing here downloads: every load is local-only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from .errors import SdloraError

BUILTIN = ("tiny",)
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def _quiet(pipe: StableDiffusionPipeline) -> StableDiffusionPipeline:
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder"):
        getattr(pipe, name).eval().requires_grad_(False)
    return pipe


def load_base(
    spec: str = "tiny",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    config: str | Path | None = None,
) -> StableDiffusionPipeline:
    """Load a base model: "tiny", a diffusers model folder, or a single .safetensors/.ckpt file.

    `config` is a diffusers model folder whose configs and tokenizer describe a single file.
    """
    if spec == "tiny":
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
    if dtype is not None or device is not None:
        pipe.to(device=device, dtype=dtype)
    return pipe
