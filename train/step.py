"""One training step, written out in order: `TrainStep(config=..., ...)(batch, k) -> loss`.

The loop in `loop.py` and the benchmarks in `benchmarks/` both call it, so what is measured is
what trains. Nothing here waits for the GPU: the loss comes back as a device tensor, and the loop
reads losses only every few steps (each read is a host sync).

SD 3.x learns by flow matching (Esser et al. 2024, §2-3; rectified flow) instead of DDPM noising,
as diffusers' `train_dreambooth_lora_sd3.py` does it: σ drawn by `--weighting-scheme`
(`flow_sigmas`), x_t = (1-σ)·x0 + σ·ε (`flow_noisy`), the transformer at timestep σ·T predicts
the velocity ε - x0, the loss weighted per image (`flow_weighting`). The family row says which
(`Family.objective`); `training_scheduler` gives the matching scheduler.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_snr

from sdlora.bases.families import family_of_pipeline
from sdlora.errors import SdloraError
from sdlora.lora.embeddings import TokenEmbedding
from sdlora.train.condition import Conditioning
from sdlora.train.config import TrainConfig
from sdlora.train.data import derived_seed
from sdlora.train.encode import LatentCache, TextCache, encode_pixels
from sdlora.train.prior import PriorImages


class TrainStep:
    """A micro-step of LoRA training: encode, noise, predict, loss, backward, optimizer step.

    `trained` are the models whose LoRA factors learn (the UNet, and the text encoders when they
    train), as returned by `accelerator.prepare`; `conditioning` runs the family's text
    encoders (train/condition.py). With a latent / text cache the VAE / text encoders are
    skipped; without one they run every step.
    """

    def __init__(
        self,
        *,
        config: TrainConfig,
        accelerator: Accelerator,
        pipe,
        unet: torch.nn.Module,
        trained: list[torch.nn.Module],
        conditioning: Conditioning,
        noise_scheduler,
        optimizer: torch.optim.Optimizer,
        weight_dtype: torch.dtype,
        latent_cache: LatentCache | None = None,
        text_cache: TextCache | None = None,
        prior: PriorImages | None = None,
    ):
        self.config, self.accelerator = config, accelerator
        self.vae, self.conditioning = pipe.vae, conditioning
        self.unet, self.trained = unet, trained
        self.noise_scheduler, self.optimizer = noise_scheduler, optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        # the adapter's factors, apart from new words' vectors (pivotal tuning, pivotal.py)
        words = pipe.text_encoder.get_input_embeddings()
        words = words.vectors if isinstance(words, TokenEmbedding) else None
        self.lora_params = [p for p in self.params if p is not words]
        self.weight_dtype = weight_dtype
        self.latent_cache, self.text_cache = latent_cache, text_cache
        self.prior = prior  # class images beside each batch (prior preservation), or None
        self.vae_scale_factor = pipe.vae_scale_factor
        # flow matching (SD 3.x) or DDPM noising with an ε / v target
        self.flow = family_of_pipeline(pipe).flow_matching
        check_objective_options(config, self.flow)
        if self.flow:
            self.prediction_type = FLOW
            # the training schedule's timesteps and (shifted) σ, on the device: (T,) each
            self.flow_timesteps = noise_scheduler.timesteps.to(accelerator.device)
            self.flow_sigmas = noise_scheduler.sigmas[: len(self.flow_timesteps)]
            self.flow_sigmas = self.flow_sigmas.to(accelerator.device)
        else:
            self.prediction_type = config.prediction_type or noise_scheduler.config.prediction_type
            if config.zero_terminal_snr:  # rescaled betas (Lin et al. 2024, Algorithm 1)
                self.noise_scheduler = zero_terminal_snr_scheduler(
                    noise_scheduler, self.prediction_type
                )
        # channels-last input when the UNet's weights are laid out that way (see speed.py)
        self.memory_format = input_memory_format(accelerator.unwrap_model(unet))
        # the VAE runs under bf16 autocast when training in bf16 (never fp16: SD VAEs overflow)
        self.vae_in_bf16 = weight_dtype == torch.bfloat16

    def __call__(self, batch: dict, k: int) -> torch.Tensor:
        """Train on micro-batch `k` (its number since the run began); return its loss, detached."""
        config, accelerator = self.config, self.accelerator
        device, scheduler = accelerator.device, self.noise_scheduler
        # Random draws of micro-step k come from (seed, k, process): resumes repeat them exactly.
        generator = torch.Generator(device).manual_seed(
            derived_seed(config.seed, "noise", accelerator.process_index, k)
        )
        if device.type == "cuda":  # a new step: CUDA-graphed blocks reuse their output memory
            torch.compiler.cudagraph_mark_step_begin()
        if config.dropout:
            torch.manual_seed(derived_seed(config.seed, "dropout", accelerator.process_index, k))
        with accelerator.accumulate(*self.trained):
            # 1. encode: latents (B, 4, H/8, W/8)
            if self.latent_cache is not None:
                latents = self.latent_cache.get(batch["indices"], device)
            else:
                bf16 = torch.autocast(device.type, torch.bfloat16, enabled=self.vae_in_bf16)
                with torch.no_grad(), bf16:
                    latents = encode_pixels(self.vae, batch["pixels"], generator)
            captions = list(batch["captions"])
            sizes, crops = batch["sizes"], batch["crops"]  # (B, 2) each, for SDXL's size ids
            f = self.vae_scale_factor
            bucket = (latents.shape[2] * f, latents.shape[3] * f)  # (height, width) in pixels
            if self.prior is not None:  # B class images in the same bucket: (2B, 4, h, w)
                drawn = self.prior.draw(k, (bucket[1], bucket[0]), latents.shape[0])
                bf16 = torch.autocast(device.type, torch.bfloat16, enabled=self.vae_in_bf16)
                with torch.no_grad(), bf16:
                    prior_latents = encode_pixels(self.vae, drawn.pixels, generator)
                latents = torch.cat([latents, prior_latents.to(latents.device)])
                captions += drawn.captions
                sizes, crops = torch.cat([sizes, drawn.sizes]), torch.cat([crops, drawn.crops])
            # 2. noise, plus an optional per-channel offset (B, C, 1, 1), optionally
            #    multi-resolution (pyramid) noise; sizes drawn on the CPU (no host sync)
            noise = torch.randn(latents.shape, generator=generator, device=device)
            if config.noise_offset:
                offset = torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=device)
                noise = noise + config.noise_offset * offset
            if config.multires_noise_iterations:
                sizes_generator = torch.Generator().manual_seed(
                    derived_seed(config.seed, "multires", accelerator.process_index, k)
                )
                noise = pyramid_noise(
                    noise,
                    config.multires_noise_iterations,
                    config.multires_noise_discount,
                    generator,
                    sizes_generator,
                )
            # 3. timesteps, uniform over the training schedule: (B,); flow matching: σ drawn
            #    by --weighting-scheme and its timestep σ·T, (B,) each
            if self.flow:
                timesteps, sigmas = flow_sigmas(
                    config, self.flow_timesteps, self.flow_sigmas, latents.shape[0], generator
                )
            else:
                timesteps = torch.randint(
                    0,
                    scheduler.config.num_train_timesteps,
                    (latents.shape[0],),
                    generator=generator,
                    device=device,
                )
            # 4. forward diffusion: x_t = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε (flow matching:
            #    x_t = (1-σ)·x_0 + σ·ε); with input perturbation ε + γ·ε' noises the latents
            #    while the target keeps ε
            forward = noise
            if config.ip_noise_gamma:
                forward = perturb(noise, config.ip_noise_gamma, generator)
            if self.flow:
                noisy = flow_noisy(latents, forward, sigmas)
            else:
                noisy = scheduler.add_noise(latents, forward, timesteps)
            # 5. condition: text embeddings (B, 77, D); SDXL also pooled text (B, 1280) and
            #    size ids (B, 6) = original (h, w), crop (top, left), bucket (h, w)
            if self.text_cache is not None:
                text = self.text_cache.get(captions, device)
            else:
                with torch.set_grad_enabled(config.text_learns), accelerator.autocast():
                    text = self.conditioning.encode(captions, device)
            condition = self.conditioning.unet_kwargs(
                text, self.weight_dtype, sizes=sizes, crops=crops, target=bucket
            )
            # 6. predict (SD 3.x's transformer takes the timestep by name)
            noisy = noisy.to(self.weight_dtype, memory_format=self.memory_format)
            if self.flow:
                pred = self.unet(noisy, timestep=timesteps, **condition).sample
            else:
                pred = self.unet(noisy, timesteps, **condition).sample
            # 7. target by prediction type; flow matching: the velocity d x_t / dσ = ε - x_0
            if self.flow:
                target = noise - latents
            elif self.prediction_type == "epsilon":
                target = noise
            elif self.prediction_type == "v_prediction":
                target = scheduler.get_velocity(latents, noise, timesteps)
            else:
                raise SdloraError(
                    f"prediction type {self.prediction_type!r} is not supported; "
                    "use --prediction-type epsilon or v_prediction"
                )
            # 8. loss: l2, or kohya's pseudo-Huber (--loss-type) with a per-image threshold;
            #    optionally min-SNR-γ weighted (Hang et al. 2023, eq. 8) and/or debiased
            #    (1/sqrt(SNR)); with class images: instance half + prior_loss_weight × class
            #    half (DreamBooth, eq. 2); with --masked-loss each image's loss is its mean
            #    over its mask (masked_mean)
            #    flow matching: times --weighting-scheme's weight of σ (sigma_sqrt, cosmap)
            per_element = config.loss_type != "l2"
            with_class = self.prior is not None
            masks = batch.get("masks")  # (B, 1, H, W) in [0, 1] with --masked-loss, else None
            weighted = self.flow and config.weighting_scheme in WEIGHTED_SCHEMES
            if (
                per_element
                or config.min_snr_gamma
                or config.debiased_estimation
                or with_class
                or weighted
                or masks is not None
            ):
                if config.loss_type == "l2":
                    per_image = F.mse_loss(pred.float(), target.float(), reduction="none")
                else:
                    c = huber_threshold(config.huber_c, config.huber_schedule, scheduler, timesteps)
                    per_image = pseudo_huber(pred.float(), target.float(), c, config.loss_type)
                if masks is not None:
                    per_image = masked_mean(per_image, masks.to(device))  # (B,) or (2B,)
                else:
                    per_image = per_image.mean(dim=(1, 2, 3))  # (B,) or (2B,)
                v = self.prediction_type == "v_prediction"
                if config.min_snr_gamma:
                    snr = compute_snr(scheduler, timesteps)  # ᾱ_t / (1 - ᾱ_t)
                    clamped = snr.clamp(max=config.min_snr_gamma)
                    per_image = per_image * (clamped / (snr + 1) if v else clamped / snr)
                if config.debiased_estimation:
                    per_image = per_image * debiased_weight(scheduler, timesteps, v)
                if weighted:
                    per_image = per_image * flow_weighting(config.weighting_scheme, sigmas)
                if self.prior is not None:
                    instance, prior = per_image.chunk(2)
                    loss = instance.mean() + config.prior_loss_weight * prior.mean()
                else:
                    loss = per_image.mean()
            else:
                loss = F.mse_loss(pred.float(), target.float())
            # 9. backward, clip, update (accelerate skips the update between accumulation steps);
            #    in the first --embedding-only-steps only new words learn: AdamW skips
            #    parameters without a gradient, their moments included
            accelerator.backward(loss)
            if k // config.grad_accum < config.embedding_only_steps:
                for p in self.lora_params:
                    p.grad = None
            if accelerator.sync_gradients and config.max_grad_norm:
                accelerator.clip_grad_norm_(self.params, config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def pyramid_noise(
    noise: torch.Tensor,
    iterations: int,
    discount: float,
    generator: torch.Generator,
    sizes_generator: torch.Generator,
) -> torch.Tensor:
    """Multi-resolution noise as kohya sd-scripts' `pyramid_noise_like` defines it.

    Level i (i = 0 .. iterations-1) draws noise at the size (h, w) / r**i, r uniform in [2, 4)
    (from `sizes_generator`, on the CPU), upsamples it bilinearly to (h, w) and adds it weighted
    discount**i; it stops after a level whose side reaches 1. The sum is divided by its standard
    deviation (over the whole batch)."""
    b, c, h, w = noise.shape
    for i in range(iterations):
        r = 2 + 2 * torch.rand((), generator=sizes_generator).item()
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        level = torch.randn((b, c, hn, wn), generator=generator, device=noise.device)
        level = F.interpolate(level, size=(h, w), mode="bilinear", align_corners=False)
        noise = noise + level * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def perturb(noise: torch.Tensor, gamma: float, generator: torch.Generator) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023, as kohya and diffusers' scripts): ε + γ·ε', ε' a
    fresh standard normal draw; the latents are noised with it, the target stays ε."""
    extra = torch.randn(noise.shape, generator=generator, device=noise.device)
    return noise + gamma * extra


def huber_threshold(c: float, schedule: str, scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """The pseudo-Huber threshold of each image, (B,), as kohya sd-scripts schedules it.

    constant: c. exponential: exp(-a·t) with a = -ln(c)/T (T training timesteps), 1 at t = 0 and
    c at t = T. snr: (1-c)/(1+σ_t)² + c with σ_t = sqrt((1-ᾱ_t)/ᾱ_t), near 1 at low noise."""
    if schedule == "constant":
        return torch.full(timesteps.shape, c, device=timesteps.device)
    if schedule == "exponential":
        a = -math.log(c) / scheduler.config.num_train_timesteps
        return torch.exp(-a * timesteps.float())
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    sigmas = ((1 - alphas) / alphas).sqrt()
    return (1 - c) / (1 + sigmas) ** 2 + c


def pseudo_huber(
    pred: torch.Tensor, target: torch.Tensor, c: torch.Tensor, loss_type: str
) -> torch.Tensor:
    """kohya's per-element pseudo-Huber loss, c of shape (B,): with d = pred - target,
    huber 2c·(sqrt(d²+c²) - c), smooth_l1 2·(sqrt(d²+c²) - c)."""
    c = c.view(-1, *([1] * (pred.dim() - 1)))
    loss = 2 * ((pred - target) ** 2 + c**2).sqrt() - 2 * c
    return c * loss if loss_type == "huber" else loss


def debiased_weight(scheduler, timesteps: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """Debiased estimation's loss weight (kohya's `apply_debiased_estimation`), (B,):
    1/sqrt(SNR_t), v-prediction 1/(SNR_t+1), SNR_t = ᾱ_t/(1-ᾱ_t) clipped at 1000."""
    snr = compute_snr(scheduler, timesteps).clamp(max=1000)
    return 1 / (snr + 1) if v_prediction else 1 / snr.sqrt()


FLOW = "flow_matching"  # the prediction type of flow-matching bases: the velocity ε - x0
# the weighting schemes that weight the loss (the others shape the density σ is drawn from)
WEIGHTED_SCHEMES = ("sigma_sqrt", "cosmap")
# settings that read DDPM's ᾱ_t or pick a DDPM target: none of them means anything for flow
# matching, where σ is the noise level (setting -> its value that leaves it out)
DDPM_ONLY = {"min_snr_gamma": None, "debiased_estimation": False, "prediction_type": None}
DDPM_ONLY |= {"zero_terminal_snr": False}
# and flow matching's own settings, at the values a DDPM run must leave them
FLOW_ONLY = {"weighting_scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0}
FLOW_ONLY |= {"mode_scale": 1.29, "t5_max_length": 77}


def training_scheduler(pipe):
    """The noise scheduler a run trains with: the base's own configuration, as DDPM
    (SD 1.x/2.x/SDXL) or flow-matching Euler with its shift (SD 3.x: 3.0)."""
    kind = (
        FlowMatchEulerDiscreteScheduler if family_of_pipeline(pipe).flow_matching else DDPMScheduler
    )
    return kind.from_config(pipe.scheduler.config)


def check_objective_options(config: TrainConfig, flow: bool) -> None:
    """Refuse, in one line, settings of the other objective: they would do nothing."""
    if flow:
        for name, off in DDPM_ONLY.items():
            if getattr(config, name) != off:
                raise SdloraError(
                    "applies to DDPM-trained bases (SD 1.x/2.x/SDXL); this base learns by flow "
                    "matching (σ, not ᾱ_t): leave it out, see {weighting_scheme}",
                    setting=name,
                )
        if config.loss_type != "l2" and config.huber_schedule == "snr":
            raise SdloraError(
                "snr reads DDPM's ᾱ_t, which a flow-matching base has not; use constant or "
                "exponential",
                setting="huber_schedule",
            )
        return
    for name, off in FLOW_ONLY.items():
        if getattr(config, name) != off:
            raise SdloraError(
                "applies to flow-matching bases (SD 3.x); this base is DDPM-trained: leave it out",
                setting=name,
            )


def flow_sigmas(
    config: TrainConfig,
    timesteps: torch.Tensor,
    sigmas: torch.Tensor,
    count: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, σ), (count,) each, drawn as the diffusers SD3 example draws them: u in [0, 1]
    from `flow_density`, index = ⌊u·T⌋ into the schedule's (shifted) timesteps and σ. u = 1 (a
    logit-normal draw beyond fp32's sigmoid) takes the last index, not one past it."""
    u = flow_density(
        config.weighting_scheme,
        count,
        generator,
        logit_mean=config.logit_mean,
        logit_std=config.logit_std,
        mode_scale=config.mode_scale,
    )
    index = (u * len(timesteps)).long().clamp(max=len(timesteps) - 1)
    return timesteps[index], sigmas[index]


def flow_density(
    scheme: str,
    count: int,
    generator: torch.Generator,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """(count,) draws u in [0, 1] on the generator's device (Esser et al. 2024, §3.1):
    logit_normal u = sigmoid(n), n ~ N(m, s²); mode u = 1 - v - s·(cos²(πv/2) - 1 + v), v ~ U(0, 1);
    every other scheme uniform. Equal to diffusers' `compute_density_for_timestep_sampling`."""
    device = generator.device
    if scheme == "logit_normal":
        n = torch.normal(logit_mean, logit_std, size=(count,), device=device, generator=generator)
        return torch.sigmoid(n)
    v = torch.rand((count,), device=device, generator=generator)
    if scheme == "mode":
        return 1 - v - mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
    return v


def flow_noisy(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - σ)·x0 + σ·ε, σ (B,) broadcast over (B, C, h, w)."""
    sigmas = sigmas.view(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)
    return (1 - sigmas) * latents + sigmas * noise


def flow_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-image loss weight (B,): sigma_sqrt 1/σ², cosmap 2/(π(1 - 2σ + 2σ²)), else 1. Equal to
    diffusers' `compute_loss_weighting_for_sd3`."""
    sigmas = sigmas.float()
    if scheme == "sigma_sqrt":
        return sigmas**-2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


def input_memory_format(model: torch.nn.Module) -> torch.memory_format:
    """channels_last when a UNet's input convolution is laid out so (speed.py), else contiguous
    (SD 3.x's transformer patches its input itself)."""
    conv_in = getattr(model, "conv_in", None)
    channels_last = conv_in is not None and conv_in.weight.is_contiguous(
        memory_format=torch.channels_last
    )
    return torch.channels_last if channels_last else torch.contiguous_format


def validation_pair(
    scheduler, prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy input, target) of the validation loss at fixed timesteps t: DDPM's add_noise with
    an ε or v target; flow matching at σ = t/T unshifted (x_t, ε - x0)."""
    if prediction_type == FLOW:
        sigmas = timesteps.float() / scheduler.config.num_train_timesteps
        return flow_noisy(x0, noise, sigmas), noise - x0
    noisy = scheduler.add_noise(x0, noise, timesteps)
    if prediction_type == "v_prediction":
        return noisy, scheduler.get_velocity(x0, noise, timesteps)
    return noisy, noise


def zero_terminal_snr_scheduler(scheduler, prediction_type: str):
    """`scheduler` with its betas rescaled to zero terminal SNR (Lin et al. 2024, "Common
    Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1; diffusers'
    `rescale_zero_terminal_snr`): sqrt(ᾱ_t) shifted so that sqrt(ᾱ_T) = 0 and scaled so that
    sqrt(ᾱ_1) keeps its value. At t = T the latents are pure noise, so the model must predict
    v (an epsilon target there is the input itself): other prediction types are refused."""
    if prediction_type != "v_prediction":
        raise SdloraError(
            f"needs v-prediction, and the base predicts {prediction_type}: at the last timestep "
            "the latents are pure noise, so an epsilon prediction says nothing about the image; "
            "pass {prediction_type} v_prediction",
            setting="zero_terminal_snr",
        )
    return type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True)


def masked_mean(loss: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-image loss averaged over the mask, (N,), from the per-element loss (N, C, h, w).

    The masks (B, 1, H, W) in [0, 1], at pixel size, are shrunk to the latents' size by area
    (kohya sd-scripts' masked_loss) and weight each latent position; the weighted sum is divided
    by the mask's sum, so a half-masked image weighs as much as a whole one and its loss is the
    mean over what it shows. Images past the B masked ones (class images) count whole; an
    all-black mask gives 0."""
    weights = F.interpolate(masks.float(), size=loss.shape[2:], mode="area")  # (B, 1, h, w)
    if weights.shape[0] < loss.shape[0]:
        whole = weights.new_ones((loss.shape[0] - weights.shape[0], *weights.shape[1:]))
        weights = torch.cat([weights, whole])
    total = (loss * weights).sum(dim=(1, 2, 3))
    return total / (weights.sum(dim=(1, 2, 3)) * loss.shape[1]).clamp(min=1e-12)
