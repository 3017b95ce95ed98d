"""Run set-up, before any model is loaded: the accelerator, the data, the output folder.

Every user mistake in the data or the output folder is found here, so a wrong path costs
seconds, not a model load.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from sdlora.bases.base import BUILTIN, is_hub_id
from sdlora.errors import SdloraError
from sdlora.train import checkpoint
from sdlora.train.config import DEFAULT_STEPS, TrainConfig
from sdlora.train.data import ENLARGE_WARNING, BatchPlan, ImageItem, discover, enlarged_items
from sdlora.train.validate import split_items

logger = logging.getLogger(__name__)


@dataclass
class DataRun:
    """What the data and the output folder decide about a run."""

    items: list[ImageItem]  # every training image with its caption and bucket
    plan: BatchPlan  # batches per bucket, dealt out to this process
    total_steps: int  # optimizer steps of the whole run
    resume_from: Path | None  # the checkpoint to continue from, if any
    held_out: list[ImageItem]  # validation images (none without --validation-*)


def has_accelerator_device() -> bool:
    if torch.cuda.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def make_accelerator(config: TrainConfig) -> Accelerator:
    """An Accelerator on the GPU if there is one, else the CPU (multi-process there too)."""
    cpu = not has_accelerator_device()
    precision = config.mixed_precision
    if precision == "auto":
        if cpu:
            precision = "no"
        elif torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            precision = "bf16"
        else:
            precision = "fp16"
    if cpu and precision == "fp16":
        raise SdloraError("--mixed-precision fp16 needs a GPU; use bf16 or no on the CPU")
    # accelerate keeps one process-wide state: let another train() in this Python process pick
    # its own mixed precision (the distributed set-up, in PartialState, is kept as it is)
    AcceleratorState._reset_state()
    # cpu=True also makes accelerate see `accelerate launch`/torchrun processes on a CPU-only
    # machine as one multi-process run instead of several independent ones.
    return Accelerator(
        cpu=cpu, mixed_precision=precision, gradient_accumulation_steps=config.grad_accum
    )


def prepare_data(config: TrainConfig, accelerator: Accelerator) -> DataRun:
    """Find the images, plan the batches, apply the output-folder rules; report what was found.

    The main process then makes the output folder (cleaning what an interrupted run left).
    """
    main = accelerator.is_main_process
    output = Path(config.output)
    items, skipped, data_warnings = discover(config)
    if skipped and main:
        logger.warning(
            "skipped %d unreadable image file(s) of %d: %s",
            len(skipped),
            len(skipped) + len(items),
            "; ".join(f"{path} ({reason})" for path, reason in skipped),
        )
    for warning in data_warnings if main else ():
        logger.warning(warning)
    held_out: list[ImageItem] = []
    if config.validation_split:
        items, held_out = split_items(items, config.validation_split, config.seed)
    elif config.validation_data:
        held_out, _, _ = discover(replace(config, data_dir=config.validation_data))
    plan = BatchPlan(
        items, config.batch_size, config.seed, accelerator.num_processes, accelerator.process_index
    )
    plan.check()
    resume_from = check_output(config)
    enlarged = enlarged_items(items)
    if enlarged and main:
        first = enlarged[0]
        logger.warning(
            "%d of %d images are enlarged %gx or more to reach --resolution %d (e.g. %s, %dx%d "
            "in a %dx%d bucket): a lower --resolution trains faster and loses no detail",
            len(enlarged),
            len(items),
            ENLARGE_WARNING,
            config.resolution,
            first.path,
            *first.size,
            *first.bucket,
        )
    total_steps = count_steps(config, plan)
    if main:
        logger.info(
            "%d images (%d per epoch with repeats) in %d bucket(s); %d steps of %d image(s) x %d "
            "process(es) x %d accumulation",
            len(items),
            plan.images_per_epoch,
            len(plan.by_bucket),
            total_steps,
            config.batch_size,
            accelerator.num_processes,
            config.grad_accum,
        )
        if held_out:
            logger.info("validation: %d held-out image(s)", len(held_out))
        checkpoint.prepare(output, config.adapter_path, config.overwrite)
    accelerator.wait_for_everyone()
    return DataRun(items, plan, total_steps, resume_from, held_out)


def count_steps(config: TrainConfig, plan: BatchPlan) -> int:
    """Optimizer steps for the run: --steps, or --epochs over the data, or the default."""
    if config.steps is not None:
        return config.steps
    if config.epochs is not None:
        return max(1, config.epochs * plan.per_process // config.grad_accum)
    return DEFAULT_STEPS


def check_output(config: TrainConfig) -> Path | None:
    """Apply the output-folder rules; return the checkpoint to resume from, if any."""
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise SdloraError(f"--output {output} is a file; give a folder")
    adapter = config.adapter_path
    found = checkpoint.checkpoints(output)
    if config.resume is None:
        if (adapter.exists() or found) and not config.overwrite:
            what = adapter.name if adapter.exists() else f"{len(found)} checkpoint(s)"
            raise SdloraError(
                f"{output} already holds {what}; pass --resume to continue that run, "
                "--overwrite to start over, or choose another --output"
            )
        return None
    if config.resume == "latest":
        if not found:
            raise SdloraError(
                f"--resume: no checkpoint in {output / checkpoint.FOLDER}; run without --resume "
                "to start fresh"
            )
        return found[-1]
    path = Path(config.resume)
    if not (path / checkpoint.INFO).is_file():
        raise SdloraError(
            f"--resume {path}: not a checkpoint folder; give one of "
            f"{output / checkpoint.FOLDER}/step-* or just --resume for the latest"
        )
    return path


def default_workers() -> int:
    """Image-loading processes: half the CPU cores (the other half feed the GPU), 1 to 8."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def base_resolution(config: TrainConfig, pipe=None) -> int:
    """--resolution's default: the image side the base was made for, read without loading it.

    A loaded `pipe`, a built-in base and a diffusers folder or cached Hub id say it in their
    UNet and VAE configs (sample size × VAE factor: SD 1.5 512, SD 2.1 768, SDXL 1024); a single
    file says its family in its keys (SDXL 1024, SD 1.x 512, SD 2.x from --base-config's UNet,
    else 768). Anything else: 512, the SD default.
    """
    from sdlora.bases.families import SD1, SD2, family_of_single_file
    from sdlora.bases.recommend import native_size, training_start

    if pipe is not None:
        return native_size(pipe)
    if config.base in BUILTIN:
        return training_start(config.base).resolution
    path = Path(config.base)
    if path.is_dir():
        return folder_resolution(path) or SD_RESOLUTION
    if path.is_file():
        family = single_file_family(path, family_of_single_file) or SD1
        described = config_folder(config.base_config) if family is SD2 else None
        return (folder_resolution(described) if described else None) or family.native_size
    if is_hub_id(config.base):
        return folder_resolution(hub_configs(config.base)) or SD_RESOLUTION
    return SD_RESOLUTION


SD_RESOLUTION = 512


def folder_resolution(folder: Path | None) -> int | None:
    """UNet sample size × VAE scale factor from a diffusers folder's configs, if both read."""
    import json

    from sdlora.bases.families import config_native_size

    try:
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        return config_native_size(unet, vae)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def single_file_family(path: Path, family_of_single_file):
    """The family a single-file checkpoint's key names say, from its header only."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return family_of_single_file(f.keys())
    except Exception:  # not safetensors (or damaged): load_base reports it properly
        return None


def config_folder(base_config: str | None) -> Path | None:
    """--base-config as a local folder (a Hub id: its cached configs), if any."""
    if not base_config:
        return None
    if Path(base_config).is_dir():
        return Path(base_config)
    return hub_configs(base_config) if is_hub_id(base_config) else None


def hub_configs(repo_id: str) -> Path | None:
    """The folder holding a Hub model's unet/ and vae/ configs: from the cache, else (online)
    fetched, two small files; None when neither works (load_base then says why)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "unet/config.json")
    if isinstance(found, str) and isinstance(
        try_to_load_from_cache(repo_id, "vae/config.json"), str
    ):
        return Path(found).parent.parent
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    try:
        for name in ("unet/config.json", "vae/config.json"):
            found = hf_hub_download(repo_id, name)
        return Path(found).parent.parent
    except Exception:  # no network, no such model, a login needed: load_base reports it
        return None
