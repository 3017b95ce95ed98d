"""The reference training loops: diffusers' `examples/text_to_image/train_text_to_image_lora.py`
(SD 1.x, `ReferenceLoop`) and `train_text_to_image_lora_sdxl.py` (SDXL, `ReferenceLoopXL`).

Kept as the example writes it: PEFT LoRA through `unet.add_adapter(LoraConfig(r, alpha = r,
gaussian init, to_k/to_q/to_v/to_out.0))`, every frozen weight (UNet, VAE, text encoder) in the
mixed-precision dtype, LoRA parameters in fp32, accelerate's autocast, the VAE and the text encoder
run every step, `torch.optim.AdamW` with the example's defaults, gradient clipping at 1.0, and the
example's `avg_loss.item()` every step. The only difference: its batches are ready-made tensors on
the device (random pixels in [-1, 1] and token ids), so image decoding costs it nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler
from diffusers.training_utils import cast_training_params
from peft import LoraConfig


class ReferenceLoop:
    """Set-up and one step of the diffusers LoRA example on `pipe` (changed in place)."""

    def __init__(self, pipe, batch_size: int, resolution: int, mixed_precision: str, rank: int = 4):
        AcceleratorState._reset_state()  # another Accelerator may have run in this process
        cpu = not torch.cuda.is_available()
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision)
        device = self.accelerator.device
        weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            mixed_precision, torch.float32
        )
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.vae, self.text_encoder, unet = pipe.vae, pipe.text_encoder, pipe.unet
        for model in (unet, self.vae, self.text_encoder):
            model.requires_grad_(False)
        torch.nn.Module.to(self.vae, device, dtype=weight_dtype)
        self.text_encoder.to(device, dtype=weight_dtype)
        self.unet, self.optimizer, self.lora_layers = peft_unet(
            self.accelerator, unet, rank, weight_dtype
        )
        self.weight_dtype, self.batch_size = weight_dtype, batch_size
        # ready-made batches: pixels in [-1, 1] and token ids of a caption
        generator = torch.Generator(device).manual_seed(0)
        shape = (batch_size, 3, resolution, resolution)
        self.pixel_values = torch.rand(shape, generator=generator, device=device) * 2 - 1
        ids = pipe.tokenizer(
            ["a photo of a red circle"] * batch_size,
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        self.input_ids = ids.to(device)
        self.train_loss = 0.0

    def step(self) -> None:
        """One step, as the example's loop body (gradient accumulation 1)."""
        accelerator, noise_scheduler = self.accelerator, self.noise_scheduler
        with accelerator.accumulate(self.unet):
            latents = self.vae.encode(self.pixel_values.to(dtype=self.weight_dtype)).latent_dist
            latents = latents.sample() * self.vae.config.scaling_factor
            noise = torch.randn_like(latents)
            bsz = latents.shape[0]
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device
            )
            timesteps = timesteps.long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = self.text_encoder(self.input_ids, return_dict=False)[0]
            target = noise  # epsilon prediction
            model_pred = self.unet(
                noisy_latents, timesteps, encoder_hidden_states, return_dict=False
            )[0]
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
            self.train_loss += optimize(self, loss)


def optimize(loop, loss: torch.Tensor) -> float:
    """The examples' loop-body tail on `loop` (a ReferenceLoop*): the loss averaged over
    processes, read on the host (as the examples log it), backward, clipping at 1.0, the
    optimizer step; returns the averaged loss."""
    accelerator = loop.accelerator
    avg_loss = accelerator.gather(loss.repeat(loop.batch_size)).mean().item()  # waits, as theirs
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(loop.lora_layers, 1.0)
    loop.optimizer.step()
    loop.optimizer.zero_grad()
    return avg_loss


def peft_unet(
    accelerator: Accelerator, unet, rank: int, weight_dtype: torch.dtype, checkpointing=False
):
    """The examples' UNet set-up: frozen weights in `weight_dtype`, PEFT LoRA on the attention
    projections in fp32, AdamW with the examples' defaults; (prepared UNet, optimizer, LoRA
    parameters)."""
    unet.requires_grad_(False)
    unet_lora_config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        init_lora_weights="gaussian",
        target_modules=["to_k", "to_q", "to_v", "to_out.0"],
    )
    torch.nn.Module.to(unet, accelerator.device, dtype=weight_dtype)
    unet.add_adapter(unet_lora_config)
    cast_training_params(unet, dtype=torch.float32)  # LoRA parameters in fp32
    if checkpointing:
        unet.enable_gradient_checkpointing()
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        lora_layers, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
    )
    unet, optimizer = accelerator.prepare(unet, optimizer)
    unet.train()
    return unet, optimizer, lora_layers


class ReferenceLoopXL:
    """Set-up and one step of diffusers' `examples/text_to_image/train_text_to_image_lora_sdxl.py`
    on an SDXL `pipe` (changed in place), as the example runs it with a bf16 VAE: prompt
    embeddings computed once before training (the example's `compute_embeddings` over the
    dataset: both encoders' penultimate hidden states, the second's pooled output), then the
    text encoders deleted; the VAE encodes every step; size ids (1024, 1024, 0, 0, 1024, 1024)
    in the weight dtype; PEFT LoRA and the loop body as in `ReferenceLoop`."""

    def __init__(
        self,
        pipe,
        batch_size: int,
        resolution: int,
        mixed_precision: str,
        rank: int = 4,
        gradient_checkpointing: bool = False,
    ):
        AcceleratorState._reset_state()
        cpu = not torch.cuda.is_available()
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision)
        device = self.accelerator.device
        weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            mixed_precision, torch.float32
        )
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.vae = pipe.vae.requires_grad_(False)
        torch.nn.Module.to(self.vae, device, dtype=weight_dtype)
        encoders = (pipe.text_encoder, pipe.text_encoder_2)
        with torch.no_grad():
            hidden, pooled = [], None
            for tokenizer, encoder in zip(
                (pipe.tokenizer, pipe.tokenizer_2), encoders, strict=True
            ):
                encoder.to(device, dtype=weight_dtype)
                ids = tokenizer(
                    ["a photo of a red circle"] * batch_size,
                    padding="max_length",
                    max_length=tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids.to(device)
                out = encoder(ids, output_hidden_states=True, return_dict=False)
                pooled = out[0]
                hidden.append(out[-1][-2])
            self.prompt_embeds = torch.cat(hidden, dim=-1)
            self.pooled = pooled
        for encoder in encoders:  # the example deletes them once the embeddings are computed
            encoder.to("cpu")
        side = [resolution, resolution]
        time_ids = torch.tensor([side + [0, 0] + side] * batch_size)
        self.time_ids = time_ids.to(device, dtype=weight_dtype)
        self.unet, self.optimizer, self.lora_layers = peft_unet(
            self.accelerator, pipe.unet, rank, weight_dtype, gradient_checkpointing
        )
        self.weight_dtype, self.batch_size = weight_dtype, batch_size
        generator = torch.Generator(device).manual_seed(0)
        shape = (batch_size, 3, resolution, resolution)
        self.pixel_values = torch.rand(shape, generator=generator, device=device) * 2 - 1
        self.train_loss = 0.0

    def step(self) -> None:
        """One step, as the example's loop body (gradient accumulation 1)."""
        accelerator, noise_scheduler = self.accelerator, self.noise_scheduler
        with accelerator.accumulate(self.unet):
            latents = self.vae.encode(self.pixel_values.to(dtype=self.weight_dtype)).latent_dist
            latents = latents.sample() * self.vae.config.scaling_factor
            latents = latents.to(self.weight_dtype)
            noise = torch.randn_like(latents)
            bsz = latents.shape[0]
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device
            ).long()
            noisy_model_input = noise_scheduler.add_noise(latents, noise, timesteps)
            added = {"time_ids": self.time_ids, "text_embeds": self.pooled}
            model_pred = self.unet(
                noisy_model_input,
                timesteps,
                self.prompt_embeds,
                added_cond_kwargs=added,
                return_dict=False,
            )[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
            self.train_loss += optimize(self, loss)
