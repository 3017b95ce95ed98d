"""The models of a run: the base in the compute dtype with a trainable adapter injected, the
optimizer and its learning-rate schedule, and restoring them from a checkpoint.

Frozen weights are cast to the compute dtype (bf16/fp16 under mixed precision); the LoRA factors
stay fp32; the VAE stays fp32 (SD VAEs overflow in fp16; in bf16 runs it encodes under autocast).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline
from diffusers.optimization import get_scheduler

from sdlora.bases.base import load_base
from sdlora.bases.families import family_of_pipeline
from sdlora.errors import SdloraError
from sdlora.lora.inject import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_trainable, target_names
from sdlora.lora.layer import LoRAWeights
from sdlora.train import checkpoint, precompile
from sdlora.train.condition import Conditioning
from sdlora.train.config import RESUME_MUST_MATCH, TrainConfig
from sdlora.train.data import BatchPlan, derived_seed
from sdlora.train.encode import long_captions
from sdlora.train.pivotal import NewWords, add_new_words
from sdlora.train.prior import generate_missing
from sdlora.train.speed import (
    compile_options,
    compile_regions,
    cuda_graphs_allowed,
    regions_of,
    speed_up,
    will_compile,
)

logger = logging.getLogger(__name__)

ADAPTER_NAME = "training"  # the adapter's name inside each LoRALayer while training


@dataclass
class Models:
    """A run's models, as the loop uses them."""

    pipe: DiffusionPipeline  # the base, with the adapter injected (for sampling)
    injected: dict[str, LoRAWeights]  # kohya module key -> the trainable factors
    targets: dict[str, list[str]]  # "unet" / "text_encoder" / "text_encoder_2" -> modules adapted
    trained: list[torch.nn.Module]  # the models whose adapter learns (train/eval mode)
    unet: torch.nn.Module  # as accelerate prepared it
    prepared: list[torch.nn.Module]  # `trained`, as accelerate prepared them (UNet first)
    # every text encoder of the family by pipeline attribute; the trained ones as prepared
    text_encoders: dict[str, torch.nn.Module]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    weight_dtype: torch.dtype  # of the frozen UNet and text-encoder weights
    words: NewWords | None = None  # new words trained with the adapter (pivotal tuning)
    compiling: Compiling | None = None  # compile workers still at work (--compile auto)


SERVER_CORES = 2  # CPU threads the fork server's imports may keep busy (one, and a spare)


@contextmanager
def fewer_threads(spare: int):
    """PyTorch's CPU work in the block on `spare` fewer threads. Another busy process of ours
    costs a many-threaded load or cast far more than its cores' share: every parallel part waits
    for its slowest thread (SDXL's load and cast took 19 s instead of 8 beside the fork server's
    imports on a 16-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - spare))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def load_models(
    config: TrainConfig,
    accelerator: Accelerator,
    plan: BatchPlan,
    total_steps: int,
    pipe: DiffusionPipeline | None = None,
    server: precompile.Server | None = None,
) -> Models:
    """Load the base (or take `pipe`), inject the adapter, build optimizer and schedule.

    server: the compile workers' fork server, started earlier (precompile.start_server_for)."""
    main = accelerator.is_main_process
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    # the fork server may still be importing: leave it a core (see fewer_threads)
    with fewer_threads(SERVER_CORES if server is not None else 0):
        if pipe is None:
            pipe = load_base(config.base, config=config.base_config)  # on the CPU, in fp32
        if config.reg_generate:  # the base itself, before any cast or adapter
            pipe.to(accelerator.device)
            generate_missing(pipe, config, accelerator)
        if weight_dtype != torch.float32:
            # cast where the weights are: a base just loaded is still on the CPU, so only the
            # bf16/fp16 copies reach the GPU (SDXL's fp32 UNet and text encoders are 13 GiB)
            cast_frozen(pipe, weight_dtype)
        pipe.to(accelerator.device)
    if accelerator.device.type == "cuda":
        # fp32 copies freed by a cast on the GPU (a pipeline handed in there, or --reg-generate)
        # would stay reserved in PyTorch's cache while the compile workers need memory of their own
        torch.cuda.empty_cache()
    check_sides(pipe, plan)
    too_long = long_captions(pipe.tokenizer, plan.items, config.trigger)
    if too_long and main:
        logger.warning(too_long)

    init = torch.Generator().manual_seed(derived_seed(config.seed, "init"))
    lora_args = dict(
        rank=config.rank,
        alpha=config.alpha,
        nonlinearity=config.nonlinearity,
        dropout=config.dropout,
        name=ADAPTER_NAME,
        generator=init,
        conv_rank=config.conv_rank,
        conv_alpha=config.conv_alpha,
    )
    unet_targets = target_names(config.targets, UNET_TARGETS)
    injected = add_trainable(pipe.unet, "unet", unet_targets, **lora_args)
    trained = [pipe.unet]
    targets = {"unet": list(unet_targets)}
    trained_encoders = text_encoder_names(pipe) if config.train_text_encoder else []
    for component in text_encoder_names(pipe):
        te_targets = ()
        if component in trained_encoders:
            te_targets = target_names(config.text_encoder_targets, TEXT_ENCODER_TARGETS)
            te = getattr(pipe, component)
            injected.update(add_trainable(te, component, te_targets, **lora_args))
            trained.append(te)
        targets[component] = list(te_targets)
    words = add_new_words(pipe, config)
    if words is not None and "text_encoder" not in trained_encoders:
        trained.append(pipe.text_encoder)  # its new words learn
        trained_encoders.append("text_encoder")
    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        for te in trained[1:]:  # transformers 5 renamed gradient_checkpointing_enable
            getattr(te, "activation_checkpointing_enable", te.gradient_checkpointing_enable)()
    device = accelerator.device
    family = family_of_pipeline(pipe).name
    compiling = will_compile(config.compile, device, total_steps, len(plan.by_bucket), family)
    fast = speed_up(pipe.unet, device, compile=False, buckets=len(plan.by_bucket))
    if config.activation_budget < 1 and not compiling and main:
        logger.warning(
            "--activation-budget applies to compiled blocks and this run is not compiled "
            "(--compile %s): every activation is kept; --gradient-checkpointing saves memory "
            "without compiling",
            config.compile,
        )

    optimizer = make_optimizer(config, injected, accelerator.device, words)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.warmup_steps or round(config.lr_warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    prepared = accelerator.prepare(*trained, optimizer)
    unet, optimizer = prepared[0], prepared[-1]
    text_encoders = {name: getattr(pipe, name) for name in text_encoder_names(pipe)}
    text_encoders.update(zip(trained_encoders, prepared[1:-1], strict=True))
    compiling_later = None
    if compiling:
        graphs = cuda_graphs_allowed(config.grad_accum, config.gradient_checkpointing)

        def compile_now(cached: bool) -> str:
            return compile_regions(
                pipe.unet, device, len(plan.by_bucket), graphs, config.activation_budget, cached
            )

        workers = None
        if use_compile_workers(config, device):
            workers, graph_count = start_compile_workers(
                config, pipe, unet, plan, lora_args, weight_dtype, accelerator, graphs, server
            )
        background = config.compile == "auto" and room_for_background(device)
        if workers is not None and workers.count and background:
            compiling_later = Compiling(workers, graph_count, compile_now)
            fast["compile"] = (
                f"{graph_count} graphs in {workers.count} processes, in the background: "
                "the first steps run uncompiled"
            )
        else:
            done = workers.wait() if workers is not None else None
            if done is not None:
                fast["compile workers"] = workers_summary(done, graph_count)
            fast["compile"] = compile_now(cached=done is not None and not done["failed"])
    if main and fast:
        logger.info("speed: %s", ", ".join(f"{k} {v}" for k, v in fast.items()))
    return Models(
        pipe,
        injected,
        targets,
        trained,
        unet,
        list(prepared[:-1]),
        text_encoders,
        optimizer,
        lr_scheduler,
        weight_dtype,
        words,
        compiling_later,
    )


@dataclass
class Compiling:
    """Compile workers at work while the first steps run uncompiled (`--compile auto`): once
    they are `ready`, `switch` compiles the UNet's regions, which then find every graph in the
    compile cache, and says how it went."""

    workers: precompile.Workers
    graphs: int  # distinct graphs the workers compile
    compile: Callable[[bool], str]  # compiles the regions (at their next call); cached?

    def ready(self) -> bool:
        return self.workers.ready()

    def switch(self) -> str:
        done = self.workers.wait()
        if torch.cuda.is_available():  # what the uncompiled steps held goes back to the GPU: the
            torch.cuda.empty_cache()  # CUDA graphs' memory pools come on top of that cache
        compiled = self.compile(not done["failed"])  # all in the cache: nothing to compile
        return f"compile workers {workers_summary(done, self.graphs)}, {compiled}"

    def stop(self) -> None:
        self.workers.stop()


def cast_frozen(pipe, dtype: torch.dtype) -> None:
    """The UNet and text encoders to `dtype` (the VAE stays fp32: it encodes the latents)."""
    # nn.Module.to: diffusers' own .to(dtype) warns about fp32 modules even when there are none
    torch.nn.Module.to(pipe.unet, dtype=dtype)
    for component in text_encoder_names(pipe):
        getattr(pipe, component).to(dtype=dtype)


def text_encoder_names(pipe) -> list[str]:
    """The pipeline attributes of the base's text encoders, as its family lists them."""
    return [te.component for te in family_of_pipeline(pipe).text_encoders]


# --compile auto runs the compile workers beside uncompiled steps only on GPUs with at least this
# much memory; on smaller ones they compile before the first step, as --compile on does. SDXL at
# batch 1 on an H200 (whole commands): the workers took ~11 GiB beside the loaded model (16.6 GiB
# peak of the whole GPU with them) and uncompiled steps 12.8 GiB, so side by side they would
# not fit a 24 GiB card (an estimate from those two figures, not measured together)
BACKGROUND_COMPILE_MIN_GIB = 32


def gpu_memory_gib(device: torch.device) -> float | None:
    """The GPU's total memory in GiB; None for a device that is not a GPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / 2**30


def room_for_background(device: torch.device) -> bool:
    """May the compile workers run beside training steps (see BACKGROUND_COMPILE_MIN_GIB)?"""
    total = gpu_memory_gib(device)
    return total is None or total >= BACKGROUND_COMPILE_MIN_GIB


def use_compile_workers(config: TrainConfig, device: torch.device) -> bool:
    """Compile in parallel worker processes first (see precompile.py)?

    On CUDA, unless SDLORA_COMPILE_WORKERS=0. With gradient checkpointing the workers switch it
    on in their UNet too, so the regions they compile are the training process's own.
    """
    return precompile.workers_wanted() and device.type == "cuda"


def batch_shapes(plan: BatchPlan) -> list[tuple[int, int, int]]:
    """(batch, width, height) of every micro-batch the plan can hand out."""
    shapes = set()
    for (width, height), indices in plan.by_bucket.items():
        shapes.add((min(plan.batch_size, len(indices)), width, height))
        if len(indices) % plan.batch_size:
            shapes.add((len(indices) % plan.batch_size, width, height))
    return sorted(shapes)


def start_compile_workers(
    config, pipe, unet, plan, lora_args, weight_dtype, accelerator, graphs, server=None
) -> tuple[precompile.Workers, int]:
    """Worker processes (forked from `server`, if any) compiling the UNet's regions for every
    batch shape; (them, graph count)."""
    device = accelerator.device
    bare = accelerator.unwrap_model(unet)
    channels_last = bare.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    factor = pipe.vae_scale_factor
    conditioning = Conditioning.of(pipe)
    with torch.no_grad():  # real text embeddings have the shapes and dtype a step sees
        text = conditioning.encode([""], device)
    generator = torch.Generator(device).manual_seed(0)  # its own: the training RNG is untouched
    inputs = []
    for batch, w, h in batch_shapes(plan):
        latent = (batch, bare.config.in_channels, h // factor, w // factor)
        noisy = torch.randn(latent, generator=generator, device=device)
        timesteps = torch.randint(0, 1000, (batch,), generator=generator, device=device)
        sizes = torch.tensor([[h, w]] * batch)
        crops = torch.zeros((batch, 2), dtype=torch.long)
        kwargs = conditioning.unet_kwargs(text.expand(batch), weight_dtype, sizes, crops, (h, w))
        hidden = kwargs["encoder_hidden_states"].clone()
        kwargs["encoder_hidden_states"] = hidden.requires_grad_(config.text_learns)
        inputs.append((noisy.to(weight_dtype, memory_format=layout), timesteps, kwargs))

    def call_unet(noisy, timesteps, kwargs):  # as the prepared UNet runs, without its wrapper
        with accelerator.autocast():
            return bare(noisy, timesteps, **kwargs).sample

    jobs = precompile.record_calls(bare, call_unet, inputs, regions_of(bare))
    shape_args = {k: v for k, v in lora_args.items() if k != "generator"}  # values don't matter
    adapter = precompile.Adapter(tuple(target_names(config.targets, UNET_TARGETS)), **shape_args)
    autocast = weight_dtype if weight_dtype != torch.float32 else None
    options = compile_options(device, graphs)
    checkpointing = config.gradient_checkpointing
    workers = precompile.start_workers(
        bare,
        jobs,
        adapter,
        weight_dtype,
        autocast,
        options,
        checkpointing,
        activation_budget=config.activation_budget,
        server=server,
    )
    return workers, len(jobs)


def workers_summary(done: dict, graphs: int) -> str:
    """What the compile workers did, in a few words."""
    if not done["workers"]:
        return f"{graphs} graphs already in the compile cache"
    failed = f", {done['failed']} failed ({done['error']})" if done["failed"] else ""
    return f"{graphs} graphs in {done['workers']} processes, {done['seconds']:.0f} s{failed}"


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
    config: TrainConfig,
    injected: dict[str, LoRAWeights],
    device: torch.device,
    words: NewWords | None = None,
) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA) or bitsandbytes' 8-bit AdamW, one learning rate per model:
    --lr for the UNet, --text-encoder-lr for the (first) text encoder, --text-encoder-2-lr for
    SDXL's second one (None: --text-encoder-lr), --embedding-lr for new words (pivotal.py; no
    weight decay)."""
    te_lr = config.lr if config.text_encoder_lr is None else config.text_encoder_lr
    te2_lr = te_lr if config.text_encoder_2_lr is None else config.text_encoder_2_lr
    # kohya key prefix -> (group name, as TensorBoard shows its rate under lr/, rate)
    rates = {
        "lora_unet_": ("unet", config.lr),
        "lora_te_": ("text_encoder", te_lr),
        "lora_te1_": ("text_encoder", te_lr),
        "lora_te2_": ("text_encoder_2", te2_lr),
    }
    groups = []
    for prefix, (name, lr) in rates.items():
        params = [p for k, w in injected.items() if k.startswith(prefix) for p in (w.down, w.up)]
        if params or prefix == "lora_unet_":
            groups.append({"params": params, "lr": lr, "name": name})
    if words is not None:
        lr = config.lr if config.embedding_lr is None else config.embedding_lr
        groups.append({"params": [words.parameter], "lr": lr, "weight_decay": 0.0, "name": "words"})
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


def restore(path: Path, config: TrainConfig, models: Models, accelerator: Accelerator) -> int:
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
    if set(state["lora"]) != set(models.injected):
        raise SdloraError(f"{path}: its LoRA modules do not match this run's targets")
    with torch.no_grad():
        for key, weights in models.injected.items():
            weights.down.copy_(state["lora"][key]["down"])
            weights.up.copy_(state["lora"][key]["up"])
    if models.words is not None:
        models.words.load_state(state.get("embeddings", {}), str(path))
    models.optimizer.load_state_dict(state["optimizer"])
    models.lr_scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    return int(state["step"])
