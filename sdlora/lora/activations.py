"""What each adapted layer really sees: its inputs X and the adapter's outputs Y, as Gram statistics.

Used by distillation (`sdlora.tools.distill`). The base runs with the adapter applied at strength 1,
because the adapter changes the inputs of every later layer: a layer deep in the UNet sees what
the adapted layers before it produce, and the linear replacement must work on those inputs.
Prompts go through the text encoder, then the UNet predicts noise from seeded random latents at
timesteps spread over the whole schedule (stratified: one draw from each of `samples` equal
slices of [0, T)), since generation visits every noise level.

Rows of X are what the adapter's down factor multiplies: tokens for a Linear, and for a Conv2d
the input patches (in·kh·kw values, `F.unfold`) at each output pixel, so a k×k conv is a linear
map on patches like any other. Only XᵀX (d, d), XᵀY (d, out) and ‖Y‖² are kept, in float64:
memory is bounded by the layer's size, not by the number of tokens or pixels seen.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline

from sdlora.bases.families import vae_factor
from sdlora.errors import SdloraError
from sdlora.lora.layer import LoRALayer


@dataclass
class LayerStats:
    """Sufficient statistics of one layer's rows X (n, d) and adapter outputs Y (n, out)."""

    gram: torch.Tensor  # XᵀX (d, d), float64
    cross: torch.Tensor  # XᵀY (d, out), float64
    y_norm2: float = 0.0  # ‖Y‖²_F
    rows: int = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Accumulate a batch of rows x (n, d) and outputs y (n, out)."""
        x, y = x.double(), y.double()
        self.gram += x.T @ x
        self.cross += x.T @ y
        self.y_norm2 += float((y * y).sum())
        self.rows += x.shape[0]


@dataclass
class Probe:
    """Which inputs the base is run on: prompts x `samples` (latent, timestep) draws, seeded."""

    prompts: list[str]
    samples: int = 4  # noise draws per prompt, one per slice of the timestep range
    seed: int = 0  # seeds latents and timesteps; the same probe gives the same statistics


def check_conv(layer: LoRALayer, where: str) -> None:
    """Refuse convs whose patches `F.unfold` cannot reproduce (string or non-zero padding)."""
    base = layer.base
    if isinstance(base, torch.nn.Conv2d) and (
        isinstance(base.padding, str) or base.padding_mode != "zeros"
    ):
        raise SdloraError(
            f"{where}: convolutions with padding {base.padding!r} / {base.padding_mode!r} cannot "
            "be distilled (only zero padding given as numbers)"
        )


def input_rows(layer: LoRALayer, x: torch.Tensor) -> torch.Tensor:
    """(n, d) rows the down factor multiplies: tokens (Linear) or unfolded patches (Conv2d)."""
    base = layer.base
    if isinstance(base, torch.nn.Conv2d):
        patches = F.unfold(  # (B, in·kh·kw, L), channel-major like weight.flatten(1)
            x, base.kernel_size, dilation=base.dilation, padding=base.padding, stride=base.stride
        )
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def output_rows(layer: LoRALayer, y: torch.Tensor) -> torch.Tensor:
    """(n, out) rows of a layer output: (..., out) for Linear, (B, out, H, W) for Conv2d."""
    if isinstance(layer.base, torch.nn.Conv2d):
        return y.movedim(1, -1).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])


@contextmanager
def recording(layers: dict[str, LoRALayer], adapter: str):
    """Within the block, every forward of `layers` adds (X, adapter(X) at strength 1) to stats.

    Yields {key: LayerStats}; the hooks are removed on exit.
    """
    stats: dict[str, LayerStats] = {}
    handles = []

    def hook_for(key: str):
        def hook(layer: LoRALayer, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            y = layer.get(adapter)(x)  # s · B · σ(A · x) in fp32: the adapter's own output
            rows = input_rows(layer, x.float())
            if key not in stats:
                d, out = rows.shape[1], y.shape[-1 if layer.conv_args() is None else 1]
                zeros = dict(dtype=torch.float64, device=rows.device)
                stats[key] = LayerStats(torch.zeros(d, d, **zeros), torch.zeros(d, out, **zeros))
            stats[key].add(rows, output_rows(layer, y))

        return hook

    for key, layer in layers.items():
        check_conv(layer, key)
        handles.append(layer.register_forward_hook(hook_for(key)))
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def noise_predictions(pipe: StableDiffusionPipeline, probe: Probe) -> torch.Tensor:
    """UNet noise predictions (len(prompts)·samples, C, h, w) for the probe, one prompt a batch.

    Latents are N(0, 1) at the base's native latent size; timesteps are stratified over
    [0, num_train_timesteps). The same probe always draws the same latents and timesteps.
    """
    if probe.samples < 1:
        raise SdloraError(f"--samples must be at least 1 (got {probe.samples})")
    if not probe.prompts:
        raise SdloraError("no prompts to run the base on; give at least one")
    unet = pipe.unet
    size = unet.config.sample_size
    side = (size, size) if isinstance(size, int) else tuple(size)
    steps = pipe.scheduler.config.num_train_timesteps
    generator = torch.Generator().manual_seed(probe.seed)
    # the family's conditioning (train/condition.py): SDXL adds pooled text and size ids, here
    # those of an uncropped picture at the native size, as generation passes them
    from sdlora.train.condition import Conditioning

    conditioning = Conditioning.of(pipe)
    pixels = tuple(s * vae_factor(pipe.vae.config) for s in side)
    sizes = torch.tensor([pixels] * probe.samples)
    predictions = []
    with torch.no_grad():
        for prompt in probe.prompts:
            device = unet.device
            text = conditioning.encode([prompt], device).expand(probe.samples)  # (samples, 77, D)
            kwargs = conditioning.unet_kwargs(
                text, unet.dtype, sizes=sizes, crops=torch.zeros_like(sizes), target=pixels
            )
            latents = torch.randn(
                probe.samples, unet.config.in_channels, *side, generator=generator
            )
            slices = torch.arange(probe.samples) + torch.rand(probe.samples, generator=generator)
            timesteps = (slices / probe.samples * steps).long().clamp(0, steps - 1)
            predictions.append(
                unet(latents.to(device, unet.dtype), timesteps.to(device), **kwargs).sample
            )
    return torch.cat(predictions)


def collect(
    pipe: StableDiffusionPipeline, layers: dict[str, LoRALayer], adapter: str, probe: Probe
) -> dict[str, LayerStats]:
    """Run the probe through the pipe and return each layer's statistics (keys of `layers`).

    Layers the probe never reaches are missing from the result.
    """
    with recording(layers, adapter) as stats:
        noise_predictions(pipe, probe)
    return stats
