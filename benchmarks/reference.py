"""The reference training loop: diffusers' `examples/text_to_image/train_text_to_image_lora.py`.

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
        unet_lora_config = LoraConfig(
            r=rank,
            lora_alpha=rank,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
        torch.nn.Module.to(unet, device, dtype=weight_dtype)
        torch.nn.Module.to(self.vae, device, dtype=weight_dtype)
        self.text_encoder.to(device, dtype=weight_dtype)
        unet.add_adapter(unet_lora_config)
        cast_training_params(unet, dtype=torch.float32)  # LoRA parameters in fp32
        self.lora_layers = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            self.lora_layers, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
        )
        self.unet, self.optimizer = self.accelerator.prepare(unet, optimizer)
        self.unet.train()
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
            avg_loss = accelerator.gather(loss.repeat(self.batch_size)).mean()
            self.train_loss += avg_loss.item()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(self.lora_layers, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad()
