"""The trainer: `train(config) -> Path` fine-tunes a LoRA on a folder of images.

Order of work: check settings, find data, check the output folder (all before any model is
loaded), load the base, inject the adapter, build optimizer and schedule, resume, cache, then the
loop. accelerate handles device, mixed precision, gradient accumulation and multi-process runs
(`accelerate launch`); data is dealt out per process and only the main process writes files.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from sdlora.train import checkpoint
from sdlora.train.config import DEFAULT_STEPS, RESUME_MUST_MATCH, TrainConfig
from sdlora.train.data import (
    ENLARGE_WARNING,
    BatchPlan,
    MicroBatches,
    derived_seed,
    discover,
    enlarged_items,
    possible_captions,
    with_trigger,
)
from sdlora.train.encode import LatentCache, TextCache
from sdlora.train.sample import sample_grid
from sdlora.train.speed import speed_up, will_compile
from sdlora.train.step import TrainStep
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sdlora.base import load_base
from sdlora.errors import SdloraError
from sdlora.files import save_adapter
from sdlora.inject import (
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    add_trainable,
    collect_adapter,
    target_names,
)
from sdlora.layer import LoRAWeights
from sdlora.writing import WriteError

logger = logging.getLogger(__name__)

ADAPTER_NAME = "training"  # the adapter's name inside each LoRALayer while training


def train(
    config: TrainConfig,
    pipe: StableDiffusionPipeline | None = None,
    on_step: Callable[[int], None] | None = None,
) -> Path:
    """Train a LoRA on `config.data_dir`; return the path of the adapter file written.

    `pipe`: an already loaded base to train on instead of loading `config.base` (it is changed
    in place: the adapter is injected and the weights cast). `on_step(step)` is called after
    every optimizer step, without waiting for the GPU.
    """
    config.check()
    accelerator = make_accelerator(config)
    main = accelerator.is_main_process
    output = Path(config.output)

    # --- data and output folder: every user mistake found here, before a model is loaded
    items, skipped = discover(config)
    if skipped and main:
        logger.warning(
            "skipped %d unreadable image file(s) of %d: %s",
            len(skipped),
            len(skipped) + len(items),
            "; ".join(f"{path} ({reason})" for path, reason in skipped),
        )
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
        checkpoint.prepare(output, config.adapter_path, config.overwrite)
    accelerator.wait_for_everyone()

    # --- models: frozen weights in the compute dtype, LoRA factors in fp32
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    if pipe is None:
        pipe = load_base(config.base, device=accelerator.device, config=config.base_config)
    else:
        pipe.to(accelerator.device)
    if weight_dtype != torch.float32:
        # nn.Module.to: diffusers' own .to(dtype) warns about fp32 modules even when there are none
        torch.nn.Module.to(pipe.unet, dtype=weight_dtype)
        pipe.text_encoder.to(dtype=weight_dtype)
        # the VAE stays fp32: SD VAEs overflow in fp16; in bf16 runs it encodes under autocast
    check_sides(pipe, plan)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    init = torch.Generator().manual_seed(derived_seed(config.seed, "init"))
    lora_args = dict(
        rank=config.rank,
        alpha=config.alpha,
        nonlinearity=config.nonlinearity,
        dropout=config.dropout,
        name=ADAPTER_NAME,
        generator=init,
    )
    unet_targets = target_names(config.targets, UNET_TARGETS)
    injected = add_trainable(pipe.unet, "unet", unet_targets, **lora_args)
    te_targets = ()
    trained = [pipe.unet]
    if config.train_text_encoder:
        te_targets = target_names(config.text_encoder_targets, TEXT_ENCODER_TARGETS)
        injected.update(add_trainable(pipe.text_encoder, "text_encoder", te_targets, **lora_args))
        trained.append(pipe.text_encoder)
    targets = {"unet": list(unet_targets), "text_encoder": list(te_targets)}
    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            te = pipe.text_encoder  # transformers 5 renamed gradient_checkpointing_enable
            getattr(te, "activation_checkpointing_enable", te.gradient_checkpointing_enable)()
    compiling = will_compile(
        config.compile, accelerator.device, total_steps - 0, len(plan.by_bucket)
    )
    # CUDA graphs reuse their output memory every step, so gradients must not accumulate
    graphs = config.grad_accum == 1
    fast = speed_up(
        pipe.unet, accelerator.device, compiling, len(plan.by_bucket), cuda_graphs=graphs
    )
    if main and fast:
        logger.info("speed: %s", ", ".join(f"{k} {v}" for k, v in fast.items()))

    # --- optimizer and learning-rate schedule
    optimizer = make_optimizer(config, injected, accelerator.device)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=total_steps,
    )
    prepared = accelerator.prepare(*trained, optimizer)
    unet, optimizer = prepared[0], prepared[-1]
    text_encoder = prepared[1] if config.train_text_encoder else pipe.text_encoder

    step = 0
    if resume_from is not None:
        step = restore(resume_from, config, injected, optimizer, lr_scheduler, accelerator)
        if main:
            logger.info("resumed from %s at step %d", resume_from, step)

    # --- caches: encode each image / caption once when nothing random needs fresh encodes
    dataset = MicroBatches(plan, config, with_pixels=not config.caches_latents)
    latent_cache = text_cache = None
    with torch.no_grad():  # no autocast: the fp32 VAE encodes in fp32
        if config.caches_latents and step < total_steps:
            latent_cache = LatentCache(pipe.vae, dataset, config.seed, show_progress=main)
        if config.caches_text and step < total_steps:
            captions = possible_captions(items, config)
            text_cache = TextCache(pipe.tokenizer, pipe.text_encoder, captions, accelerator.device)
    train_step = TrainStep(
        config,
        accelerator,
        pipe,
        unet,
        text_encoder,
        noise_scheduler,
        optimizer,
        weight_dtype,
        latent_cache,
        text_cache,
    )

    workers = 0
    if dataset.with_pixels:
        workers = config.workers if config.workers is not None else default_workers()
    loader = DataLoader(
        dataset,
        batch_size=None,  # the dataset hands out whole micro-batches
        sampler=range(step * config.grad_accum, total_steps * config.grad_accum),
        num_workers=workers,
        pin_memory=dataset.with_pixels and accelerator.device.type == "cuda",
        persistent_workers=workers > 0,
    )
    sample_prompts = config.sample_prompts or [with_trigger(items[0].caption, config.trigger)]
    writer = open_tensorboard(output, config) if main else None
    images_per_step = config.batch_size * config.grad_accum * accelerator.num_processes
    first_step, started = step, time.perf_counter()
    progress = tqdm(
        total=total_steps,
        initial=step,
        desc="training",
        unit="step",
        disable=not main,
        dynamic_ncols=True,
    )
    for model in trained:
        model.train()  # LoRA dropout and gradient checkpointing act in training mode
    micro_losses: list[torch.Tensor] = []  # this optimizer step's micro-batch losses, on device
    unread = LossLog(accelerator, output, writer, progress)

    try:
        for k, batch in enumerate(loader, start=step * config.grad_accum):
            micro_losses.append(train_step(batch, k))
            if not accelerator.sync_gradients:
                continue

            # --- one optimizer step done
            step += 1
            unread.add(step, torch.stack(micro_losses).mean(), lr_scheduler.get_last_lr())
            micro_losses = []
            lr_scheduler.step()
            progress.update(1)
            if on_step is not None:
                on_step(step)

            last_step = step == total_steps
            save = config.save_every and (step % config.save_every == 0 or last_step)
            sample = config.sample_every and (step % config.sample_every == 0 or last_step)
            if save or sample or last_step or step % config.log_every == 0:
                # the only place the loop waits for the GPU: losses are checked before any save
                seconds = max(time.perf_counter() - started, 1e-9)
                unread.read((step - first_step) * images_per_step / seconds)
            if save:
                if main:
                    meta = adapter_metadata(config, plan, step, total_steps, targets, accelerator)
                    save_checkpoint(
                        output, step, config, injected, optimizer, lr_scheduler, accelerator, meta
                    )
                accelerator.wait_for_everyone()
            if sample:
                if main:
                    progress.set_description("sampling")
                    save_samples(
                        pipe, trained, sample_prompts, config, output, step, writer, accelerator
                    )
                    progress.set_description("training")
                accelerator.wait_for_everyone()
    except BaseException as err:
        progress.close()  # the error message then starts on a line of its own
        if writer is not None:
            writer.close()
        if main and isinstance(err, KeyboardInterrupt):
            logger.warning("stopped at step %d. %s", step, resume_hint(output))
        raise
    progress.close()

    # --- the adapter file, written once, by the main process
    path = config.adapter_path
    accelerator.wait_for_everyone()
    if main:
        meta = adapter_metadata(config, plan, step, total_steps, targets, accelerator)
        try:
            save_adapter(collect_adapter(injected, meta), path, overwrite=True)
        except WriteError as err:  # a full disk at the very end: say where to resume from
            raise SdloraError(f"{err}. {resume_hint(output)}") from err
        if writer is not None:
            writer.close()
        elapsed = time.perf_counter() - started
        done = step - first_step
        logger.info(
            "done: %d steps in %.1f s (%.3g steps/s, %.3g images/s), peak memory %s; adapter: %s",
            done,
            elapsed,
            done / max(elapsed, 1e-9),
            done * images_per_step / max(elapsed, 1e-9),
            peak_memory(accelerator.device),
            path,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return path


class LossLog:
    """Losses of the steps since the last read, kept on the device until `read()` fetches them.

    A read is one host sync for all of them: it stops the run on a non-finite loss, then logs
    each step (a debug line per step, TensorBoard, the progress bar).
    """

    def __init__(self, accelerator: Accelerator, output: Path, writer, progress):
        self.accelerator, self.output, self.writer, self.progress = (
            accelerator,
            output,
            writer,
            progress,
        )
        self.steps: list[int] = []
        self.losses: list[torch.Tensor] = []  # () each, on the device
        self.lrs: list[list[float]] = []

    def add(self, step: int, loss: torch.Tensor, lrs: list[float]) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        self.lrs.append(list(lrs))

    def read(self, rate: float) -> None:
        if not self.steps:
            return
        gathered = self.accelerator.gather(torch.stack(self.losses))  # (processes * n,)
        per_process = gathered.reshape(-1, len(self.steps)).float().cpu()  # the host sync
        finite = torch.isfinite(per_process).all(dim=0)
        if not finite.all():
            bad = int((~finite).nonzero()[0])
            raise SdloraError(
                f"loss became {per_process[:, bad].tolist()} at step {self.steps[bad]}; "
                f"training stopped. {resume_hint(self.output)} "
                "Try a lower --lr, or --mixed-precision no"
            )
        losses = per_process.mean(dim=0).tolist()
        for step, loss, lrs in zip(self.steps, losses, self.lrs, strict=True):
            logger.debug("step %d: loss %.6f, lr %.3g", step, loss, lrs[0])
            if self.writer is not None:
                self.writer.add_scalar("loss", loss, step)
                for i, group_lr in enumerate(lrs):
                    self.writer.add_scalar(f"lr/{['unet', 'text_encoder'][i]}", group_lr, step)
        self.progress.set_postfix(
            loss=f"{losses[-1]:.4f}", lr=f"{self.lrs[-1][0]:.2e}", img_s=f"{rate:.1f}"
        )
        self.steps, self.losses, self.lrs = [], [], []


# ---------------------------------------------------------------- set-up


def resume_hint(output: Path) -> str:
    """Where a stopped run can continue from, as a sentence for the user."""
    last = checkpoint.latest(output)
    if last is None:
        return "No checkpoint was saved yet (see --save-every)."
    return f"The last checkpoint is {last}; run the same command with --resume to continue."


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


def default_workers() -> int:
    """Image-loading processes: half the CPU cores (the other half feed the GPU), 1 to 8."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


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


def check_sides(pipe, plan: BatchPlan) -> None:
    """Every bucket side must survive the VAE and the UNet's downsampling in whole pixels."""
    levels = len(pipe.unet.config.block_out_channels) - 1
    multiple = pipe.vae_scale_factor * 2**levels
    for width, height in plan.by_bucket:
        if width % multiple or height % multiple:
            raise SdloraError(
                f"this base needs image sides that are multiples of {multiple}; "
                f"--resolution gives {width}x{height}"
            )


def make_optimizer(
    config: TrainConfig, injected: dict[str, LoRAWeights], device: torch.device
) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA) or bitsandbytes' 8-bit AdamW; UNet and text-encoder LR apart."""
    unet = [p for k, w in injected.items() if k.startswith("lora_unet_") for p in (w.down, w.up)]
    text = [p for k, w in injected.items() if k.startswith("lora_te_") for p in (w.down, w.up)]
    groups = [{"params": unet, "lr": config.lr}]
    if text:
        te_lr = config.lr if config.text_encoder_lr is None else config.text_encoder_lr
        groups.append({"params": text, "lr": te_lr})
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise SdloraError(
                "--optimizer adamw8bit needs bitsandbytes: pip install 'sdlora[bnb]' "
                "(or use --optimizer adamw)"
            ) from None
        return bnb.optim.AdamW8bit(groups, lr=config.lr, weight_decay=config.weight_decay)
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, fused=fused)


def restore(path, config, injected, optimizer, lr_scheduler, accelerator) -> int:
    """Load a checkpoint into the live run; return its step. Settings must match."""
    info, state = checkpoint.load(Path(path))
    saved = info.get("settings", {})
    wanted = config.settings()
    differ = [k for k in RESUME_MUST_MATCH if k in saved and saved[k] != wanted.get(k)]
    if differ:
        raise SdloraError(
            f"{path} was trained with other settings: "
            + ", ".join(f"{k}={saved[k]!r} (now {wanted.get(k)!r})" for k in differ)
            + "; use the same values to resume"
        )
    if set(state["lora"]) != set(injected):
        raise SdloraError(f"{path}: its LoRA modules do not match this run's targets")
    with torch.no_grad():
        for key, weights in injected.items():
            weights.down.copy_(state["lora"][key]["down"])
            weights.up.copy_(state["lora"][key]["up"])
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    return int(state["step"])


def open_tensorboard(output: Path, config: TrainConfig):
    """A SummaryWriter under output/logs, or None (with a note) when tensorboard is missing."""
    if not config.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.info("TensorBoard logs are off: pip install tensorboard to get them")
        return None
    return SummaryWriter(log_dir=str(output / "logs"))


# ---------------------------------------------------------------- during and after training


def save_checkpoint(output, step, config, injected, optimizer, lr_scheduler, accelerator, meta):
    """Everything needed to continue from `step`, plus the adapter so far.

    The loss read before this was finite, but this step's update came after it: factors that
    are no longer finite are refused here, so the checkpoint to resume from stays a good one.
    """
    lora = {
        key: {"down": w.down.detach().cpu(), "up": w.up.detach().cpu()}
        for key, w in injected.items()
    }
    if not all(torch.isfinite(t).all() for factors in lora.values() for t in factors.values()):
        raise SdloraError(
            f"the adapter's weights stopped being finite at step {step}; training stopped and "
            f"this step was not saved. {resume_hint(output)} Try a lower --lr, or "
            "--mixed-precision no"
        )
    state = {
        "step": step,
        "lora": lora,
        "optimizer": optimizer.state_dict(),
        "scheduler": lr_scheduler.state_dict(),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
    }
    adapter = collect_adapter(injected, meta)
    checkpoint.save(output, step, state, adapter, config.settings(), config.keep_last)


def save_samples(pipe, trained, prompts, config, output, step, writer, accelerator) -> None:
    """Sample grid for the prompts at this step: output/samples/step-NNNNNN.png (+ TensorBoard)."""
    for model in trained:
        model.eval()
    with torch.no_grad(), accelerator.autocast():
        side = config.resolution
        grid = sample_grid(
            pipe,
            prompts,
            config.seed,
            config.sample_steps,
            side,
            side,
            guidance=config.sample_guidance,
        )
    for model in trained:
        model.train()
    folder = output / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    grid.save(folder / f"step-{step:06d}.png")
    if writer is not None:
        import numpy as np

        writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")


def adapter_metadata(config, plan, step, total_steps, targets, accelerator) -> dict[str, str]:
    """Training settings, trigger words, base and targets, plus the kohya `ss_*` keys that apply."""
    settings = config.settings()
    settings.update(steps_done=step, total_steps=total_steps)
    te_lr = config.text_encoder_lr if config.text_encoder_lr is not None else config.lr
    meta = {
        "sdlora_training": json.dumps(settings, sort_keys=True),
        "sdlora_trigger_words": json.dumps([config.trigger] if config.trigger else []),
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
    }
    return meta


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
