"""The models of a run: the base in the compute dtype with a trainable adapter injected, the
optimizer and its learning-rate schedule, and restoring them from a checkpoint.

Frozen weights are cast to the compute dtype (bf16/fp16 under mixed precision); the LoRA factors
stay fp32; the VAE stays fp32 (SD VAEs overflow in fp16; in bf16 runs it encodes under autocast).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from sdlora.train import checkpoint
from sdlora.train.config import RESUME_MUST_MATCH, TrainConfig
from sdlora.train.data import BatchPlan, derived_seed
from sdlora.train.speed import speed_up, will_compile

from sdlora.base import load_base
from sdlora.errors import SdloraError
from sdlora.inject import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_trainable, target_names
from sdlora.layer import LoRAWeights

logger = logging.getLogger(__name__)

ADAPTER_NAME = "training"  # the adapter's name inside each LoRALayer while training


@dataclass
class Models:
    """A run's models, as the loop uses them."""

    pipe: StableDiffusionPipeline  # the base, with the adapter injected (for sampling)
    injected: dict[str, LoRAWeights]  # kohya module key -> the trainable factors
    targets: dict[str, list[str]]  # "unet" / "text_encoder" -> module names adapted
    trained: list[torch.nn.Module]  # the models whose adapter learns (train/eval mode)
    unet: torch.nn.Module  # as accelerate prepared it
    text_encoder: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    weight_dtype: torch.dtype  # of the frozen UNet and text-encoder weights


def load_models(
    config: TrainConfig,
    accelerator: Accelerator,
    plan: BatchPlan,
    total_steps: int,
    pipe: StableDiffusionPipeline | None = None,
) -> Models:
    """Load the base (or take `pipe`), inject the adapter, build optimizer and schedule."""
    main = accelerator.is_main_process
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
    check_sides(pipe, plan)

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
    compiling = will_compile(config.compile, accelerator.device, total_steps, len(plan.by_bucket))
    # CUDA graphs reuse their output memory every step, so gradients must not accumulate
    graphs = config.grad_accum == 1
    fast = speed_up(
        pipe.unet, accelerator.device, compiling, len(plan.by_bucket), cuda_graphs=graphs
    )
    if main and fast:
        logger.info("speed: %s", ", ".join(f"{k} {v}" for k, v in fast.items()))

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
    return Models(
        pipe,
        injected,
        targets,
        trained,
        unet,
        text_encoder,
        optimizer,
        lr_scheduler,
        weight_dtype,
    )


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
    models.optimizer.load_state_dict(state["optimizer"])
    models.lr_scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    return int(state["step"])
