"""The models of a run: the base in the compute dtype with a trainable adapter injected, the
optimizer and its learning-rate schedule, and restoring them from a checkpoint.

Frozen weights are cast to the compute dtype (bf16/fp16 under mixed precision); the LoRA factors
stay fp32; the VAE stays fp32 (SD VAEs overflow in fp16; in bf16 runs it encodes under autocast).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline
from diffusers.optimization import get_scheduler

from sdlora.bases.base import check_t5_optional, load_base
from sdlora.bases.families import family_of_pipeline
from sdlora.errors import SdloraError
from sdlora.lora.adapter import PREFIXES
from sdlora.lora.fp8 import store_in_fp8
from sdlora.lora.inject import (
    TEXT_ENCODER_TARGETS,
    add_trainable,
    denoiser_targets,
    target_names,
)
from sdlora.lora.layer import LoRAWeights
from sdlora.train import checkpoint, precompile
from sdlora.train.compile_plan import CompilePlan
from sdlora.train.compiling import Compiling, beside_server, compile_choice, start_compiling
from sdlora.train.config import RESUME_MUST_MATCH, TrainConfig
from sdlora.train.data import BatchPlan, derived_seed
from sdlora.train.encode import long_captions
from sdlora.train.memory_plan import Choice as MemoryChoice
from sdlora.train.pivotal import NewWords, add_new_words
from sdlora.train.prior import generate_missing
from sdlora.train.speed import speed_up
from sdlora.train.swap import BlockSwap, swap_blocks

logger = logging.getLogger(__name__)

ADAPTER_NAME = "training"  # the adapter's name inside each LoRALayer while training


@dataclass(kw_only=True)
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
    memory: MemoryChoice | None = None  # what the memory planner chose (setup.fit_to_gpu)
    swap: BlockSwap | None = None  # blocks kept on the CPU (--blocks-to-swap)


def load_models(
    config: TrainConfig,
    accelerator: Accelerator,
    *,
    plan: BatchPlan,
    total_steps: int,
    pipe: DiffusionPipeline | None = None,
    server: precompile.Server | None = None,
    memory: MemoryChoice | None = None,
) -> Models:
    """Load the base (or take `pipe`), inject the adapter, build optimizer and schedule, compile.

    server: the compile workers' fork server, started earlier (precompile.start_server_for);
    memory: the memory planner's choice (setup.fit_to_gpu), whose settings `config` carries."""
    main = accelerator.is_main_process
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    pipe = base_on_device(config, accelerator, pipe, weight_dtype=weight_dtype, server=server)
    check_sides(pipe, plan)
    too_long = long_captions(pipe.tokenizer, plan.items, config.trigger)
    if too_long and main:
        logger.warning(too_long)
    if getattr(pipe, "text_encoder_3", None) is not None:  # SD 3.x's T5 keeps --t5-max-length
        t5 = long_captions(pipe.tokenizer_3, plan.items, config.trigger, config.t5_max_length, "T5")
        if t5 and main:
            logger.warning("%s (or raise --t5-max-length)", t5)

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
        dora=config.dora,
    )
    injected, trained, targets, trained_encoders = inject_adapter(pipe, config, lora_args)
    words = add_new_words(pipe, config)
    if words is not None and "text_encoder" not in trained_encoders:
        trained.append(pipe.text_encoder)  # its new words learn
        trained_encoders.append("text_encoder")
    if config.gradient_checkpointing:
        denoiser_of(pipe).enable_gradient_checkpointing()
        for te in trained[1:]:  # transformers 5 renamed gradient_checkpointing_enable
            getattr(te, "activation_checkpointing_enable", te.gradient_checkpointing_enable)()
    buckets = len(plan.by_bucket)
    family = family_of_pipeline(pipe)
    if family.denoiser == "unet":
        choice = compile_choice(
            config, device, steps=total_steps, buckets=buckets, family=family.name
        )
        choice = fit_compile_choice(choice, config, memory)
        fast = speed_up(pipe.unet, device, compile=False, buckets=buckets)
    else:  # compiled regions, compile workers and the kernel pick are the UNet's
        choice, fast = CompilePlan(compile=False, warning=not_compiled(config, family)), {}
    if choice.warning and main:
        logger.warning(choice.warning)

    optimizer = make_optimizer(config, injected, device, words, denoiser=family.denoiser)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.warmup_steps or round(config.lr_warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    prepared = accelerator.prepare(*trained, optimizer)
    unet, optimizer = prepared[0], prepared[-1]
    swap = swap_blocks(denoiser_of(pipe), config.blocks_to_swap or 0, device)
    if swap is not None:
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the swapped blocks' GPU copies
        if main:
            logger.info(
                "blocks swapped: %d of %d transformer blocks in CPU memory",
                len(swap.swapped),
                len(swap.order),
            )
    text_encoders = {name: getattr(pipe, name) for name in text_encoder_names(pipe)}
    text_encoders.update(zip(trained_encoders, prepared[1:-1], strict=True))
    compiling, compiled = start_compiling(
        choice,
        config=config,
        pipe=pipe,
        unet=unet,
        accelerator=accelerator,
        plan=plan,
        lora_args=lora_args,
        weight_dtype=weight_dtype,
        server=server,
    )
    fast.update(compiled)
    if main and fast:
        logger.info("speed: %s", ", ".join(f"{k} {v}" for k, v in fast.items()))
    return Models(
        pipe=pipe,
        injected=injected,
        targets=targets,
        trained=trained,
        unet=unet,
        prepared=list(prepared[:-1]),
        text_encoders=text_encoders,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        weight_dtype=weight_dtype,
        words=words,
        compiling=compiling,
        memory=memory,
        swap=swap,
    )


def base_on_device(
    config: TrainConfig,
    accelerator: Accelerator,
    pipe: DiffusionPipeline | None,
    *,
    weight_dtype: torch.dtype,
    server: precompile.Server | None,
) -> DiffusionPipeline:
    """The base (`pipe`, or loaded from config.base), its frozen weights in `weight_dtype`, on
    the run's device; first its class images, with --reg-generate."""
    with beside_server(server):  # the fork server may still be importing: leave it a core
        if pipe is None:
            # on the CPU, in fp32
            pipe = load_base(config.base, config=config.base_config, t5=not config.no_t5)
        elif config.no_t5:
            check_t5_optional(pipe)
        if config.reg_generate:  # the base itself, before any cast or adapter
            pipe.to(accelerator.device)
            generate_missing(pipe, config, accelerator)
        if weight_dtype != torch.float32:
            # cast where the weights are: a base just loaded is still on the CPU, so only the
            # bf16/fp16 copies reach the GPU (SDXL's fp32 UNet and text encoders are 13 GiB)
            cast_frozen(pipe, weight_dtype)
        if config.base_precision == "fp8":  # layer by layer on the device: only fp8 stays
            denoiser = getattr(pipe, family_of_pipeline(pipe).denoiser)
            store_in_fp8(denoiser, device=accelerator.device)  # upcast to the weights' dtype
        pipe.to(accelerator.device)
    if accelerator.device.type == "cuda":
        # fp32 copies freed by a cast on the GPU (a pipeline handed in there, or --reg-generate)
        # would stay reserved in PyTorch's cache while the compile workers need memory of their own
        torch.cuda.empty_cache()
    return pipe


def fit_compile_choice(
    choice: CompilePlan, config: TrainConfig, memory: MemoryChoice | None
) -> CompilePlan:
    """The compile plan within the memory plan: no workers for --compile-workers 0, and the
    workers before the first step where the planner found no room for them beside it."""
    if not choice.compile:
        return choice
    if config.compile_workers == 0:
        choice = replace(choice, workers=False)
    if memory is not None and not memory.background:
        choice = replace(choice, background=False)
    return choice


def inject_adapter(
    pipe: DiffusionPipeline, config: TrainConfig, lora_args: dict
) -> tuple[dict[str, LoRAWeights], list[torch.nn.Module], dict[str, list[str]], list[str]]:
    """Inject the trainable adapter into the denoiser (UNet, SD3's transformer) and the text
    encoders that train; return (the trainable factors by kohya key, the models that learn, the
    modules adapted by component, the trained text encoders' pipeline attributes)."""
    family = family_of_pipeline(pipe)
    denoiser = denoiser_of(pipe)
    names = target_names(config.targets, denoiser_targets(family))
    injected = add_trainable(denoiser, family.denoiser, names, **lora_args)
    trained = [denoiser]
    targets = {family.denoiser: list(names)}
    trainable = [te.component for te in family.text_encoders if te.trainable]
    trained_encoders = (
        [name for name in text_encoder_names(pipe) if name in trainable]
        if config.train_text_encoder
        else []
    )
    for component in text_encoder_names(pipe):
        te_targets = ()
        if component in trained_encoders:
            te_targets = target_names(config.text_encoder_targets, TEXT_ENCODER_TARGETS)
            te = getattr(pipe, component)
            injected.update(add_trainable(te, component, te_targets, **lora_args))
            trained.append(te)
        targets[component] = list(te_targets)
    return injected, trained, targets, trained_encoders


def cast_frozen(pipe, dtype: torch.dtype) -> None:
    """The denoiser and text encoders to `dtype` (the VAE stays fp32: it encodes the latents)."""
    # nn.Module.to: diffusers' own .to(dtype) warns about fp32 modules even when there are none
    torch.nn.Module.to(denoiser_of(pipe), dtype=dtype)
    for component in text_encoder_names(pipe):
        getattr(pipe, component).to(dtype=dtype)


def text_encoder_names(pipe) -> list[str]:
    """The pipeline attributes of the base's text encoders, as its family lists them (those it
    was loaded with: an SD 3.x base may be without T5)."""
    family = family_of_pipeline(pipe)
    return [te.component for te in family.text_encoders if getattr(pipe, te.component) is not None]


def denoiser_of(pipe) -> torch.nn.Module:
    """The model that denoises: the UNet, or SD 3.x's transformer (`Family.denoiser`)."""
    return getattr(pipe, family_of_pipeline(pipe).denoiser)


def not_compiled(config: TrainConfig, family) -> str | None:
    """The warning for --compile on with a base whose denoiser sdlora does not compile."""
    if config.compile != "on":
        return None
    return f"--compile on: {family.label}'s {family.denoiser} is not compiled; it runs eagerly"


def check_sides(pipe, plan: BatchPlan) -> None:
    """Every bucket side must survive the VAE and the denoiser's downsampling in whole pixels:
    a UNet halves the latent at each level, SD 3.x's transformer cuts it into patches."""
    config = denoiser_of(pipe).config
    if "block_out_channels" in config:
        step = 2 ** (len(config["block_out_channels"]) - 1)
    else:
        step = config["patch_size"]
    multiple = pipe.vae_scale_factor * step
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
    denoiser: str = "unet",
) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA) or bitsandbytes' 8-bit AdamW, one learning rate per model:
    --lr for the UNet, --text-encoder-lr for the (first) text encoder, --text-encoder-2-lr for
    SDXL's second one (None: --text-encoder-lr), --embedding-lr for new words (pivotal.py; no
    weight decay). With --loraplus-lr-ratio R each model's up factors get a group of their own
    ("unet_up", ...) at R times its rate (LoRA+); --loraplus-text-encoder-lr-ratio sets the text
    encoders' own R (kohya's loraplus_text_encoder_lr_ratio)."""
    te_lr = config.lr if config.text_encoder_lr is None else config.text_encoder_lr
    te2_lr = te_lr if config.text_encoder_2_lr is None else config.text_encoder_2_lr
    # kohya key prefix -> (group name, as TensorBoard shows its rate under lr/, rate); the
    # denoiser's group (unet, SD 3.x: transformer) is always made
    first = PREFIXES[denoiser]
    rates = {
        first: (denoiser, config.lr),
        "lora_te_": ("text_encoder", te_lr),
        "lora_te1_": ("text_encoder", te_lr),
        "lora_te2_": ("text_encoder_2", te2_lr),
    }
    groups = []
    te_ratio = config.loraplus_text_encoder_lr_ratio or config.loraplus_lr_ratio
    for prefix, (name, lr) in rates.items():
        weights = [w for k, w in injected.items() if k.startswith(prefix)]
        ratio = config.loraplus_lr_ratio if prefix == first else te_ratio
        if ratio is None:
            params = [p for w in weights for p in w.params()]  # DoRA: and the magnitude
            if params or prefix == first:
                groups.append({"params": params, "lr": lr, "name": name})
        elif weights or prefix == first:  # LoRA+: down (A) at lr, up (B) at ratio × lr
            groups.append(  # DoRA's magnitude learns at lr too
                {
                    "params": [p for w in weights for p in w.params() if p is not w.up],
                    "lr": lr,
                    "name": name,
                }
            )
            groups.append(
                {"params": [w.up for w in weights], "lr": lr * ratio, "name": name + "_up"}
            )
    if words is not None:
        lr = config.lr if config.embedding_lr is None else config.embedding_lr
        groups.append({"params": [words.parameter], "lr": lr, "weight_decay": 0.0, "name": "words"})
    kwargs = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise SdloraError(
                "--optimizer adamw8bit needs bitsandbytes: pip install 'sdlora[bnb]' "
                "(or use --optimizer adamw)"
            ) from None
        kind = bnb.optim.AdamW8bit
    elif config.optimizer == "prodigy":
        kind = optional_optimizer("prodigy", "prodigyopt", "Prodigy")
        # d-adaptation as its authors advise for LoRA: lr 1 scales the estimated step d
        kwargs |= {"safeguard_warmup": True, "use_bias_correction": True}
        if config.lr != 1.0:
            logger.warning(
                "--optimizer prodigy: --lr %g scales its adapted rate; 1 is advised", config.lr
            )
    elif config.optimizer == "adafactor":
        from transformers.optimization import Adafactor as kind

        kwargs |= {"relative_step": False, "scale_parameter": False, "warmup_init": False}
    elif config.optimizer == "schedulefree":
        kind = optional_optimizer("schedulefree", "schedulefree", "AdamWScheduleFree")
    else:
        kind = torch.optim.AdamW
        kwargs["fused"] = device.type == "cuda"
    kwargs |= config.optimizer_kwargs()
    try:
        return kind(groups, **kwargs)
    except TypeError as err:  # a keyword the constructor does not take
        if "argument" not in str(err):
            raise
        unknown = sorted(set(config.optimizer_kwargs()) - set(accepted_keywords(kind)))
        name = ", ".join(unknown) or str(err)
        raise SdloraError(
            f"{name} is not a setting of --optimizer {config.optimizer}; check its spelling",
            setting="optimizer_args",
        ) from None


def optional_optimizer(name: str, package: str, attribute: str) -> type:
    """The optimizer class `attribute` of an optional `package` (extra `name`)."""
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise SdloraError(
            f"{name} needs {package}: pip install 'sdlora[{name}]' (or use {{optimizer}} adamw)",
            setting="optimizer",
        ) from None
    return getattr(module, attribute)


def accepted_keywords(kind: type) -> list[str]:
    """The keyword names of an optimizer class's constructor."""
    return list(inspect.signature(kind.__init__).parameters)


def effective_lrs(models: Models) -> list[float]:
    """Each parameter group's learning rate now: the schedule's, times Prodigy's adapted step d."""
    groups = models.optimizer.param_groups
    lrs = models.lr_scheduler.get_last_lr()
    return [lr * group.get("d", 1.0) for lr, group in zip(lrs, groups, strict=True)]


def optimizer_mode(models: Models, *, train: bool) -> None:
    """Schedule-free AdamW keeps two sets of weights: train() before steps, eval() before the
    adapter is saved, validated or sampled. Other optimizers have no modes."""
    inner = getattr(models.optimizer, "optimizer", models.optimizer)  # accelerate's wrapper
    if hasattr(inner, "eval") and hasattr(inner, "train"):
        inner.train() if train else inner.eval()


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
            if weights.is_dora:
                weights.magnitude.copy_(state["lora"][key]["magnitude"])
    if models.words is not None:
        models.words.load_state(state.get("embeddings", {}), str(path))
    models.optimizer.load_state_dict(state["optimizer"])
    models.lr_scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    return int(state["step"])
