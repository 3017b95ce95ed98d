"""What a run writes: checkpoints, sample grids, the adapter file with its metadata, the summary."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from sdlora.bases.families import Family
from sdlora.errors import SdloraError
from sdlora.io.writing import written_file
from sdlora.lora.adapter import Adapter
from sdlora.lora.embeddings import embedding_file_names, parse_token_spec, save_embedding_files
from sdlora.lora.inject import collect_adapter
from sdlora.train import checkpoint
from sdlora.train.checkpoint import resume_hint
from sdlora.train.config import TrainConfig
from sdlora.train.data import BatchPlan, dataset_folders
from sdlora.train.models import Models
from sdlora.train.sample import sample_grid

EMBEDDINGS = "embeddings"  # OUTPUT/embeddings/<token>.safetensors: the new words on their own
SAMPLES = "samples"  # OUTPUT/samples/step-NNNNNN.png: sample grids
LOGS = "logs"  # OUTPUT/logs/: TensorBoard event files
STEP_NAME = re.compile(r"^step-(\d{6,})")  # checkpoint.step_name's step number


@dataclass(frozen=True)
class StepFiles:
    """`folder/step-NNNNNN<suffix>` for each step after `start` that is a multiple of `every`,
    and for the last step `total` (none when `every` is 0): what the loop saves or samples.

    Asked by step, not listed: a run of a million steps that samples every step plans a million
    grids, and a check of the folder should cost what the folder holds, not that."""

    folder: Path
    suffix: str  # ".png" for sample grids, "" for checkpoint folders
    every: int
    total: int
    start: int = 0

    def path(self, step: int) -> Path:
        return self.folder / f"{checkpoint.step_name(step)}{self.suffix}"

    def planned(self, step: int) -> bool:
        """Is `step` one this series writes?"""
        return (
            bool(self.every)
            and self.start < step <= self.total
            and (step % self.every == 0 or step == self.total)
        )

    def __iter__(self) -> Iterator[Path]:
        return (self.path(step) for step in every_steps(self.every, self.total, self.start))

    def __contains__(self, path: Path) -> bool:
        match = STEP_NAME.match(path.name)
        step = int(match[1]) if match else -1
        return path.parent == self.folder and self.planned(step) and path == self.path(step)

    def existing(self) -> list[Path]:
        """The planned paths that exist, by step (one listing of the folder)."""
        try:
            names = os.listdir(self.folder) if self.every else []
        except OSError:  # no folder yet (or not a folder: check_kinds names it)
            return []
        found = [p for p in (self.folder / name for name in names) if p in self]
        return sorted(found, key=lambda p: int(STEP_NAME.match(p.name)[1]))


@dataclass(frozen=True)
class OutputPlan:
    """Every path a run writes in --output, in the order a refusal names them (`__iter__`):
    files (the adapter, the best adapter, each new word's embedding), the sample grids, the
    checkpoint folders, then folders it adds files to (TensorBoard's logs)."""

    files: list[Path]
    samples: StepFiles
    checkpoints: StepFiles
    folders: list[Path]

    def __iter__(self) -> Iterator[Path]:
        yield from self.files
        yield from self.samples
        yield from self.checkpoints
        yield from self.folders

    def __contains__(self, path: Path) -> bool:
        return (
            path in self.files
            or path in self.samples
            or path in self.checkpoints
            or path in self.folders
        )

    def parents(self) -> list[Path]:
        """The folders the planned files and folders go in (embeddings/, samples/...)."""
        series = [s.folder for s in (self.samples, self.checkpoints) if s.every]
        return list(dict.fromkeys([*(p.parent for p in self.files), *series]))

    def existing(self) -> Iterator[tuple[Path, bool]]:
        """(path, whether the run makes it a folder) for each planned path that exists (links
        included), in the order of `__iter__`."""
        for path in self.files:
            if os.path.lexists(path):
                yield path, False
        yield from ((path, False) for path in self.samples.existing())
        yield from ((path, True) for path in self.checkpoints.existing())
        for path in self.folders:
            if os.path.lexists(path):
                yield path, True


def planned_outputs(config: TrainConfig, total_steps: int, start: int = 0) -> OutputPlan:
    """What a run from step `start` to `total_steps` writes in --output (see OutputPlan).

    Pure: it reads no file. Two new words that would share an embedding file are refused here.
    """
    output = Path(config.output)
    files = [config.adapter_path]
    if config.keep_best:
        files.append(config.best_path)
    words = [parse_token_spec(spec)[0] for spec in config.new_tokens]
    names = embedding_file_names(words, what="--new-token")
    files += [output / EMBEDDINGS / name for name in names.values()]
    samples = StepFiles(output / SAMPLES, ".png", config.sample_every, total_steps, start)
    folder = output / checkpoint.FOLDER
    checkpoints = StepFiles(folder, "", config.save_every, total_steps, start)
    return OutputPlan(files, samples, checkpoints, [output / LOGS] if config.tensorboard else [])


def every_steps(every: int, total_steps: int, start: int = 0) -> list[int]:
    """The steps after `start` that the loop saves or samples at: each `every`-th and the last
    (none when `every` is 0)."""
    if not every or total_steps <= start:
        return []
    steps = list(range((start // every + 1) * every, total_steps + 1, every))
    return steps if steps and steps[-1] == total_steps else [*steps, total_steps]


def sample_path(output: Path, step: int) -> Path:
    return StepFiles(output / SAMPLES, ".png", 1, step).path(step)


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
    # --output was checked before the run (setup.check_output): these files are the run's own
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
        | ({"magnitude": w.magnitude.detach().cpu()} if w.is_dora else {})
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
    checkpoint.save(
        output, step, state, adapter, config.settings(), config.keep_last, config.adapter_name
    )


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
    with written_file(sample_path(output, step)) as tmp:  # whole or not at all
        grid.save(tmp, format="PNG")
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
        "ss_loraplus_lr_ratio": str(config.loraplus_lr_ratio),
        "ss_loraplus_text_encoder_lr_ratio": str(config.loraplus_text_encoder_lr_ratio),
        "ss_base_model_version": version,
        "ss_v2": str(family.name == "sd2"),
        "sdlora_family": family.name,
        "sdlora_prediction_type": prediction_type,
    }
    tags, folders = dataset_folders(plan.items, Path(config.data_dir), config.trigger)
    meta["ss_tag_frequency"] = json.dumps(tags)  # A1111's "training tags"; distill's prompts
    meta["ss_dataset_dirs"] = json.dumps(folders)
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
