"""SD 3.5 Medium training speed: sdlora's trainer beside the diffusers SD3 LoRA example, at 1024 px.

The model has SD 3.5 Medium's shapes (an SD3Transformer2DModel of 24 MMDiT-X blocks, 1536 wide,
the first 13 with the second attention, RMS-normed queries and keys: 2.5 B parameters; CLIP-L and
CLIP-G with projections; the 16-channel SD3 VAE), built from diffusers / transformers classes
with seeded random weights directly on the GPU; only the values differ from the real model. T5-XXL
is left out on both sides (its 77 tokens are zeros, as `--no-t5` gives): the reference computes
its prompt embeddings once before training and ours caches them, so T5 never runs in a step and
only its 19 GB of random fp32 weights would be built for nothing; the context is 77 + 77 tokens
on both sides, as the example trains (`--max_sequence_length 77`).

Both sides train rank 16 on the example's default targets, both streams' attention of the first
attention (`attn.to_q/k/v`, `attn.to_out.0`, `attn.add_q/k/v_proj`, `attn.to_add_out`; not
MMDiT-X's attn2), in bf16 with the LoRA factors in fp32. The reference is the step of diffusers'
`examples/dreambooth/train_dreambooth_lora_sd3.py` (`ReferenceLoopSD3` below: PEFT, frozen weights
bf16, the VAE in fp32 encoding every step as the example keeps it, prompt embeddings precomputed,
logit-normal timesteps, preconditioned outputs, loss weighting, `get_sigmas` as it looks them up);
ours is `sdlora.train.train`, timed as `benchmarks/training.py` times it (set-up and caching count
towards the first step; the steady step is the mean over the last steps).

    python benchmarks/sd3.py [--batches 1,4] [--steps 30] [--json FILE]
    python benchmarks/sd3.py --smoke        # the same code on the CPU with tiny-sd3, in seconds

Targets (issue 30): steady img/s ≥ 2 × the reference at ≤ its memory; a 1,000-step run in ≤ ½ the
reference's wall time (projected: first step + 999 × steady step + finish).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.training_utils import (
    cast_training_params,
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)
from peft import LoraConfig
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.sd15 import device_info
from benchmarks.sdxl import TEXT_CONFIGS, table
from benchmarks.training import Timing, reset_memory, time_loop, time_train, write_images
from sdlora.bases.base import load_base
from sdlora.bases.tiny import make_t5_tokenizer, make_tokenizer
from sdlora.train import TrainConfig

# stabilityai/stable-diffusion-3.5-medium transformer/config.json
TRANSFORMER_CONFIG = dict(
    sample_size=128,  # latent side: 1024 px images
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,  # 1536 wide
    joint_attention_dim=4096,  # T5-XXL's width
    caption_projection_dim=1536,
    pooled_projection_dim=2048,  # CLIP-L 768 + CLIP-G 1280
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),  # MMDiT-X: the second attention in blocks 0-12
    qk_norm="rms_norm",
)
# its vae/config.json: four levels of 128-512 channels, 16 latent channels, no quant convs
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
SEED = 0
RESOLUTION = 1024
RANK = 16
T5_TOKENS = 77  # the example's --max_sequence_length, and sdlora's --t5-max-length default
# the diffusers SD3 LoRA example's default targets: the first attention of both streams
TARGETS = (
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)
SPEED_FACTOR = 2.0  # target: ours ≥ 2 × the reference's img/s


def build_pipeline(smoke: bool, device: torch.device) -> StableDiffusion3Pipeline:
    """An SD-3.5-Medium-shaped pipeline without T5, seeded random weights on `device`, fp32 (the
    trainer casts what it freezes); smoke=True: the built-in tiny-sd3, without T5."""
    if smoke:
        return load_base("tiny-sd3", device=device, t5=False)
    tokenizer = make_tokenizer()
    ids = dict(
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(SEED)
        transformer = SD3Transformer2DModel(**TRANSFORMER_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**c, **ids)) for c in TEXT_CONFIGS]
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=make_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=make_t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    for model in (transformer, vae, *encoders):
        model.eval().requires_grad_(False)
    return pipe


def parameter_counts(pipe) -> dict[str, float]:
    """Millions of parameters per model (SD 3.5 Medium: transformer 2470 M, CLIP-G 695 M)."""
    names = ("transformer", "vae", "text_encoder", "text_encoder_2")
    return {n: sum(p.numel() for p in getattr(pipe, n).parameters()) / 1e6 for n in names}


class ReferenceLoopSD3:
    """Set-up and one step of diffusers' `examples/dreambooth/train_dreambooth_lora_sd3.py` on an
    SD3 `pipe` (changed in place), with its defaults: PEFT LoRA (r = alpha = rank, gaussian init)
    on its default targets with the factors in fp32, the transformer frozen in the weight dtype,
    the VAE in fp32 encoding every step, prompt embeddings computed once (the pipeline's
    `encode_prompt`, 77 T5 tokens) and the text encoders moved away, logit-normal(0, 1) timesteps
    through `get_sigmas`, preconditioned outputs (x_t - σ·pred against x0), AdamW (weight decay
    1e-4), clipping at 1.0, the loss read every step as the example logs it."""

    def __init__(self, pipe, batch_size: int, resolution: int, mixed_precision: str, rank: int):
        AcceleratorState._reset_state()
        cpu = not torch.cuda.is_available()
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision)
        device = self.accelerator.device
        weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            mixed_precision, torch.float32
        )
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self.vae = pipe.vae.requires_grad_(False)
        torch.nn.Module.to(self.vae, device, dtype=torch.float32)  # the example keeps it fp32
        for name in ("text_encoder", "text_encoder_2"):
            getattr(pipe, name).to(device, dtype=weight_dtype)
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(
                ["a photo of a red circle"] * batch_size, None, None, device=device,
                do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS,
            )  # fmt: skip
        self.prompt_embeds, self.pooled = embeds.to(weight_dtype), pooled.to(weight_dtype)
        for name in ("text_encoder", "text_encoder_2"):  # the example frees them
            getattr(pipe, name).to("cpu")
        transformer = pipe.transformer.requires_grad_(False)
        torch.nn.Module.to(transformer, device, dtype=weight_dtype)
        config = LoraConfig(
            r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(TARGETS)
        )
        transformer.add_adapter(config)
        cast_training_params(transformer, dtype=torch.float32)
        self.params = [p for p in transformer.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            self.params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8
        )
        self.transformer, self.optimizer = self.accelerator.prepare(transformer, optimizer)
        self.transformer.train()
        self.weight_dtype, self.batch_size = weight_dtype, batch_size
        generator = torch.Generator(device).manual_seed(0)
        shape = (batch_size, 3, resolution, resolution)
        self.pixel_values = torch.rand(shape, generator=generator, device=device) * 2 - 1
        self.train_loss = 0.0

    def get_sigmas(self, timesteps: torch.Tensor, n_dim: int, dtype: torch.dtype) -> torch.Tensor:
        """The example's look-up of σ by timestep (one host sync per image)."""
        device = self.accelerator.device
        sigmas = self.scheduler.sigmas.to(device=device, dtype=dtype)
        schedule_timesteps = self.scheduler.timesteps.to(device)
        timesteps = timesteps.to(device)
        indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
        sigma = sigmas[indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    def step(self) -> None:
        """One step, as the example's loop body (gradient accumulation 1)."""
        accelerator, vae = self.accelerator, self.vae
        with accelerator.accumulate(self.transformer):
            model_input = vae.encode(self.pixel_values.to(dtype=vae.dtype)).latent_dist.sample()
            model_input = (model_input - vae.config.shift_factor) * vae.config.scaling_factor
            model_input = model_input.to(dtype=self.weight_dtype)
            noise = torch.randn_like(model_input)
            bsz = model_input.shape[0]
            u = compute_density_for_timestep_sampling(
                weighting_scheme="logit_normal", batch_size=bsz, logit_mean=0.0, logit_std=1.0,
                mode_scale=1.29,
            )  # fmt: skip
            indices = (u * self.scheduler.config.num_train_timesteps).long()
            timesteps = self.scheduler.timesteps[indices].to(device=model_input.device)
            sigmas = self.get_sigmas(timesteps, model_input.ndim, model_input.dtype)
            noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
            model_pred = self.transformer(
                hidden_states=noisy_model_input,
                timestep=timesteps,
                encoder_hidden_states=self.prompt_embeds,
                pooled_projections=self.pooled,
                return_dict=False,
            )[0]
            model_pred = model_pred * (-sigmas) + noisy_model_input  # --precondition_outputs 1
            weighting = compute_loss_weighting_for_sd3("logit_normal", sigmas)
            target = model_input
            loss = torch.mean(
                (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(bsz, -1),
                1,
            ).mean()
            self.train_loss += accelerator.gather(loss.repeat(bsz)).mean().item()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad()


def time_ours(
    smoke: bool, device: torch.device, data: Path, batch: int, steps: int, **settings
) -> Timing:
    """sdlora's `train()` for `steps` steps, timed as `benchmarks.training.time_train` times it."""
    pipe = build_pipeline(smoke, device)
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            data_dir=str(data),
            output=out,
            base="tiny-sd3",  # a name for the metadata; the pipeline above is what trains
            no_t5=True,
            resolution=64 if smoke else RESOLUTION,
            batch_size=batch,
            steps=steps,
            rank=RANK,
            targets=",".join(TARGETS),
            save_every=0,
            tensorboard=False,
            **settings,
        )
        return time_train(pipe, config, device)


def time_reference(smoke: bool, device: torch.device, batch: int, steps: int) -> Timing:
    """The diffusers SD3 example's set-up and loop for `steps` steps, timed like `time_ours`."""
    pipe = build_pipeline(smoke, device)
    reset_memory(device)
    start = time.perf_counter()
    resolution = 64 if smoke else RESOLUTION
    loop = ReferenceLoopSD3(pipe, batch, resolution, "no" if smoke else "bf16", RANK)
    timing = time_loop(loop.step, steps, start, device, batch)
    del loop, pipe
    return timing


def row(name, value, unit, target="", met=None, note="") -> dict:
    return dict(section="sd3", name=name, value=value, unit=unit, target=target, met=met, note=note)


def measure(
    smoke: bool, device: torch.device, batches: tuple[int, ...], steps: int, save=lambda r: None
) -> list[dict]:
    """The reference first at each batch size (the issue asks it measured first), then ours;
    `save(runs)` after each run, so a run cut short still leaves what it measured."""
    logging.getLogger("sdlora").setLevel(logging.WARNING)
    runs: dict[str, Timing | str] = {}
    plan = [(f"reference {b}", b, True) for b in batches] + [
        (f"ours {b}", b, False) for b in batches
    ]
    with tempfile.TemporaryDirectory() as tmp:
        data = write_images(Path(tmp) / "data", max(batches) * 2, 64 if smoke else RESOLUTION)
        for name, batch, reference in plan:
            try:
                if reference:
                    runs[name] = time_reference(smoke, device, batch, steps)
                else:
                    runs[name] = time_ours(smoke, device, data, batch, steps)
            except Exception as err:  # an out-of-memory run is a result, not the end of the table
                if smoke:
                    raise
                runs[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            save(runs)
    return rows_for(runs, batches, smoke)


def rows_for(runs: dict, batches: tuple[int, ...], smoke: bool) -> list[dict]:
    """Table rows from the timings of `measure` (failed runs are named with their error)."""

    def check(ok: bool) -> bool | None:
        return None if smoke else ok

    rows = [row(f"{n}: failed", 0.0, "", note=t) for n, t in runs.items() if isinstance(t, str)]
    for b in batches:
        ours, ref = runs.get(f"ours {b}"), runs.get(f"reference {b}")
        if isinstance(ref, Timing):
            rows.append(
                row(f"reference img/s, batch {b}", ref.images_per_s, "img/s",
                    note=f"peak {ref.peak_gib:.1f} GiB; first step {ref.first_step_s:.1f} s")
            )  # fmt: skip
        if not isinstance(ours, Timing):
            continue
        ref = ref if isinstance(ref, Timing) else None
        goal = SPEED_FACTOR * ref.images_per_s if ref else None
        rows.append(
            row(f"sdlora img/s, batch {b}", ours.images_per_s, "img/s",
                f"≥ {SPEED_FACTOR:g} × reference = {goal:.2f}" if ref else "",
                check(ours.images_per_s >= goal) if ref else None,
                (f"{ours.images_per_s / ref.images_per_s:.2f} × reference; " if ref else "")
                + f"first step {ours.first_step_s:.1f} s")
        )  # fmt: skip
        rows.append(
            row(f"sdlora peak memory, batch {b}", ours.peak_gib, "GiB",
                f"≤ reference = {ref.peak_gib:.1f}" if ref else "",
                check(ours.peak_gib <= ref.peak_gib) if ref else None)
        )  # fmt: skip
        if ref:
            rows.append(
                row(f"sdlora wall time, 1000 steps batch {b}", ours.wall_s, "s",
                    f"≤ ½ reference = {ref.wall_s / 2:.0f}", check(ours.wall_s <= ref.wall_s / 2),
                    "projected: first step + 999 × steady step + finish; reference "
                    f"{ref.wall_s:.0f} s")
            )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny-sd3 on the CPU, in seconds")
    parser.add_argument("--batches", default="1,4", help="batch sizes (default: 1,4)")
    parser.add_argument("--steps", type=int, help="steps per run (default 30; --smoke: 4)")
    parser.add_argument("--json", metavar="FILE", help="also write the result here")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    steps = args.steps or (4 if args.smoke else 30)
    batches = tuple(int(b) for b in args.batches.split(","))
    info = device_info(device) | {
        "steps": steps,
        "resolution": 64 if args.smoke else RESOLUTION,
        "rank": RANK,
    }
    if not args.smoke:
        info["parameters_M"] = parameter_counts(build_pipeline(False, device))
        reset_memory(device)
    measured: dict = {}

    def save(runs: dict) -> None:  # partial results, in case the run is cut short
        measured.update({k: v if isinstance(v, str) else vars(v) for k, v in runs.items()})
        if args.json:
            Path(args.json).write_text(json.dumps({"info": info, "runs": measured}, indent=2))

    rows = measure(args.smoke, device, batches, steps, save)
    result = {"info": info, "rows": rows, "runs": measured}
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
