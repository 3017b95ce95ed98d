"""Run set-up, before any model is loaded: the accelerator, the data, the output folder.

Every user mistake in the data or the output folder is found here, so a wrong path costs
seconds, not a model load.
"""

from __future__ import annotations

import json
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
from sdlora.train.data import (
    ENLARGE_WARNING,
    BatchPlan,
    ImageItem,
    discover,
    enlarged_items,
    set_apart,
)
from sdlora.train.finish import OutputPlan, planned_outputs
from sdlora.train.prior import check_reg_folder
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
    check_reg_folder(config)
    items, skipped, data_warnings = discover(config)
    for folder in set_apart(config) if main else ():
        logger.info("%s is inside %s: its images are not training images", folder, config.data_dir)
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
    total_steps = count_steps(config, plan)
    check_embedding_only_steps(config, total_steps)
    resume_from = check_output(config, plan, total_steps)
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


def check_embedding_only_steps(config: TrainConfig, total_steps: int) -> None:
    """--embedding-only-steps must leave the LoRA a step, also when --epochs sets the count."""
    if config.embedding_only_steps and config.embedding_only_steps >= total_steps:
        source = f" (from {{epochs}} {config.epochs})" if config.steps is None else ""
        raise SdloraError(
            f"{config.embedding_only_steps} leaves no step of the {total_steps}{source} for the "
            "LoRA; give fewer",
            setting="embedding_only_steps",
        )


def check_output(config: TrainConfig, plan: BatchPlan, total_steps: int) -> Path | None:
    """Apply the output-folder rules; return the checkpoint to resume from, if any.

    A fresh run refuses a folder holding any file it would write (`finish.planned_outputs`)
    or any checkpoint (its pruning would delete them), unless --overwrite; --resume may
    replace only the files of the run it continues (`resumed_run`).
    """
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise SdloraError(f"{output} is a file; give a folder", setting="output")
    found = checkpoint.checkpoints(output)
    if config.resume is None:
        planned = planned_outputs(config, total_steps)  # refuses clashing word files first
        check_kinds(output, planned)
        if config.overwrite:
            return None
        taken = first_taken(planned)
        if found and (taken is None or taken.parent == output / checkpoint.FOLDER):
            what = f"{len(found)} checkpoint(s)"
        elif taken is not None:
            what = taken.relative_to(output).as_posix()
        else:
            return None
        raise SdloraError(
            f"{output} already holds {what}; {{+resume}} to continue that run, add "
            "{overwrite} to start over, or choose another {output}",
            setting="output",
        )
    if config.resume == "latest":
        if not found:
            raise SdloraError(
                f"found no checkpoint in {output / checkpoint.FOLDER}; run without {{resume}} "
                "to start fresh",
                setting="resume",
            )
        path = found[-1]
    else:
        path = Path(config.resume)
        if not (path / checkpoint.INFO).is_file():
            raise SdloraError(
                f"{path}: not a checkpoint folder; give one of "
                f"{output / checkpoint.FOLDER}/step-* or just {{resume}} for the latest",
                setting="resume",
            )
    step, previous = resumed_run(config, path)
    mine = planned_outputs(config, total_steps, start=step)
    check_kinds(output, mine)
    # TensorBoard only adds event files: a resumed run's logs go beside the earlier ones
    mine = replace(mine, folders=[])
    taken = first_taken(mine, own=planned_outputs(previous, count_steps(previous, plan)))
    if taken is not None:
        raise SdloraError(
            f"{output} already holds {taken.relative_to(output).as_posix()}, which the run "
            f"being resumed did not write, and --resume replaces only that run's files: move "
            "it away, or resume with that run's own {name}, {keep_best} and {sample_every}",
            setting="output",
        )
    return path


# the settings that decide which files a run writes, as a checkpoint records them
OUTPUT_SETTINGS = ("keep_best", "new_tokens", "sample_every", "save_every", "steps", "epochs")


def resumed_run(config: TrainConfig, path: Path) -> tuple[int, TrainConfig]:
    """(step, the settings that decided its files) of the run checkpoint `path` belongs to.

    A checkpoint without its adapter's name (written before sdlora recorded it) counts as
    this run's name."""
    try:
        info = json.loads((path / checkpoint.INFO).read_text(encoding="utf-8"))
        settings = info.get("settings", {})
        step = int(info.get("step", 0))
        name = info.get("adapter_name") or config.adapter_name
        saved = {k: settings[k] for k in OUTPUT_SETTINGS if k in settings}
        return step, replace(config, name=str(name), **saved)
    except (OSError, ValueError, TypeError, AttributeError):
        raise SdloraError(f"{path}: {checkpoint.INFO} cannot be read", setting="resume") from None


def check_kinds(output: Path, plan: OutputPlan) -> None:
    """Refuse, before the run, a folder where the run writes a file or a file where it makes a
    folder (checkpoints, logs, the folders files go in): replacing files never swaps one for
    the other, and a run never stops at its end for want of a folder."""
    parents = [(p, True) for p in plan.parents() if p != output and os.path.lexists(p)]
    for path, folder in [*parents, *plan.existing()]:
        if path.is_dir() != folder:
            kind, wanted = ("a folder", "a file") if path.is_dir() else ("a file", "a folder")
            raise SdloraError(
                f"{output}: {path.relative_to(output).as_posix()} is {kind}, where this run "
                f"writes {wanted}; move it away",
                setting="output",
            )


def first_taken(plan: OutputPlan, own: OutputPlan | None = None) -> Path | None:
    """The first path of `plan` that exists (a folder: that holds something) and is not one
    of `own` (the files of the run being resumed)."""
    for path, _ in plan.existing():
        if own is not None and path in own:
            continue
        if not (path.is_dir() and not any(path.iterdir())):
            return path
    return None


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
DENOISERS = ("unet", "transformer")  # the folders a diffusers model keeps its denoiser in


def folder_resolution(folder: Path | None) -> int | None:
    """UNet sample size × VAE scale factor from a diffusers folder's configs, if both read."""
    import json

    from sdlora.bases.families import config_native_size

    try:  # the UNet's config, or SD 3.x's transformer's
        name = next((n for n in DENOISERS if (folder / n / "config.json").is_file()), "unet")
        unet = json.loads((folder / name / "config.json").read_text(encoding="utf-8"))
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

    for name in DENOISERS:
        found = try_to_load_from_cache(repo_id, f"{name}/config.json")
        if isinstance(found, str) and isinstance(
            try_to_load_from_cache(repo_id, "vae/config.json"), str
        ):
            return Path(found).parent.parent
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    try:
        index = json.loads(Path(hf_hub_download(repo_id, "model_index.json")).read_text("utf-8"))
        denoiser = next((n for n in DENOISERS if n in index), "unet")
        for name in (f"{denoiser}/config.json", "vae/config.json"):
            found = hf_hub_download(repo_id, name)
        return Path(found).parent.parent
    except Exception:  # no network, no such model, a login needed: load_base reports it
        return None


def gpu_free_gib(device: torch.device) -> float | None:
    """Free memory of the GPU `device` in GiB, within any per-process cap this process set
    (torch.cuda.set_per_process_memory_fraction); None for a device that is not a GPU."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if fraction is not None:
        capped = fraction(device) * total - torch.cuda.memory_reserved(device)
        free = min(free, capped)
    return max(0.0, free) / 2**30


def base_family(config: TrainConfig, pipe=None) -> tuple[str, float | None]:
    """(family name, denoiser parameters in millions if known) of the base, without loading it:
    a loaded `pipe` says both; a built-in base is small (a million parameters at most); a
    diffusers folder or cached Hub id says its family in its UNet config, a single file in its
    keys. Anything unknown: SDXL, the largest UNet (the estimate errs on the safe side)."""
    from sdlora.bases.families import (
        SDXL,
        family_of_pipeline,
        family_of_single_file,
        family_of_unet_config,
    )

    if pipe is not None:
        family = family_of_pipeline(pipe)
        denoiser = getattr(pipe, family.denoiser)
        return family.name, sum(p.numel() for p in denoiser.parameters()) / 1e6
    if config.base in BUILTIN:
        from sdlora.bases.families import FAMILIES

        family = next((f for f in FAMILIES if f.builtin == config.base), None)
        return (family.name if family else "sd1"), 1.0
    path = Path(config.base)
    folder = path if path.is_dir() else None
    if folder is None and is_hub_id(config.base):
        folder = hub_configs(config.base)
    if folder is not None:
        try:
            unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
            return family_of_unet_config(unet).name, None
        except (OSError, ValueError, KeyError, TypeError, SdloraError):
            return SDXL.name, None
    if path.is_file():
        family = single_file_family(path, family_of_single_file)
        return (family or SDXL).name, None
    return SDXL.name, None


def fit_to_gpu(
    config: TrainConfig, accelerator: Accelerator, pipe=None, free_gib: float | None = None
):
    """The config with the memory settings left to sdlora chosen (train/memory_plan.py), and the
    planner's `Choice` (None off the GPU, unless `free_gib` says how much there is).

    Settings at their defaults are the planner's to choose: --base-precision auto,
    --blocks-to-swap and --compile-workers unset, --gradient-checkpointing off,
    --activation-budget 1, --grad-accum 1 (the batch may then run as micro-batches). Refuses,
    with the numbers, a run that fits in no way: before any model is loaded."""
    from sdlora.train.compile_plan import cuda_graphs_allowed, room_for_background, will_compile
    from sdlora.train.compiling import gpu_memory_gib
    from sdlora.train.memory_plan import MemoryRequest, plan_memory

    device = accelerator.device
    if free_gib is None:
        free_gib = gpu_free_gib(device)
    if free_gib is None:  # the CPU: nothing to fit; "auto" is full precision, nothing swapped
        swapped = config.blocks_to_swap or 0
        return replace(
            config,
            base_precision="full" if config.base_precision == "auto" else config.base_precision,
            blocks_to_swap=swapped,
            compile="off" if swapped else config.compile,
        ), None
    family, params_m = base_family(config, pipe)
    steps = config.steps if config.epochs is None else None
    steps = steps or (DEFAULT_STEPS if config.epochs is None else 0)  # epochs: assume eager
    compiled = will_compile(config.compile, device, steps, 1, family=family)
    default = TrainConfig.__dataclass_fields__
    request = MemoryRequest(
        family=family,
        params_m=params_m,
        resolution=config.resolution,
        batch=config.batch_size,
        free_gib=free_gib,
        compiled=compiled,
        cuda_graphs=device.type == "cuda"
        and cuda_graphs_allowed(config.grad_accum, config.gradient_checkpointing),
        background=config.compile == "auto" and room_for_background(gpu_memory_gib(device)),
        text_on_gpu=not config.caches_text or bool(config.sample_every) or config.has_validation,
        caches_latents=config.caches_latents,
        base_precision=None if config.base_precision == "auto" else config.base_precision,
        gradient_checkpointing=config.gradient_checkpointing or None,
        activation_budget=(
            None
            if config.activation_budget == default["activation_budget"].default
            else config.activation_budget
        ),
        blocks_to_swap=config.blocks_to_swap,
        compile_workers=config.compile_workers,
        grad_accum=None if config.grad_accum == 1 else config.grad_accum,
    )
    choice = plan_memory(request)
    if accelerator.is_main_process:
        logger.info(choice.describe())
    planned = replace(
        config,
        base_precision="fp8" if choice.fp8 else "full",
        gradient_checkpointing=choice.gradient_checkpointing,
        activation_budget=choice.activation_budget,
        blocks_to_swap=choice.blocks_to_swap,
        batch_size=choice.batch,
        grad_accum=config.grad_accum * choice.grad_accum,
        compile="off" if choice.blocks_to_swap else config.compile,
    )
    if choice.compile_workers is not None:
        planned = replace(planned, compile_workers=choice.compile_workers)
    return planned, choice
