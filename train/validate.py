"""Validation loss: the denoising loss on held-out images at fixed timesteps and fixed noise.

Training loss jumps with every draw of timesteps and noise; this one does not move unless the
adapter does. Each held-out image is encoded once (its latent drawn with a seed of its own), and
paired with TIMESTEPS and a noise tensor seeded per (image, timestep). The loss is the mean of
`mse(pred, target)` over all pairs, under no_grad, with the models in eval mode (no dropout).
The same seed, images and adapter give the same number on the same device.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sdlora.bases.families import vae_factor
from sdlora.errors import SdloraError
from sdlora.train.condition import Conditioning
from sdlora.train.config import TrainConfig
from sdlora.train.data import (
    ImageItem,
    derived_seed,
    load_rgb,
    size_ids,
    to_bucket_cropped,
    with_trigger,
)
from sdlora.train.encode import encode_pixels
from sdlora.train.step import input_memory_format, validation_pair

# spread over the schedule: low-noise detail, the middle, and composition-level noise
TIMESTEPS = (100, 300, 500, 700, 900)


def split_items(
    items: list[ImageItem], fraction: float, seed: int
) -> tuple[list[ImageItem], list[ImageItem]]:
    """(training, held out): round(fraction × images) images, chosen by the seed, held out."""
    count = round(len(items) * fraction)
    if fraction and count == 0:
        count = 1
    if count >= len(items):
        raise SdloraError(
            f"--validation-split {fraction:g} holds out {count} of {len(items)} images and leaves "
            "none to train on; use a smaller fraction or --validation-data DIR"
        )
    order = list(range(len(items)))
    random.Random(derived_seed(seed, "validation split")).shuffle(order)
    held = set(order[:count])
    return [it for i, it in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


@dataclass
class Validation:
    """Held-out latents, captions and fixed noise; `loss(...)` gives the validation loss."""

    latents: list[torch.Tensor]  # (4, h, w) fp32 each
    captions: list[str]
    seed: int
    sizes: list[tuple[int, int]]  # original (height, width) of each image (SDXL's size ids)
    crops: list[tuple[int, int]]  # (top, left) of its center crop
    scale: int  # pixels per latent pixel (the VAE's factor)

    @classmethod
    def encode(cls, items: list[ImageItem], vae, config: TrainConfig) -> Validation:
        """Encode the held-out images once (center crop into their bucket, no flip)."""
        latents, crops = [], []
        with torch.no_grad():
            for index, item in enumerate(items):
                image = load_rgb(item.path)
                pixels, crop = to_bucket_cropped(image, item.bucket, "center", False, None)
                crops.append(crop)
                generator = torch.Generator(vae.device).manual_seed(
                    derived_seed(config.seed, "validation latent", index)
                )
                latents.append(encode_pixels(vae, pixels[None], generator)[0])
        captions = [with_trigger(item.caption, config.trigger) for item in items]
        scale = vae_factor(vae.config)
        return cls(latents, captions, config.seed, [size_ids(i) for i in items], crops, scale)

    def loss(
        self,
        unet,
        conditioning: Conditioning,
        scheduler,
        prediction_type: str,
        weight_dtype: torch.dtype,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> float:
        """Mean denoising loss over every (held-out image, timestep) pair."""
        total, count = 0.0, 0
        with torch.no_grad():
            for index, (latent, caption) in enumerate(
                zip(self.latents, self.captions, strict=True)
            ):
                device = latent.device
                text = conditioning.encode([caption], device).expand(len(TIMESTEPS))
                repeat = len(TIMESTEPS)
                sizes = torch.tensor([self.sizes[index]] * repeat)
                crops = torch.tensor([self.crops[index]] * repeat)
                target = (latent.shape[1] * self.scale, latent.shape[2] * self.scale)
                condition = conditioning.unet_kwargs(
                    text, weight_dtype, sizes=sizes, crops=crops, target=target
                )
                x0 = latent[None].expand(len(TIMESTEPS), -1, -1, -1)
                timesteps = torch.tensor(TIMESTEPS, device=device)
                generator = torch.Generator(device).manual_seed(
                    derived_seed(self.seed, "validation noise", index)
                )
                noise = torch.randn(x0.shape, generator=generator, device=device)
                noisy, target = validation_pair(scheduler, prediction_type, x0, noise, timesteps)
                noisy = noisy.to(weight_dtype, memory_format=memory_format)
                pred = unet(noisy, timestep=timesteps, **condition).sample
                total += F.mse_loss(pred.float(), target.float(), reduction="sum").item()
                count += target.numel()
        return total / count


class Validator:
    """Validation during a run: the loss every `validate_every` steps, the best step kept.

    With --keep-best the adapter of the lowest loss so far is written to `config.best_path`,
    its loss and step in the metadata; a resumed run reads them back from that file (a fresh
    run, --overwrite included, starts a new best).
    """

    def __init__(self, validation: Validation, config: TrainConfig, prediction_type: str):
        self.validation, self.config, self.prediction_type = validation, config, prediction_type
        self.best: tuple[float, int] | None = None  # (loss, step)
        self.last: tuple[float, int] | None = None
        if config.keep_best and config.resume is not None and config.best_path.is_file():
            self.best = recorded_best(config.best_path)

    def __call__(self, step: int, models, accelerator, scheduler, save_adapter_at) -> float:
        """Validation loss of the adapter now; keeps it when best (save_adapter_at(path, meta)).

        Runs on the unwrapped models (no multi-process wrapper: only the main process
        validates) under the run's autocast, with compiled regions run eagerly.
        """
        unet = accelerator.unwrap_model(models.unet)
        encoders = {k: accelerator.unwrap_model(m) for k, m in models.text_encoders.items()}
        conditioning = Conditioning.of(models.pipe, encoders, self.config.t5_max_length)
        memory = input_memory_format(unet)
        for model in models.trained:
            model.eval()
        with accelerator.autocast(), eager():
            loss = self.validation.loss(
                unet,
                conditioning,
                scheduler,
                self.prediction_type,
                models.weight_dtype,
                memory,
            )
        for model in models.trained:
            model.train()
        self.last = (loss, step)
        if self.best is None or loss < self.best[0]:
            self.best = (loss, step)
            if self.config.keep_best:
                meta = {"sdlora_validation_loss": repr(loss), "sdlora_validation_step": str(step)}
                save_adapter_at(self.config.best_path, meta)
        return loss

    def summary(self) -> str:
        if self.last is None:
            return ""
        (loss, step), (best, best_step) = self.last, self.best
        kept = f" ({self.config.best_path.name})" if self.config.keep_best else ""
        return (
            f"validation loss {loss:.5g} at step {step}, best {best:.5g} at step {best_step}{kept}"
        )


def recorded_best(path) -> tuple[float, int] | None:
    """(loss, step) recorded in a kept best adapter's metadata, or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return float(meta["sdlora_validation_loss"]), int(meta["sdlora_validation_step"])
    except (OSError, KeyError, ValueError):
        return None


def eager():
    """Compiled regions run as plain PyTorch here: a no_grad pass would compile new graphs."""
    import contextlib

    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance else contextlib.nullcontext()
