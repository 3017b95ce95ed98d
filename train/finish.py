"""What a run writes: checkpoints, sample grids, the adapter file with its metadata, the summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from sdlora.bases.families import Family
from sdlora.errors import SdloraError
from sdlora.lora.adapter import Adapter
from sdlora.lora.embeddings import save_embedding_files
from sdlora.lora.inject import collect_adapter
from sdlora.train import checkpoint
from sdlora.train.checkpoint import resume_hint
from sdlora.train.config import TrainConfig
from sdlora.train.data import BatchPlan
from sdlora.train.models import Models
from sdlora.train.sample import sample_grid

EMBEDDINGS = "embeddings"  # OUTPUT/embeddings/<token>.safetensors: the new words on their own


def trained_adapter(models: Models, meta: dict[str, str]) -> Adapter:
    """The adapter so far, scale folded, with the run's new words (pivotal tuning) bundled."""
    adapter = collect_adapter(models.injected, meta)
    if models.words is not None:
        adapter.embeddings = models.words.embeddings()
    return adapter


def save_words(output: Path, models: Models) -> list[Path]:
    """The new words as separate embedding files in OUTPUT/embeddings/ (none: nothing)."""
    if models.words is None:
        return []
    return save_embedding_files(models.words.embeddings(), output / EMBEDDINGS, overwrite=True)


def save_checkpoint(
    output: Path,
    step: int,
    config: TrainConfig,
    models: Models,
    accelerator: Accelerator,
    meta: dict[str, str],
) -> None:
    """Everything needed to continue from `step`, plus the adapter so far.

    The loss read before this was finite, but this step's update came after it: factors that
    are no longer finite are refused here, so the checkpoint to resume from stays a good one.
    """
    lora = {
        key: {"down": w.down.detach().cpu(), "up": w.up.detach().cpu()}
        for key, w in models.injected.items()
    }
    words = models.words.state() if models.words is not None else {}
    tensors = [t for factors in lora.values() for t in factors.values()] + list(words.values())
    if not all(torch.isfinite(t).all() for t in tensors):
        raise SdloraError(
            f"the adapter's weights stopped being finite at step {step}; training stopped and "
            f"this step was not saved. {resume_hint(output)} Try a lower {{lr}}, or "
            "{mixed_precision} no"
        )
    state = {
        "step": step,
        "lora": lora,
        "embeddings": words,
        "optimizer": models.optimizer.state_dict(),
        "scheduler": models.lr_scheduler.state_dict(),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
    }
    adapter = trained_adapter(models, meta)
    checkpoint.save(output, step, state, adapter, config.settings(), config.keep_last)


def save_samples(
    models: Models,
    prompts: list[str],
    config: TrainConfig,
    output: Path,
    step: int,
    writer,
    accelerator: Accelerator,
) -> None:
    """Sample grid for the prompts at this step: output/samples/step-NNNNNN.png (+ TensorBoard)."""
    for model in models.trained:
        model.eval()
    with torch.no_grad(), accelerator.autocast():
        side = config.resolution
        grid = sample_grid(
            models.pipe,
            prompts,
            config.seed,
            config.sample_steps,
            side,
            side,
            guidance=config.sample_guidance,
        )
    for model in models.trained:
        model.train()
    folder = output / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    grid.save(folder / f"step-{step:06d}.png")
    if writer is not None:
        import numpy as np

        writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")


def adapter_metadata(
    config: TrainConfig,
    plan: BatchPlan,
    step: int,
    total_steps: int,
    targets: dict[str, list[str]],
    accelerator: Accelerator,
    family: Family,
    prediction_type: str,
) -> dict[str, str]:
    """Training settings, trigger words, base and targets, plus the kohya `ss_*` keys that apply.

    kohya's `ss_base_model_version` is the family's (sd_v1, sd_v2, sdxl_base_v1-0), with "_v"
    after SD 1.x/2.x versions trained for v-prediction (sd_v2_v), as kohya writes it."""
    settings = config.settings()
    settings.update(steps_done=step, total_steps=total_steps)
    te_lr = config.text_encoder_lr if config.text_encoder_lr is not None else config.lr
    version = family.base_model_version
    if prediction_type == "v_prediction" and version.startswith("sd_v"):
        version += "_v"
    meta = {
        "sdlora_training": json.dumps(settings, sort_keys=True),
        "sdlora_trigger_words": json.dumps(trigger_words(config)),
        "sdlora_base_model": config.base,
        "sdlora_targets": json.dumps(targets),
        "ss_sd_model_name": Path(config.base).name,
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_enable_bucket": str(config.buckets),
        "ss_learning_rate": str(config.lr),
        "ss_unet_lr": str(config.lr),
        "ss_text_encoder_lr": str(te_lr if config.train_text_encoder else 0.0),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.warmup_steps),
        "ss_max_train_steps": str(total_steps),
        "ss_steps": str(step),
        "ss_epoch": str(step * config.grad_accum // max(plan.per_process, 1)),
        "ss_num_train_images": str(plan.images_per_epoch),
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_gradient_accumulation_steps": str(config.grad_accum),
        "ss_mixed_precision": accelerator.mixed_precision,
        "ss_seed": str(config.seed),
        "ss_network_dropout": str(config.dropout),
        "ss_noise_offset": str(config.noise_offset),
        "ss_min_snr_gamma": str(config.min_snr_gamma),
        "ss_base_model_version": version,
        "ss_v2": str(family.name == "sd2"),
        "sdlora_family": family.name,
    }
    return meta


def trigger_words(config: TrainConfig) -> list[str]:
    """--trigger and the new words, each once."""
    words = ([config.trigger] if config.trigger else []) + [
        spec.split(":")[0] for spec in config.new_tokens
    ]
    return list(dict.fromkeys(words))


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (GPU)"
    try:
        import resource
    except ImportError:  # Windows
        return "unknown"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss = rss if sys.platform == "darwin" else rss * 1024
    return f"{rss / 2**30:.2f} GiB (process RSS)"
