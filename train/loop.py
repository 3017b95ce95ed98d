"""The trainer: `train(config) -> Path` fine-tunes a LoRA on a folder of images.

`train` is three parts, in order:
- `set_up`: check settings, find data, check the output folder (all before any model is loaded:
  `setup.py`), load the base, inject the adapter, build optimizer and schedule, compile
  (`models.py`), resume, cache;
- `loop`: micro-batches until the last optimizer step (the step itself: `step.py`), with loss
  reads, checkpoints, validation and samples when they are due;
- `finish`: the adapter file (`finish.py`).
accelerate handles device, mixed precision, gradient accumulation and multi-process runs
(`accelerate launch`); data is dealt out per process and only the main process writes files.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline
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
from sdlora.train.memory_plan import Choice as MemoryChoice
from sdlora.train.memory_plan import latent_chunk_argument as latent_chunk
from sdlora.train.models import Models, effective_lrs, load_models, optimizer_mode, restore
from sdlora.train.precompile import Server, start_server_for
from sdlora.train.prior import PriorImages
from sdlora.train.progress import LossLog, Pace, open_tensorboard
from sdlora.train.sample import SamplePrompt
from sdlora.train.setup import (
    DataRun,
    base_resolution,
    default_workers,
    fit_to_gpu,
    make_accelerator,
    prepare_data,
)
from sdlora.train.step import TrainStep, training_scheduler
from sdlora.train.validate import Validation, Validator

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Run:
    """What the loop works with, as `set_up` made it; `step` counts optimizer steps done."""

    config: TrainConfig
    accelerator: Accelerator
    data: DataRun
    models: Models
    train_step: TrainStep
    validator: Validator | None  # on the main process of a run with held-out images
    loader: DataLoader
    sample_prompts: list  # prompt lines (kohya options read), or SamplePrompts
    writer: Any  # TensorBoard's SummaryWriter, on the main process when --tensorboard
    progress: tqdm
    losses: LossLog  # the steps' losses not yet read from the device
    step: int

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def output(self) -> Path:
        return Path(self.config.output)

    def metadata(self) -> dict[str, str]:
        """The adapter file's metadata, as of the current step."""
        return adapter_metadata(
            config=self.config,
            plan=self.data.plan,
            step=self.step,
            total_steps=self.data.total_steps,
            targets=self.models.targets,
            accelerator=self.accelerator,
            family=family_of_pipeline(self.models.pipe),
            prediction_type=self.train_step.prediction_type,
        )

    def save_adapter_at(self, path: Path, extra: dict[str, str]) -> None:
        save_adapter(trained_adapter(self.models, self.metadata() | extra), path, overwrite=True)


def train(
    config: TrainConfig,
    pipe: DiffusionPipeline | None = None,
    on_step: Callable[[int], None] | None = None,
    compile_server: Server | None = None,
    gpu_free_gib: float | None = None,
) -> Path:
    """Train a LoRA on `config.data_dir`; return the path of the adapter file written.

    `pipe`: an already loaded base to train on instead of loading `config.base` (it is changed
    in place: the adapter is injected and the weights cast). `on_step(step)` is called after
    every optimizer step, without waiting for the GPU. `compile_server`: the compile workers'
    fork server, started by the caller before its heavy imports (precompile.start_server_for);
    else this starts one if the run may need it. Either way it is closed once the models are
    loaded (the workers may have taken it); a caller that passed one closes it too, for a run
    that fails before that. `gpu_free_gib`: the GPU memory the run may use (None: what the GPU
    has free); the memory planner fits the run into it (setup.fit_to_gpu).
    """
    run = set_up(config, pipe, compile_server, gpu_free_gib)
    pace = loop(run, on_step)
    return finish(run, pace)


def set_up(
    config: TrainConfig,
    pipe: DiffusionPipeline | None,
    compile_server: Server | None,
    gpu_free_gib: float | None = None,
) -> Run:
    """Check, find the data, load the models, resume, cache: everything before the first step.

    Every user mistake in data and output folder is found before a model loads."""
    config.check()
    if config.resolution is None:
        config = replace(config, resolution=base_resolution(config, pipe))
    setup_started = time.perf_counter()
    accelerator = make_accelerator(config)
    main = accelerator.is_main_process
    config, memory = fit_to_gpu(config, accelerator, pipe, gpu_free_gib)
    data = prepare_data(config, accelerator)
    data_done = time.perf_counter()
    models = load_models_beside_server(
        config, accelerator, data, pipe=pipe, server=compile_server, memory=memory
    )
    models_done = time.perf_counter()
    step = 0
    if data.resume_from is not None:
        step = restore(data.resume_from, config, models, accelerator)
        if main:
            logger.info("resumed from %s at step %d", data.resume_from, step)
    dataset = MicroBatches(data.plan, config, with_pixels=not config.caches_latents)
    prior = find_prior(config, accelerator)
    conditioning = Conditioning.of(models.pipe, models.text_encoders, config.t5_max_length)
    latent_cache, text_cache = make_caches(
        config,
        data=data,
        models=models,
        conditioning=conditioning,
        dataset=dataset,
        step=step,
        accelerator=accelerator,
        prior=prior,
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
        config=config,
        accelerator=accelerator,
        pipe=models.pipe,
        unet=models.unet,
        trained=models.prepared,
        conditioning=conditioning,
        noise_scheduler=training_scheduler(models.pipe),
        optimizer=models.optimizer,
        weight_dtype=models.weight_dtype,
        latent_cache=latent_cache,
        text_cache=text_cache,
        prior=prior,
    )
    validator = None
    if data.held_out and main:
        held_out = Validation.encode(data.held_out, models.pipe.vae, config)
        validator = Validator(held_out, config, train_step.prediction_type)
    loader = make_loader(
        config, dataset, step=step, total_steps=data.total_steps, accelerator=accelerator
    )
    sample_prompts = [line for _, line in config.sample_prompt_lines()] or [
        SamplePrompt(with_trigger(data.items[0].caption, config.trigger))  # no options read
    ]
    writer = open_tensorboard(Path(config.output), config) if main else None
    progress = tqdm(
        total=data.total_steps,
        initial=step,
        desc="training",
        unit="step",
        disable=not main,
        dynamic_ncols=True,
    )
    lr_names = [group["name"] for group in models.optimizer.param_groups]
    losses = LossLog(
        accelerator, output=Path(config.output), writer=writer, progress=progress, lr_names=lr_names
    )
    return Run(
        config=config,
        accelerator=accelerator,
        data=data,
        models=models,
        train_step=train_step,
        validator=validator,
        loader=loader,
        sample_prompts=sample_prompts,
        writer=writer,
        progress=progress,
        losses=losses,
        step=step,
    )


def load_models_beside_server(
    config: TrainConfig,
    accelerator: Accelerator,
    data: DataRun,
    *,
    pipe: DiffusionPipeline | None,
    server: Server | None,
    memory: MemoryChoice | None = None,
) -> Models:
    """`load_models`, with the compile workers' fork server (started now if none was and the
    run may need it) importing meanwhile; the server is closed after, unless the workers took
    it."""
    if server is None:  # the compile workers' imports, while the base loads
        server = start_server_for(config.compile)
    try:
        return load_models(
            config,
            accelerator,
            plan=data.plan,
            total_steps=data.total_steps,
            pipe=pipe,
            server=server,
            memory=memory,
        )
    finally:
        if server is not None:
            server.close()  # unless the workers took it


def loop(run: Run, on_step: Callable[[int], None] | None) -> Pace:
    """Micro-batches until the last optimizer step; return the run's pace."""
    config, accelerator, models = run.config, run.accelerator, run.models
    # Set-up's objects (models, modules, libraries: about half a million) leave the garbage
    # collector's rounds: compiling and recording CUDA graphs make many short-lived objects, and
    # each full collection would walk them all again
    gc.collect()
    gc.freeze()
    first_step, started = run.step, time.perf_counter()
    images_per_step = config.batch_size * config.grad_accum * accelerator.num_processes
    pace = Pace(images_per_step, first_step, started)
    for model in models.trained:
        model.train()  # LoRA dropout and gradient checkpointing act in training mode
    optimizer_mode(models, train=True)  # schedule-free AdamW steps its training weights
    micro_losses: list[torch.Tensor] = []  # this optimizer step's micro-batch losses, on device
    try:
        for k, batch in enumerate(run.loader, start=run.step * config.grad_accum):
            micro_losses.append(run.train_step(batch, k))
            if not accelerator.sync_gradients:
                continue

            # --- one optimizer step done
            run.step += 1
            step = run.step
            lr = effective_lrs(models)  # Prodigy's: d × lr
            run.losses.add(step, torch.stack(micro_losses).mean(), lr)
            micro_losses = []
            models.lr_scheduler.step()
            run.progress.update(1)
            if models.compiling is not None and models.compiling.ready():
                switch_to_compiled(run)
            if on_step is not None:
                on_step(step)

            last_step = step == run.data.total_steps
            save = config.save_every and (step % config.save_every == 0 or last_step)
            sample = config.sample_every and (step % config.sample_every == 0 or last_step)
            first = step == first_step + 1  # read at once: start-up is timed apart
            if save or sample or last_step or first or step % config.log_every == 0:
                # the only place the loop waits for the GPU: losses are checked before any save
                run.losses.read(pace.mark(step, time.perf_counter()))
            held_out = run.data.held_out and (step % config.validate_every == 0 or last_step)
            if save or held_out or sample:
                optimizer_mode(models, train=False)  # schedule-free: its averaged weights
                if save:
                    checkpoint(run)
                if held_out:
                    validate(run)
                if sample:
                    samples(run)
                optimizer_mode(models, train=True)
    except BaseException as err:
        stopped(run, err)
        raise
    finally:
        gc.unfreeze()
        if models.compiling is not None:  # the run ended before the workers: they stop here
            models.compiling.stop()
    run.progress.close()
    return pace


def switch_to_compiled(run: Run) -> None:
    """--compile auto: the workers are done; the next step runs compiled."""
    done = run.models.compiling.switch()
    run.models.compiling = None
    if run.main:
        logger.info("speed: compiled from step %d on: %s", run.step + 1, done)


def checkpoint(run: Run) -> None:
    """A checkpoint of the run at this step (main process), every process waiting for it."""
    if run.main:
        save_checkpoint(
            output=run.output,
            step=run.step,
            config=run.config,
            models=run.models,
            accelerator=run.accelerator,
            meta=run.metadata(),
        )
    run.accelerator.wait_for_everyone()


def validate(run: Run) -> None:
    """The validation loss now (main process), logged, shown and kept when best."""
    if run.validator is not None:
        loss = run.validator(
            run.step,
            models=run.models,
            accelerator=run.accelerator,
            scheduler=run.train_step.noise_scheduler,
            save_adapter_at=run.save_adapter_at,
        )
        logger.info("step %d: validation loss %.6f", run.step, loss)
        run.losses.shown["val"] = f"{loss:.4f}"
        if run.writer is not None:
            run.writer.add_scalar("loss/validation", loss, run.step)
    run.accelerator.wait_for_everyone()


def samples(run: Run) -> None:
    """Sample images of the adapter now (main process), every process waiting for them."""
    if run.main:
        run.progress.set_description("sampling")
        save_samples(
            run.models,
            run.sample_prompts,
            config=run.config,
            output=run.output,
            step=run.step,
            writer=run.writer,
            accelerator=run.accelerator,
        )
        run.progress.set_description("training")
    run.accelerator.wait_for_everyone()


def stopped(run: Run, err: BaseException) -> None:
    """The loop stopped on an error: close the progress bar (the message then starts on a line
    of its own) and TensorBoard; after Ctrl-C, say where to resume from."""
    run.progress.close()
    if run.writer is not None:
        run.writer.close()
    if run.main and isinstance(err, KeyboardInterrupt):
        logger.warning("stopped at step %d. %s", run.step, fill(resume_hint(run.output), flag))


def finish(run: Run, pace: Pace) -> Path:
    """The adapter file (and new words' embeddings), written once by the main process; the
    run's summary in the log. Returns the adapter file's path."""
    path = run.config.adapter_path
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    optimizer_mode(run.models, train=False)  # schedule-free AdamW: its averaged weights
    if run.main:
        try:
            save_adapter(trained_adapter(run.models, run.metadata()), path, overwrite=True)
            for file in save_words(run.output, run.models):
                logger.info("new word's embedding: %s", file)
        except WriteError as err:  # a full disk at the very end: say where to resume from
            raise SdloraError(f"{err}. {resume_hint(run.output)}") from err
        if run.writer is not None:
            run.writer.close()
        if run.validator is not None and run.validator.last is not None:
            logger.info("%s", run.validator.summary())
        logger.info(
            "done: %s, peak memory %s; adapter: %s",
            pace.summary(run.step, time.perf_counter()),
            peak_memory(accelerator.device),
            path,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return path


def find_prior(config: TrainConfig, accelerator: Accelerator) -> PriorImages | None:
    """The class images of prior preservation (--reg-data), this process's share; else None."""
    if not config.reg_data:
        return None
    prior = PriorImages.find(config, accelerator.num_processes, accelerator.process_index)
    if accelerator.is_main_process:
        logger.info("regularization: %d class image(s) from %s", len(prior.images), config.reg_data)
    return prior


def make_caches(
    config: TrainConfig,
    *,
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
                models.pipe.vae,
                dataset,
                config.seed,
                show_progress=accelerator.is_main_process,
                **latent_chunk(models.memory, config.resolution),
            )
        if config.caches_text:
            captions = possible_captions(data.items, config)
            captions += prior.captions if prior is not None else []
            text_cache = TextCache(conditioning, captions, accelerator.device)
    park_frozen(
        config, models, latent_cache=latent_cache, text_cache=text_cache, accelerator=accelerator
    )
    return latent_cache, text_cache


def park_frozen(
    config: TrainConfig, models: Models, *, latent_cache, text_cache, accelerator
) -> None:
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
    config: TrainConfig, dataset: MicroBatches, *, step: int, total_steps: int, accelerator
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
