"""The trainer: `train(config) -> Path` fine-tunes a LoRA on a folder of images.

Order of work: check settings, find data, check the output folder (all before any model is
loaded: `setup.py`), load the base, inject the adapter, build optimizer and schedule
(`models.py`), resume, cache, then the loop (here), then the adapter file (`finish.py`).
accelerate handles device, mixed precision, gradient accumulation and multi-process runs
(`accelerate launch`); data is dealt out per process and only the main process writes files.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler, DiffusionPipeline
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sdlora.bases.families import family_of_pipeline
from sdlora.errors import SdloraError, fill, flag
from sdlora.io.files import save_adapter
from sdlora.io.writing import WriteError
from sdlora.train.checkpoint import resume_hint
from sdlora.train.condition import Conditioning
from sdlora.train.config import TrainConfig
from sdlora.train.data import MicroBatches, possible_captions, with_trigger
from sdlora.train.encode import LatentCache, TextCache
from sdlora.train.finish import (
    adapter_metadata,
    peak_memory,
    save_checkpoint,
    save_samples,
    save_words,
    trained_adapter,
)
from sdlora.train.models import Models, load_models, restore
from sdlora.train.precompile import Server, start_server_for
from sdlora.train.prior import PriorImages
from sdlora.train.progress import LossLog, Pace, open_tensorboard
from sdlora.train.setup import (
    DataRun,
    base_resolution,
    default_workers,
    make_accelerator,
    prepare_data,
)
from sdlora.train.step import TrainStep
from sdlora.train.validate import Validation, Validator

logger = logging.getLogger(__name__)


def train(
    config: TrainConfig,
    pipe: DiffusionPipeline | None = None,
    on_step: Callable[[int], None] | None = None,
    compile_server: Server | None = None,
) -> Path:
    """Train a LoRA on `config.data_dir`; return the path of the adapter file written.

    `pipe`: an already loaded base to train on instead of loading `config.base` (it is changed
    in place: the adapter is injected and the weights cast). `on_step(step)` is called after
    every optimizer step, without waiting for the GPU. `compile_server`: the compile workers'
    fork server, started by the caller before its heavy imports (precompile.start_server_for);
    else this starts one if the run may need it. Either way it is closed once the models are
    loaded (the workers may have taken it); a caller that passed one closes it too, for a run
    that fails before that.
    """
    # --- set-up: every user mistake in data and output folder is found before a model loads
    config.check()
    if config.resolution is None:
        config = replace(config, resolution=base_resolution(config, pipe))
    setup_started = time.perf_counter()
    accelerator = make_accelerator(config)
    main = accelerator.is_main_process
    output = Path(config.output)
    data = prepare_data(config, accelerator)
    data_done = time.perf_counter()
    if compile_server is None:  # the compile workers' imports, while the base loads
        compile_server = start_server_for(config.compile)
    try:
        models = load_models(config, accelerator, data.plan, data.total_steps, pipe, compile_server)
    finally:
        if compile_server is not None:
            compile_server.close()  # unless the workers took it
    models_done = time.perf_counter()
    step = 0
    if data.resume_from is not None:
        step = restore(data.resume_from, config, models, accelerator)
        if main:
            logger.info("resumed from %s at step %d", data.resume_from, step)
    dataset = MicroBatches(data.plan, config, with_pixels=not config.caches_latents)
    prior = None
    if config.reg_data:
        prior = PriorImages.find(config, accelerator.num_processes, accelerator.process_index)
        if main:
            logger.info(
                "regularization: %d class image(s) from %s", len(prior.images), config.reg_data
            )
    conditioning = Conditioning.of(models.pipe, models.text_encoders)
    latent_cache, text_cache = make_caches(
        config, data, models, conditioning, dataset, step, accelerator, prior
    )
    if main:
        logger.info(
            "set-up took %.1f s: data %.1f s, models %.1f s, caches %.1f s",
            time.perf_counter() - setup_started,
            data_done - setup_started,
            models_done - data_done,
            time.perf_counter() - models_done,
        )
    train_step = TrainStep(
        config,
        accelerator,
        models.pipe,
        models.unet,
        models.prepared,
        conditioning,
        DDPMScheduler.from_config(models.pipe.scheduler.config),
        models.optimizer,
        models.weight_dtype,
        latent_cache,
        text_cache,
        prior,
    )
    validator = None
    if data.held_out and main:
        held_out = Validation.encode(data.held_out, models.pipe.vae, config)
        validator = Validator(held_out, config, train_step.prediction_type)
    loader = make_loader(config, dataset, step, data.total_steps, accelerator)
    sample_prompts = config.sample_prompts or [with_trigger(data.items[0].caption, config.trigger)]
    writer = open_tensorboard(output, config) if main else None
    images_per_step = config.batch_size * config.grad_accum * accelerator.num_processes
    progress = tqdm(
        total=data.total_steps,
        initial=step,
        desc="training",
        unit="step",
        disable=not main,
        dynamic_ncols=True,
    )
    lr_names = [group["name"] for group in models.optimizer.param_groups]
    unread = LossLog(accelerator, output, writer, progress, lr_names)

    def metadata() -> dict[str, str]:
        return adapter_metadata(
            config,
            data.plan,
            step,
            data.total_steps,
            models.targets,
            accelerator,
            family_of_pipeline(models.pipe),
            train_step.prediction_type,
        )

    def save_adapter_at(path: Path, extra: dict[str, str]) -> None:
        save_adapter(trained_adapter(models, metadata() | extra), path, overwrite=True)

    # --- the loop: micro-batches until the last optimizer step
    # Set-up's objects (models, modules, libraries: about half a million) leave the garbage
    # collector's rounds: compiling and recording CUDA graphs make many short-lived objects, and
    # each full collection would walk them all again
    gc.collect()
    gc.freeze()
    first_step, started = step, time.perf_counter()
    pace = Pace(images_per_step, first_step, started)
    for model in models.trained:
        model.train()  # LoRA dropout and gradient checkpointing act in training mode
    micro_losses: list[torch.Tensor] = []  # this optimizer step's micro-batch losses, on device
    try:
        for k, batch in enumerate(loader, start=step * config.grad_accum):
            micro_losses.append(train_step(batch, k))
            if not accelerator.sync_gradients:
                continue

            # --- one optimizer step done
            step += 1
            unread.add(step, torch.stack(micro_losses).mean(), models.lr_scheduler.get_last_lr())
            micro_losses = []
            models.lr_scheduler.step()
            progress.update(1)
            if models.compiling is not None and models.compiling.ready():
                # --compile auto: the workers are done; the next step runs compiled
                done = models.compiling.switch()
                models.compiling = None
                if main:
                    logger.info("speed: compiled from step %d on: %s", step + 1, done)
            if on_step is not None:
                on_step(step)

            last_step = step == data.total_steps
            save = config.save_every and (step % config.save_every == 0 or last_step)
            sample = config.sample_every and (step % config.sample_every == 0 or last_step)
            first = step == first_step + 1  # read at once: start-up is timed apart
            if save or sample or last_step or first or step % config.log_every == 0:
                # the only place the loop waits for the GPU: losses are checked before any save
                unread.read(pace.mark(step, time.perf_counter()))
            if save:
                if main:
                    save_checkpoint(output, step, config, models, accelerator, metadata())
                accelerator.wait_for_everyone()
            if data.held_out and (step % config.validate_every == 0 or last_step):
                if validator is not None:
                    loss = validator(
                        step, models, accelerator, train_step.noise_scheduler, save_adapter_at
                    )
                    logger.info("step %d: validation loss %.6f", step, loss)
                    unread.shown["val"] = f"{loss:.4f}"
                    if writer is not None:
                        writer.add_scalar("loss/validation", loss, step)
                accelerator.wait_for_everyone()
            if sample:
                if main:
                    progress.set_description("sampling")
                    save_samples(models, sample_prompts, config, output, step, writer, accelerator)
                    progress.set_description("training")
                accelerator.wait_for_everyone()
    except BaseException as err:
        progress.close()  # the error message then starts on a line of its own
        if writer is not None:
            writer.close()
        if main and isinstance(err, KeyboardInterrupt):
            logger.warning("stopped at step %d. %s", step, fill(resume_hint(output), flag))
        raise
    finally:
        gc.unfreeze()
        if models.compiling is not None:  # the run ended before the workers: they stop here
            models.compiling.stop()
    progress.close()

    # --- finishing: the adapter file, written once, by the main process
    path = config.adapter_path
    accelerator.wait_for_everyone()
    if main:
        try:
            save_adapter(trained_adapter(models, metadata()), path, overwrite=True)
            for file in save_words(output, models):
                logger.info("new word's embedding: %s", file)
        except WriteError as err:  # a full disk at the very end: say where to resume from
            raise SdloraError(f"{err}. {resume_hint(output)}") from err
        if writer is not None:
            writer.close()
        if validator is not None and validator.last is not None:
            logger.info("%s", validator.summary())
        logger.info(
            "done: %s, peak memory %s; adapter: %s",
            pace.summary(step, time.perf_counter()),
            peak_memory(accelerator.device),
            path,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return path


def make_caches(
    config: TrainConfig,
    data: DataRun,
    models: Models,
    conditioning: Conditioning,
    dataset: MicroBatches,
    step: int,
    accelerator: Accelerator,
    prior: PriorImages | None = None,
) -> tuple[LatentCache | None, TextCache | None]:
    """Encode each image / caption once, when nothing random needs fresh encodes every step."""
    latent_cache = text_cache = None
    if step >= data.total_steps:
        return None, None
    with torch.no_grad():  # no autocast: the fp32 VAE encodes in fp32
        if config.caches_latents:
            latent_cache = LatentCache(
                models.pipe.vae, dataset, config.seed, show_progress=accelerator.is_main_process
            )
        if config.caches_text:
            captions = possible_captions(data.items, config)
            captions += prior.captions if prior is not None else []
            text_cache = TextCache(conditioning, captions, accelerator.device)
    park_frozen(config, models, latent_cache, text_cache, accelerator)
    return latent_cache, text_cache


def park_frozen(config: TrainConfig, models: Models, latent_cache, text_cache, accelerator):
    """Move frozen models the rest of the run never calls to the CPU, freeing GPU memory (SDXL's
    text encoders: 1.6 GB in bf16): the text encoders when their outputs are cached, the VAE
    when the latents are; not when samples or validation need them later."""
    if accelerator.device.type == "cpu" or config.sample_every or config.has_validation:
        return
    parked = []
    if text_cache is not None:
        for name, encoder in models.text_encoders.items():
            encoder.to("cpu")
            parked.append(name)
    if latent_cache is not None and not config.reg_data:
        models.pipe.vae.to("cpu")
        parked.append("vae")
    if parked:
        torch.cuda.empty_cache()
        if accelerator.is_main_process:
            logger.info("frozen and cached, moved to the CPU: %s", ", ".join(parked))


def make_loader(
    config: TrainConfig, dataset: MicroBatches, step: int, total_steps: int, accelerator
) -> DataLoader:
    """Micro-batches from `step` on; worker processes only when images are decoded each step."""
    workers = 0
    if dataset.with_pixels:
        workers = config.workers if config.workers is not None else default_workers()
    return DataLoader(
        dataset,
        batch_size=None,  # the dataset hands out whole micro-batches
        sampler=range(step * config.grad_accum, total_steps * config.grad_accum),
        num_workers=workers,
        pin_memory=dataset.with_pixels and accelerator.device.type == "cuda",
        persistent_workers=workers > 0,
    )
