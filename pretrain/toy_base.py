"""Pretrain the built-in `toy` base from scratch on the toy world (run on a GPU, a few minutes).

Same classes as Stable Diffusion 1.x: AutoencoderKL (factor-8 latents, 4 channels), a
UNet2DConditionModel with cross-attention, a CLIPTextModel over the project's tokenizer, SD's
scaled-linear betas and a PNDM scheduler. Two phases, each with a time budget (cosine learning rate
over the budget's fraction, so the number of steps is what the GPU managed; the log records it):

1. the autoencoder, on toy-world pictures and on "varied" ones (free colors, checker/stripe/
   gradient backgrounds, outlines), so that it is a general codec for pictures of this size;
2. the UNet and the text encoder together, on toy-world pictures and captions only, with 10% empty
   captions (for classifier-free guidance), epsilon prediction and min-SNR-5 loss weights
   (Hang et al. 2023), plus an exponential moving average of the weights, which is what is saved.

Writes a diffusers folder (fp16 safetensors), a JSON log (recipe, times, losses, evaluation) and a
grid of generated pictures.

    PYTHONPATH=. python pretrain/toy_base.py --out runs/toy_base
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdlora.bases import toyworld
from sdlora.bases.tiny import SCHEDULER_CONFIG, make_tokenizer
from sdlora.bases.tokenizer_files import write_tokenizer_files

UNET_CONFIG = dict(
    sample_size=8,  # latent side; 64 px pictures
    in_channels=4,
    out_channels=4,
    block_out_channels=(64, 96, 128),  # three levels: 8x8, 4x4, 2x2 latents
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=96,
    attention_head_dim=4,  # SD 1.x's name for the number of heads
    norm_num_groups=32,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 64, 64),  # four levels: latents are 8x smaller, as in SD
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=32,
    sample_size=64,
)


def text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """A 3-layer CLIP text encoder, 96 wide, over the project's tokenizer."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=96,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="quick_gelu",
        projection_dim=96,
    )


class WordIds:
    """Tokenize toy captions fast: CLIP's BPE works word by word, so ids come from a word table."""

    def __init__(self, tokenizer: CLIPTokenizer) -> None:
        self.tokenizer = tokenizer
        self.table: dict[str, list[int]] = {}
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        self.length = tokenizer.model_max_length

    def __call__(self, captions: list[str]) -> torch.Tensor:
        """(B, 77) ids, as the pipeline's tokenizer call would give (padded to max length)."""
        rows = []
        for text in captions:
            ids = [self.bos]
            for word in text.split():
                if word not in self.table:
                    self.table[word] = self.tokenizer.encode(word, add_special_tokens=False)
                ids += self.table[word]
            ids = ids[: self.length - 1] + [self.eos]
            rows.append(ids + [self.pad] * (self.length - len(ids)))
        return torch.tensor(rows)

    def check(self, captions: list[str]) -> None:
        """Raise unless the word table agrees with the real tokenizer on `captions`."""
        real = self.tokenizer(captions, padding="max_length", max_length=self.length).input_ids
        if self(captions).tolist() != real:
            raise RuntimeError("fast caption ids differ from the tokenizer's")


def cosine_lr(progress: float, peak: float, warmup: float = 0.03, floor: float = 0.1) -> float:
    """Learning rate at `progress` (0..1 of the time budget): linear warm-up, cosine to floor*peak."""
    if progress < warmup:
        return peak * progress / warmup
    t = min(1.0, (progress - warmup) / (1 - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def render_pool(
    count: int, seed: int, device: str, varied: bool, chunk: int = 1024
) -> torch.Tensor:
    """(count, 3, 64, 64) uint8 pictures on `device`, rendered in chunks."""
    out = []
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        sample = toyworld.sample_varied_scenes if varied else toyworld.sample_scenes
        images = toyworld.render(sample(n, seed + start), device=device)
        out.append((images * 255).round().to(torch.uint8))
    return torch.cat(out)


def train_vae(args: argparse.Namespace, log: dict) -> AutoencoderKL:
    """Phase 1: the autoencoder, L1 + MSE + a small KL term, on toy and varied pictures."""
    device = args.device
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**VAE_CONFIG).to(device).train()
    t0 = time.time()
    pool = torch.cat(
        [
            render_pool(args.pool // 2, args.seed + 10_000_000, device, varied=False),
            render_pool(args.pool // 2, args.seed + 20_000_000, device, varied=True),
        ]
    )
    log["vae"]["pool_seconds"] = round(time.time() - t0, 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    losses, window, step, start = [], [], 0, time.time()
    while (progress := (time.time() - start) / args.vae_seconds) < 1:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(progress, args.vae_lr)
        index = torch.randint(len(pool), (args.vae_batch,), device=device)
        x = pool[index].float() / 127.5 - 1  # (B, 3, 64, 64) in [-1, 1]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            posterior = vae.encode(x).latent_dist
            rec = vae.decode(posterior.sample()).sample
        rec = rec.float()
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent dim
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        window.append(loss.detach())
        step += 1
        if step % 100 == 0:
            losses.append([step, round(float(torch.stack(window).mean()), 5)])
            window = []
            print(f"vae step {step} loss {losses[-1][1]} ({time.time() - start:.0f}s)", flush=True)
    log["vae"].update(steps=step, seconds=round(time.time() - start, 1), losses=losses)
    vae.eval().requires_grad_(False)

    # SD's scaling factor is 1 / std of the latents; measure ours on toy pictures.
    with torch.no_grad():
        x = pool[: args.pool // 2][:4096].float() / 127.5 - 1
        means = torch.cat([vae.encode(c).latent_dist.mean for c in x.split(512)])
        rec = torch.cat([vae.decode(m).sample for m in means.split(512)])
        log["vae"]["toy_reconstruction_mse"] = round(float(F.mse_loss(rec, x)), 5)
        x = pool[args.pool // 2 :][:4096].float() / 127.5 - 1
        rec = torch.cat([vae(c).sample for c in x.split(512)])
        log["vae"]["varied_reconstruction_mse"] = round(float(F.mse_loss(rec, x)), 5)
        style = style_samples(device)
        log["vae"]["style_samples_reconstruction_mse"] = round(
            float(F.mse_loss(vae(style).sample, style)), 5
        )
    scaling = round(1.0 / float(means.std()), 5)
    vae.register_to_config(scaling_factor=scaling)
    log["vae"]["scaling_factor"] = scaling
    return vae


def style_samples(device: str) -> torch.Tensor:
    """samples/style pictures resized to 64 px, in [-1, 1]."""
    folder = Path(__file__).resolve().parent.parent / "samples" / "style"
    images = []
    for path in sorted(folder.glob("*.png")):
        image = Image.open(path).convert("RGB").resize((64, 64), Image.BICUBIC)
        images.append(
            torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(64, 64, 3)
        )
    return torch.stack(images).permute(0, 3, 1, 2).float().to(device) / 127.5 - 1


def train_unet(args: argparse.Namespace, vae: AutoencoderKL, tokenizer: CLIPTokenizer, log: dict):
    """Phase 2: UNet + text encoder from scratch, epsilon prediction, EMA weights returned."""
    device = args.device
    torch.manual_seed(args.seed + 1)
    unet = UNet2DConditionModel(**UNET_CONFIG).to(device).train()
    text_encoder = CLIPTextModel(text_config(tokenizer)).to(device).train()
    ema = [
        copy.deepcopy(unet).eval().requires_grad_(False),
        copy.deepcopy(text_encoder).eval().requires_grad_(False),
    ]
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    alphas = noise_scheduler.alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)

    # Pool: pictures -> latent mean/std once (sampled afresh each step), captions -> ids.
    t0 = time.time()
    words = WordIds(tokenizer)
    scenes_seed = args.seed + 30_000_000
    means, stds, ids = [], [], []
    for start in range(0, args.pool, 1024):
        n = min(1024, args.pool - start)
        scenes = toyworld.sample_scenes(n, scenes_seed + start)
        images = toyworld.render(scenes, device=device) * 2 - 1
        rng = random.Random(scenes_seed + start)
        captions = [toyworld.caption(scenes, i, rng) for i in range(n)]
        if start == 0:
            words.check(captions[:64] + [""])
        with torch.no_grad():
            dist = vae.encode(images).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        ids.append(words(captions).to(device))
    means, stds, ids = torch.cat(means), torch.cat(stds), torch.cat(ids)
    empty = words([""]).to(device)
    scaling = vae.config.scaling_factor
    log["unet"]["pool_seconds"] = round(time.time() - t0, 1)

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    losses, window, step, start = [], [], 0, time.time()
    while (progress := (time.time() - start) / args.unet_seconds) < 1:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(progress, args.lr)
        index = torch.randint(args.pool, (args.batch,), device=device)
        # encode -> noise -> timesteps -> add_noise -> condition -> predict -> target
        latents = (means[index] + stds[index] * torch.randn_like(means[index])) * scaling
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (args.batch,), device=device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        drop = torch.rand(args.batch, device=device) < args.caption_dropout
        batch_ids = torch.where(drop[:, None], empty, ids[index])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            hidden = text_encoder(batch_ids)[0]
            pred = unet(noisy, timesteps, hidden).sample
        weight = snr[timesteps].clamp(max=args.min_snr) / snr[timesteps]  # min-SNR-gamma, epsilon
        loss = (
            F.mse_loss(pred.float(), noise.float(), reduction="none").mean((1, 2, 3)) * weight
        ).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for model, avg in zip((unet, text_encoder), ema, strict=True):
                torch._foreach_lerp_(list(avg.parameters()), list(model.parameters()), 1 - decay)
        window.append(loss.detach())
        if step % 200 == 0:
            losses.append([step, round(float(torch.stack(window).mean()), 5)])
            window = []
            print(f"unet step {step} loss {losses[-1][1]} ({time.time() - start:.0f}s)", flush=True)
    log["unet"].update(steps=step, seconds=round(time.time() - start, 1), losses=losses)
    return ema[0], ema[1]


@torch.no_grad()
def evaluate(folder: Path, device: str, log: dict, grid_path: Path) -> None:
    """Color accuracy of the saved pipeline (loaded in fp32) over prompts and sampler settings."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    colors = list(toyworld.COLORS)
    prompts = [
        f"a {c} {toyworld.SHAPES[i % len(toyworld.SHAPES)]}" for i in range(6) for c in colors
    ]
    results = []
    for steps, guidance in ((10, 4.0), (20, 4.0), (20, 7.5), (10, 7.5), (20, 2.0)):
        generators = [torch.Generator("cpu").manual_seed(i) for i in range(len(prompts))]
        images = pipe(
            prompts,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            height=64,
            width=64,
            output_type="pt",
        ).images
        found = toyworld.dominant_shape_color(images)
        wanted = [p.split()[1] for p in prompts]
        accuracy = sum(f == w for f, w in zip(found, wanted, strict=True)) / len(prompts)
        results.append(dict(steps=steps, guidance=guidance, color_accuracy=round(accuracy, 3)))
        print(f"eval steps {steps} guidance {guidance}: color accuracy {accuracy:.3f}", flush=True)
        if (steps, guidance) == (20, 7.5):
            grid = (
                images[:48]
                .reshape(6, 8, 3, 64, 64)
                .permute(0, 3, 1, 4, 2)
                .reshape(6 * 64, 8 * 64, 3)
            )
            Image.fromarray((grid * 255).round().byte().cpu().numpy()).save(grid_path)
    log["eval"] = results


def main() -> None:
    """Pretrain, save fp16 diffusers folder, evaluate, write the log."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/toy_base"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", type=int, default=98304, help="pictures rendered once per phase")
    parser.add_argument("--vae-seconds", type=float, default=80)
    parser.add_argument("--vae-batch", type=int, default=256)
    parser.add_argument("--vae-lr", type=float, default=5e-4)
    parser.add_argument("--kl-weight", type=float, default=1e-6, help="per latent dim")
    parser.add_argument("--unet-seconds", type=float, default=240)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--min-snr", type=float, default=5.0)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--no-eval", action="store_true")
    args = parser.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    begin = time.time()
    log: dict = {"recipe": {k: str(v) for k, v in vars(args).items()}, "vae": {}, "unet": {}}
    log["recipe"].update(
        unet=str(UNET_CONFIG),
        vae=str(VAE_CONFIG),
        device_name=(torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"),
        torch=torch.__version__,
    )
    tokenizer = make_tokenizer()
    vae = train_vae(args, log)
    unet, text_encoder = train_unet(args, vae, tokenizer, log)

    folder = args.out / "toy"
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    write_tokenizer_files(folder / "tokenizer")  # vocab.json/merges.txt too, for any CLIPTokenizer
    counts = {
        n: sum(p.numel() for p in getattr(pipe, n).parameters())
        for n in ("unet", "vae", "text_encoder")
    }
    log["parameters"] = counts
    log["folder_bytes"] = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    if not args.no_eval:
        evaluate(folder, args.device, log, args.out / "grid.png")
    log["total_seconds"] = round(time.time() - begin, 1)
    (args.out / "log.json").write_text(json.dumps(log, indent=1))
    print(
        json.dumps({k: log[k] for k in ("parameters", "folder_bytes", "total_seconds")}), flush=True
    )


if __name__ == "__main__":
    main()
