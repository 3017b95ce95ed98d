"""From pixels and captions to what the UNet takes: VAE latents and text embeddings, with caches.

Captions are encoded by the family's `Conditioning` (train/condition.py).

Cached latents are drawn from the VAE's posterior with a generator seeded per image, so a cache
rebuilt after a resume holds exactly the same latents as the first one. Caches live on the GPU
when they fit in `GPU_CACHE_BYTES` (then a step copies nothing from the host), else on the CPU.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from sdlora.bases.families import vae_factor
from sdlora.train.condition import Conditioning, Text
from sdlora.train.data import BatchPlan, ImageItem, MicroBatches, derived_seed, with_trigger

GPU_CACHE_BYTES = 2 * 2**30  # caches up to this size stay on the GPU


def cache_device(device: torch.device, nbytes: int) -> torch.device:
    """Where a cache of `nbytes` lives: the accelerator if it fits the budget, else the CPU."""
    return device if device.type != "cpu" and nbytes <= GPU_CACHE_BYTES else torch.device("cpu")


def long_captions(
    tokenizer,
    items: list[ImageItem],
    trigger: str | None,
    limit: int | None = None,
    encoder: str = "the text encoder",
) -> str | None:
    """A warning naming how many captions `tokenize` will cut, with the first; None if none.
    `limit`: the tokens kept (default: the tokenizer's length; SD 3.x's T5: --t5-max-length)."""
    limit = limit or tokenizer.model_max_length
    captions = [with_trigger(item.caption, trigger) for item in items]
    # the counts include the start and end tokens, as `limit` does; verbose=False: no warning
    lengths = [len(ids) for ids in tokenizer(captions, verbose=False).input_ids]
    long = [(item, n) for item, n in zip(items, lengths, strict=True) if n > limit]
    if not long:
        return None
    item, n = long[0]
    return (
        f"{len(long)} caption(s) are longer than {encoder}'s {limit} tokens and will be "
        f"cut (first: {item.path.name}, {n} tokens); shorten them to keep their end"
    )


def scaled(vae, sample: torch.Tensor) -> torch.Tensor:
    """A VAE posterior sample as the denoiser takes it: (z - shift) · scale. SD 1.x/2.x/SDXL
    VAEs have no shift; SD 3.x's has 0.0609 (and scale 1.5305), as its pipeline decodes."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (sample.float() - shift) * vae.config.scaling_factor


def encode_pixels(vae, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, C, H/8, W/8) latents, sampled and scaled as the denoiser
    expects (C: 4, SD 3.x 16)."""
    posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return scaled(vae, posterior.sample(generator=generator))


class LatentCache:
    """Item index -> (C, h, w) fp32 latent, for every training image."""

    def __init__(
        self, vae, dataset: MicroBatches, seed: int, *, show_progress: bool, chunk: int = 8
    ):
        self.latents: dict[int, torch.Tensor] = {}
        plan: BatchPlan = dataset.plan
        factor = vae_factor(vae.config)
        channels = vae.config.latent_channels
        nbytes = sum(
            4 * channels * (w // factor) * (h // factor) for w, h in (i.bucket for i in plan.items)
        )
        home = cache_device(vae.device, nbytes)
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(plan.items):
            by_bucket.setdefault(item.bucket, []).append(index)
        bar = tqdm(total=len(plan.items), desc="caching latents", disable=not show_progress)
        for (width, height), indices in by_bucket.items():
            # the fp32 VAE's activations grow with the pixels: at most chunk × 512² at once
            # (SDXL at 1024 px: 2 images; 8 took 20 GiB more than a training step)
            chunk = max(1, chunk * 512 * 512 // (width * height))
            for start in range(0, len(indices), chunk):
                part = indices[start : start + chunk]
                pixels = torch.stack([dataset.pixels(plan.items[i], None) for i in part])
                posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
                for row, index in enumerate(part):
                    generator = torch.Generator(vae.device).manual_seed(
                        derived_seed(seed, "latent", index)
                    )
                    mean, std = posterior.mean[row], posterior.std[row]
                    noise = torch.randn(mean.shape, generator=generator, device=mean.device)
                    latent = scaled(vae, mean + std * noise)
                    self.latents[index] = latent.to(home)
                bar.update(len(part))
        bar.close()

    def get(self, indices: torch.Tensor, device: torch.device) -> torch.Tensor:
        return torch.stack([self.latents[int(i)] for i in indices]).to(device, non_blocking=True)


class TextCache:
    """Caption -> its `Text` (hidden states (77, D), SDXL: and pooled (P,)), for every caption a
    draw can give."""

    def __init__(
        self, conditioning: Conditioning, captions: list[str], device: torch.device, chunk: int = 32
    ):
        self.embeddings: dict[str, Text] = {}
        probe = conditioning.encode(captions[:1], device)
        per_caption = sum(
            t.element_size() * t[0].numel() for t in (probe.hidden, probe.pooled) if t is not None
        )
        home = cache_device(device, len(captions) * per_caption)
        for start in range(0, len(captions), chunk):
            part = captions[start : start + chunk]
            encoded = conditioning.encode(part, device)
            for row, caption in enumerate(part):
                pooled = None if encoded.pooled is None else encoded.pooled[row].to(home)
                self.embeddings[caption] = Text(encoded.hidden[row].to(home), pooled)

    def get(self, captions: list[str], device: torch.device) -> Text:
        return Text.stack([self.embeddings[c] for c in captions]).to(device)
