"""Training settings: one dataclass whose fields each declare one option, once.

A field's `option(...)` holds everything the front ends need: its help text, bounds, choices,
--help group, command-line specifics, resume rule and web-UI label (peft's `LoraConfig` keeps
help in `field(metadata=...)` the same way). From it come the `sdlora train` flags and --help
(train/command.py), the TOML keys (`rank = 8`; hyphens and underscores both work), the
per-field checks in `TrainConfig.check`, `RESUME_MUST_MATCH`/`RUN_ONLY` and the Train form's
labels and limits (ui/). Adding an option is one field here plus the code that uses it.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sdlora.errors import FLAGS, SdloraError
from sdlora.lora.embeddings import parse_token_spec
from sdlora.lora.layer import NONLINEARITIES

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "schedulefree")
COMPILE_MODES = ("auto", "on", "off")
# --compile auto compiles on CUDA when the run has at least this many optimizer steps per bucket:
# compiling costs about as much time as this many steps save. SD 1.5 on an H200, an empty compile
# cache, compile workers (train/precompile.py): about 65 s more start-up than eager, then 63 ms a
# step instead of 210 at batch 8 and 56 instead of 156 at batch 1, so it pays after 450-650 steps
# (benchmarks/first_run.py, docs/performance.md).
COMPILE_MIN_STEPS = 600
# ... and per family where its measurements differ. SDXL at 1024 px, batch 1, on an H200: the
# uncompiled step waits on the host (0.53 s, 1.9 img/s) and the compiled one takes 0.11 s, so the
# ~80 s that compiling adds (workers 44 s, first step 9.6 s, recording CUDA graphs 26 s) are paid
# back after about 200 steps (whole commands: 300 uncompiled steps 160.9 s; 200 compiled 132.7 s)
COMPILE_MIN_STEPS_BY_FAMILY = {"sdxl": 200}
BASE_PRECISIONS = ("auto", "full", "fp8")
MAX_SWAPPED_BLOCKS = 1000  # SDXL's UNet has 70 transformer blocks
CROPS = ("center", "random")
PREDICTION_TYPES = ("epsilon", "v_prediction")
LOSS_TYPES = ("l2", "huber", "smooth_l1")  # kohya sd-scripts' names
HUBER_SCHEDULES = ("constant", "exponential", "snr")
# flow matching's timestep sampling and loss weighting (SD 3.x): the diffusers SD3 example's set
WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap")
# Sides of every training image are multiples of this: the SD VAE's factor 8 times 8, so the
# latent side stays divisible through the UNet's downsampling.
SIDE_MULTIPLE = 64
# SD trains at 512-1024 px; buckets reach twice the resolution, so 2048 already means 4096 px sides
MAX_RESOLUTION = 2048
DEFAULT_STEPS = 1000  # when neither steps nor epochs is given

# Upper bounds: what a real run could need, and no more (a typo such as 1e9 is refused at once
# instead of running until it is killed).
MAX_STEPS = 1_000_000  # long SDXL fine-tunes take tens of thousands
MAX_RANK = 1024  # ranks past 256 are rare; a module's own size is checked when it is built
MAX_BATCH = 256  # images per process per micro-batch
MAX_LR = 1.0  # AdamW learning rates are 1e-6..1e-2; 1 is already far past divergence
MAX_NAME_BYTES = 200  # adapter name: NAME-best.safetensors must stay within 255-byte file names

# --help groups, in the order --help shows them
FILES = "data and output"
ADAPTER = "adapter"
LENGTH = "length and batches"
IMAGES = "images and captions"
OPTIMISATION = "optimisation"
PRIOR = "regularization (prior-preservation) images"
PIVOTAL = "pivotal tuning (new words trained with the LoRA)"
VALIDATION = "validation"
OUTPUTS = "checkpoints, samples, logs"

MATCH = "match"  # a resumed run must use the checkpoint's value: it decides what the weights mean
RUN = "run"  # about this run, not the adapter: left out of the adapter's metadata


@dataclass(frozen=True)
class Option:
    """What a front end needs to know about one setting (a TrainConfig field's metadata)."""

    help: str  # --help text, also the web UI's tooltip
    group: str  # --help group
    default_text: str | None = None  # how --help states the default when the value alone won't
    min: float | None = None  # inclusive bounds of a number
    max: float | None = None
    above: float | None = None  # exclusive lower bound (a rate that must be positive)
    below: float | None = None  # exclusive upper bound (a probability that cannot be 1)
    multiple: int | None = None  # a number must be a multiple of this
    choices: tuple[str, ...] | None = None
    nonempty: bool = False  # text that must not be empty when given
    # command line
    flag: str | None = None  # the flag's name when it is not the field's (--sample-prompt)
    short: str | None = None  # e.g. "-o"
    metavar: str | None = None
    const: str | None = None  # the flag's value may be left out: it is then this (--resume)
    positional: bool = False  # an optional positional argument (DATA_DIR)
    resume: str | None = None  # MATCH, RUN or None
    label: str | None = None  # the web UI's label, for settings its Train form shows

    def bounds(self) -> str:
        """The allowed range in words ("from 1 to 1000000", "positive, at most 1"), or ""."""
        if self.min is not None:
            low = f"from {_number(self.min)}"
        elif self.above is not None:
            low = "positive" if self.above == 0 else f"above {_number(self.above)}"
        else:
            low = ""
        if self.max is not None:
            high = f"{'to' if self.min is not None else 'at most'} {_number(self.max)}"
        elif self.below is not None:
            high = f"{'to below' if self.min is not None else 'below'} {_number(self.below)}"
        else:
            high = ""
        text = (" " if self.min is not None else ", ").join(p for p in (low, high) if p)
        return f"a multiple of {self.multiple} {text}" if self.multiple else text


def _number(x: float) -> str:
    if isinstance(x, int) and x > 2**32 and (x + 1).bit_count() == 1:
        return f"2**{(x + 1).bit_length() - 1} - 1"  # 2**64 - 1
    return f"{x:g}" if isinstance(x, float) else str(x)


def option(default: Any = MISSING, help: str = "", *, group: str, factory: Any = None, **spec: Any):
    """A TrainConfig field declared with its `Option` (see there for `spec`)."""
    metadata = {"option": Option(help=help, group=group, **spec)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything `train()` needs. Defaults give a sensible SD 1.x LoRA run."""

    # --- what to train on, where results go ---
    data_dir: str = option(  # folder of images, searched recursively
        "",
        "folder of training images",
        group=FILES,
        positional=True,
        metavar="DATA_DIR",
        label="Dataset folder",
    )
    output: str = option(  # folder for the adapter, checkpoints/, samples/ and logs/
        "",
        "folder for the adapter and checkpoints",
        group=FILES,
        short="-o",
        metavar="DIR",
        resume=RUN,
    )
    name: str | None = option(  # adapter file name; None: the data folder's name
        None,
        "adapter file name",
        group=FILES,
        default_text="the data folder's name",
        label="Adapter name",
    )
    base: str = option(  # built-in (sdlora.bases.base.BUILTIN), a folder, a single file, a Hub id
        "toy",
        "base model: toy (built in, pretrained, 64 px), tiny / tiny-v2 / tiny-xl / tiny-sd3 (built "
        "in, random weights, SD 1.x / SD 2.x / SDXL / SD 3.5 shaped, for tests), a diffusers model "
        "folder, a single original-layout .safetensors file, or a Hub id such as "
        "stabilityai/stable-diffusion-2-1",
        group=FILES,
        nonempty=True,
        resume=MATCH,
    )
    base_config: str | None = option(  # diffusers folder describing a single-file base
        None,
        "diffusers folder describing a single-file base",
        group=FILES,
        metavar="DIR",
        nonempty=True,
    )
    no_t5: bool = option(  # SD 3.x without text_encoder_3: zeros in T5's place, as diffusers does
        False,
        "SD 3.x: leave the T5-XXL text encoder out (not loaded; zeros in its place, as the "
        "pipeline runs without it); generate with --no-t5 too",
        group=FILES,
        resume=MATCH,
    )
    t5_max_length: int = option(  # 77: as SD 3 was trained; the pipeline samples with 256
        77,
        "SD 3.x: T5 tokens per caption in training; 77 as SD 3 itself was trained (and kohya and "
        "the diffusers example train), the pipeline's 256 mostly adds padding that every step "
        "attends to",
        group=OPTIMISATION,
        min=1,
        max=512,
        metavar="N",
        resume=MATCH,
    )

    # kohya sd-scripts' dataset TOML ([general], [[datasets]], [[datasets.subsets]]), read onto
    # the options below by train/kohya_dataset.py; what it cannot express is refused by name
    dataset_config: str | None = option(
        None,
        "kohya sd-scripts' dataset TOML (--dataset_config) instead of DATA_DIR: one training "
        "subset and at most one is_reg subset; its keys become the options here, keys sdlora "
        "cannot honour are refused by name",
        group=FILES,
        metavar="FILE",
        nonempty=True,
    )

    # --- the adapter ---
    rank: int = option(
        8, "LoRA rank", group=ADAPTER, min=1, max=MAX_RANK, resume=MATCH, label="Rank"
    )
    alpha: float | None = option(  # None means alpha = rank, i.e. scale 1
        None,
        "LoRA alpha; scale = alpha / rank",
        group=ADAPTER,
        default_text="rank",
        above=0,
        max=MAX_RANK * 16,
        resume=MATCH,
    )
    nonlinearity: str = option(  # σ between down and up; identity is a plain LoRA
        "identity",
        "σ between down and up",
        group=ADAPTER,
        choices=NONLINEARITIES,
        resume=MATCH,
        label="Nonlinearity",
    )
    dropout: float = option(  # dropout on the adapter's input while training
        0.0, "dropout on the adapter input", group=ADAPTER, min=0, below=1, resume=MATCH
    )
    targets: str = option(  # denoiser preset (attn, attn-ff, all, locon) or comma-separated names
        "attn",
        "UNet modules: attn, attn-ff, all, locon (all + ResNet convolutions and the "
        "down/up-samplers); SD 3.x transformer: attn (both streams' attention, MMDiT-X's attn2 "
        "too), attn-mlp (+ ff, ff_context), all (+ the adaLN norm1.linear, "
        "norm1_context.linear); or comma-separated module names",
        group=ADAPTER,
        metavar="NAMES",
        nonempty=True,
        resume=MATCH,
    )
    conv_rank: int | None = option(  # rank of k×k convolutions (LoCon); None: --rank
        None,
        "rank of k×k convolutions (LoCon: a k×k down, a 1×1 up)",
        group=ADAPTER,
        default_text="--rank",
        min=1,
        max=MAX_RANK,
        metavar="R",
        resume=MATCH,
    )
    conv_alpha: float | None = option(  # None means alpha = conv rank
        None,
        "alpha of k×k convolutions; needs --conv-rank",
        group=ADAPTER,
        default_text="the conv rank, i.e. scale 1",
        above=0,
        max=MAX_RANK * 16,
        metavar="A",
        resume=MATCH,
    )
    dora: bool = option(  # DoRA: also learn a magnitude per output row (sdlora/lora/dora.py)
        False,
        "DoRA: learn a magnitude per output row besides the low-rank direction change "
        "(saved as dora_scale; needs --nonlinearity identity)",
        group=ADAPTER,
        resume=MATCH,
        label="DoRA",
    )
    train_text_encoder: bool = option(  # also train a LoRA on the text encoder
        False,
        "also train a LoRA on the text encoder (SDXL, SD 3.x: on both CLIP encoders; SD 3.x's "
        "T5-XXL stays frozen: diffusers' SD3 loader reads no T5 LoRA)",
        group=ADAPTER,
        resume=MATCH,
        label="Also train the text encoder",
    )
    text_encoder_targets: str = option(  # text-encoder preset or module names
        "attn",
        "text-encoder modules: attn, attn-ff, all, or names",
        group=ADAPTER,
        metavar="NAMES",
        nonempty=True,
        resume=MATCH,
    )

    # --- how long ---
    steps: int | None = option(  # optimizer steps; None: from epochs, or 1000 if neither given
        None,
        "optimizer steps",
        group=LENGTH,
        default_text=f"{DEFAULT_STEPS} unless --epochs",
        min=1,
        max=MAX_STEPS,
        label="Steps",
    )
    epochs: int | None = option(  # passes over the data (with repeats); give steps or epochs
        None, "passes over the data, repeats included", group=LENGTH, min=1, max=100_000
    )
    batch_size: int = option(  # images per process per micro-batch
        1,
        "images per process per micro-batch",
        group=LENGTH,
        min=1,
        max=MAX_BATCH,
        resume=MATCH,
        label="Batch size",
    )
    grad_accum: int = option(  # micro-batches per optimizer step
        1, "micro-batches per optimizer step", group=LENGTH, min=1, max=MAX_BATCH, resume=MATCH
    )

    # --- data ---
    # about resolution² pixels per image, a multiple of 64; None: the size the base was made for
    # (SD 1.x 512, SD 2.x 768 or 512, SDXL 1024, built-in bases 64; see setup.base_resolution)
    resolution: int | None = option(
        None,
        "about N² pixels per image",
        group=IMAGES,
        default_text="the base's own size: SD 1.x 512, SD 2.x 768 or 512, SDXL 1024, "
        "built-in bases 64",
        min=SIDE_MULTIPLE,
        max=MAX_RESOLUTION,
        multiple=SIDE_MULTIPLE,
        resume=MATCH,
        label="Resolution",
    )
    buckets: bool = option(  # aspect-ratio buckets, so nothing is squashed; False: square crops
        True, "aspect-ratio buckets so nothing is squashed", group=IMAGES, resume=MATCH
    )
    crop: str = option("center", "crop into the bucket", group=IMAGES, choices=CROPS)
    flip: bool = option(  # random horizontal flip (turns latent caching off)
        False, "random horizontal flips", group=IMAGES
    )
    caption: str | None = option(  # caption for images with no .txt or metadata.jsonl entry
        None, "caption for images without a .txt or metadata.jsonl entry", group=IMAGES
    )
    trigger: str | None = option(  # word put in front of every caption
        None,
        "word put in front of every caption",
        group=IMAGES,
        metavar="WORD",
        label="Trigger word",
    )
    caption_dropout: float = option(  # probability of training an image with an empty caption
        0.0,
        "train with an empty caption with probability P",
        group=IMAGES,
        min=0,
        below=1,
        metavar="P",
    )
    repeats: int = option(  # kohya's num_repeats: times each N_name folder's own count
        1,
        "each image N times per epoch (on top of an N_name folder's repeats)",
        group=IMAGES,
        min=1,
        max=10_000,
        metavar="N",
    )
    masked_loss: bool = option(  # kohya's masked_loss: the loss averaged over the mask
        False,
        "train only where each image's mask is white: its alpha channel, or the image of the "
        "same name in --mask-data; the mask is resized, cropped and flipped with the image, "
        "shrunk to the latents by area, and the loss averaged over it",
        group=IMAGES,
        label="Masked loss (alpha channel)",
    )
    mask_data: str | None = option(  # masks by relative path and name, any image suffix
        None,
        "with --masked-loss: a folder of masks laid out as DATA_DIR (IMAGE's mask is "
        "MASK_DATA/same/path/IMAGE.png or any image suffix), white trained, black ignored",
        group=IMAGES,
        metavar="DIR",
        nonempty=True,
    )
    shuffle_tags: bool = option(  # shuffle comma-separated tags (turns text caching off)
        False, "shuffle comma-separated tags", group=IMAGES
    )
    keep_tags: int = option(  # with shuffle_tags: the first N tags stay in place
        1,
        "with --shuffle-tags, keep the first N in place",
        group=IMAGES,
        min=0,
        max=1000,
        metavar="N",
    )
    cache: bool = option(  # cache VAE latents / text embeddings when nothing random re-encodes
        True, "cache latents and text embeddings when possible", group=IMAGES
    )
    workers: int | None = option(  # image loaders when latents are not cached
        None,
        "image-loading processes when latents are not cached",
        group=IMAGES,
        default_text="half the CPU cores, at most 8",
        min=0,
        max=64,
        resume=RUN,
    )

    # --- optimisation ---
    lr: float = option(  # UNet LoRA learning rate
        1e-4, "learning rate", group=OPTIMISATION, above=0, max=MAX_LR, label="Learning rate"
    )
    text_encoder_lr: float | None = option(  # None: same as lr (SDXL: both text encoders)
        None,
        "text-encoder learning rate, SDXL: of both encoders",
        group=OPTIMISATION,
        default_text="--lr",
        min=0,
        max=MAX_LR,
    )
    text_encoder_2_lr: float | None = option(  # SDXL's second (OpenCLIP-bigG)
        None,
        "SDXL: learning rate of the second text encoder, OpenCLIP-bigG",
        group=OPTIMISATION,
        default_text="--text-encoder-lr",
        min=0,
        max=MAX_LR,
    )
    loraplus_lr_ratio: float | None = option(  # LoRA+ (Hayou et al. 2024); kohya's name
        None,
        "LoRA+: the up (B) factors learn at R times the rate of the down (A) factors, in the "
        "UNet and (unless --loraplus-text-encoder-lr-ratio says otherwise) the text encoders; "
        "16 is the paper's choice",
        group=OPTIMISATION,
        default_text="off",
        min=1,
        max=1000,
        metavar="R",
        resume=MATCH,
        label="LoRA+ ratio",
    )
    loraplus_text_encoder_lr_ratio: float | None = option(  # kohya's name, too
        None,
        "LoRA+ ratio of the text encoders' LoRA (kohya: loraplus_text_encoder_lr_ratio); 1 "
        "trains them as plain LoRA",
        group=OPTIMISATION,
        default_text="--loraplus-lr-ratio",
        min=1,
        max=1000,
        metavar="R",
        resume=MATCH,
        label="LoRA+ ratio, text encoders",
    )
    lr_scheduler: str = option(  # one of LR_SCHEDULERS
        "constant",
        "how the learning rate changes over the run",
        group=OPTIMISATION,
        choices=LR_SCHEDULERS,
        label="LR schedule",
    )
    warmup_steps: int = option(
        0, "LR warm-up steps", group=OPTIMISATION, min=0, max=MAX_STEPS, metavar="N"
    )
    lr_warmup_ratio: float = option(  # warm-up as a share of the run: 0.05 warms for 5% of it
        0.0,
        "LR warm-up as a fraction of the optimizer steps, instead of --warmup-steps",
        group=OPTIMISATION,
        min=0,
        max=1,
        metavar="F",
    )
    optimizer: str = option(  # one of OPTIMIZERS; train/models.py make_optimizer builds it
        "adamw",
        "adamw (fused on CUDA), adamw8bit (needs bitsandbytes), prodigy (d-adaptation, give "
        "--lr 1; needs prodigyopt), adafactor (transformers', at the given lr) or schedulefree "
        "(schedule-free AdamW, constant --lr-scheduler; needs schedulefree)",
        group=OPTIMISATION,
        choices=OPTIMIZERS,
        resume=MATCH,
        label="Optimizer",
    )
    optimizer_args: list[str] = option(  # KEY=VALUE, e.g. d_coef=2; see optimizer_kwargs
        help="KEY=VALUE passed to the optimizer's constructor, e.g. d_coef=2 or "
        "safeguard_warmup=false (numbers, true/false or text); several in one value separated "
        "by spaces, or repeat the option",
        group=OPTIMISATION,
        factory=list,
        metavar="KEY=VALUE",
        resume=MATCH,
        label="Optimizer arguments",
    )
    weight_decay: float = option(
        1e-2, "AdamW's weight decay of the LoRA", group=OPTIMISATION, min=0, max=1
    )
    max_grad_norm: float = option(  # gradient clipping; 0 turns it off
        1.0, "gradient clipping, 0 off", group=OPTIMISATION, min=0, max=1000
    )
    mixed_precision: str = option(  # auto: bf16 on GPUs that have it, else fp16; no on CPU
        "auto",
        "auto: bf16 (or fp16) on a GPU, no on the CPU",
        group=OPTIMISATION,
        choices=MIXED_PRECISION,
    )
    gradient_checkpointing: bool = option(  # less memory, about 30% slower
        False, "less memory, slower steps", group=OPTIMISATION
    )
    # torch.compile the UNet's repeated blocks: "on" before the first step; "auto" on CUDA for runs
    # long enough to pay back the compile time (see speed.py), compiled by worker processes while
    # the first steps run uncompiled (precompile.py); off on the CPU unless "on"
    compile: str = option(
        "auto",
        "torch.compile the UNet's repeated blocks; on: before the first step; auto: on a GPU "
        f"for runs of {COMPILE_MIN_STEPS}+ steps per bucket (SDXL: "
        f"{COMPILE_MIN_STEPS_BY_FAMILY['sdxl']}+), in the background while the first steps "
        "run uncompiled",
        group=OPTIMISATION,
        choices=COMPILE_MODES,
        resume=RUN,
    )
    # compiled blocks keep this fraction of their activations for the backward pass and recompute
    # the rest (PyTorch's activation memory budget): 1 keeps all; lower saves memory for speed
    activation_budget: float = option(
        1.0,
        "compiled blocks keep this fraction of their activations for the backward pass and "
        "recompute the rest: less memory, slower steps; unlike --gradient-checkpointing the "
        "blocks still replay as CUDA graphs",
        group=OPTIMISATION,
        default_text="1, keep all",
        min=0,
        max=1,
        metavar="FRACTION",
        resume=RUN,
    )
    # --- memory (train/memory_plan.py picks what is left at "auto" so the run fits the GPU) ---
    # frozen UNet Linear/Conv2d weights: "full" in the compute dtype; "fp8" stored in
    # float8_e4m3fn with a scale per output channel, upcast at each use (sdlora/lora/fp8.py)
    base_precision: str = option(
        "auto",
        "frozen UNet weights: full (the --mixed-precision dtype), or fp8 (8-bit storage, computed "
        "in bf16: half the memory, a small difference in the predictions, see docs/"
        "performance.md); auto: fp8 only when the run would not fit the GPU otherwise",
        group=OPTIMISATION,
        choices=BASE_PRECISIONS,
    )
    # frozen transformer blocks kept on the CPU and copied in ahead of use (train/swap.py)
    blocks_to_swap: int | None = option(
        None,
        "frozen transformer blocks of the UNet kept in CPU memory and copied to the GPU ahead of "
        "their use, for the smallest GPUs: less memory, slower steps, no compiling",
        group=OPTIMISATION,
        default_text="as many as the GPU needs, usually 0",
        min=0,
        max=MAX_SWAPPED_BLOCKS,
        metavar="N",
    )
    # processes compiling the UNet's graphs before (or while) the first steps run (precompile.py)
    compile_workers: int | None = option(
        None,
        "processes that compile the UNet's graphs (each holds GPU memory of its own while it "
        "works); 0: the training process compiles them itself",
        group=OPTIMISATION,
        default_text="as many as fit, at most 8",
        min=0,
        max=8,
        metavar="N",
    )
    min_snr_gamma: float | None = option(  # min-SNR-γ loss weighting (Hang et al. 2023)
        None,
        "min-SNR loss weighting, 5 is usual",
        group=OPTIMISATION,
        default_text="off",
        above=0,
        max=100,
        metavar="GAMMA",
        label="Min-SNR γ",
    )
    noise_offset: float = option(  # per-channel noise offset; 0.05-0.1 helps very dark/bright
        0.0,
        "per-channel noise offset",
        group=OPTIMISATION,
        min=0,
        max=1,
        label="Noise offset",
    )
    loss_type: str = option(  # kohya's conditional_loss: l2, or pseudo-Huber with threshold c
        "l2",
        "l2 (mean squared error), huber: 2c·(sqrt(d²+c²)-c), smooth_l1: 2·(sqrt(d²+c²)-c), "
        "d = prediction - target, c from --huber-c and --huber-schedule (kohya sd-scripts)",
        group=OPTIMISATION,
        choices=LOSS_TYPES,
        label="Loss",
    )
    huber_c: float = option(  # the pseudo-Huber threshold c (its value at t = 0 when scheduled)
        0.1,
        "threshold c of the huber / smooth_l1 loss",
        group=OPTIMISATION,
        above=0,
        max=1,
        metavar="C",
        label="Huber c",
    )
    huber_schedule: str = option(  # kohya's default is snr
        "snr",
        "how c varies with the timestep t: constant c; exponential exp(t·ln(c)/T), from 1 at "
        "t = 0 down to c; snr (1-c)/(1+σ_t)²+c with σ_t = sqrt((1-ᾱ_t)/ᾱ_t)",
        group=OPTIMISATION,
        choices=HUBER_SCHEDULES,
        label="Huber schedule",
    )
    zero_terminal_snr: bool = option(  # Lin et al. 2024, "Common Diffusion Noise Schedules..."
        False,
        "rescale the betas so the last timestep is pure noise (zero terminal SNR, Lin et al. "
        "2024, Algorithm 1); needs v-prediction; generate with rescaled betas and trailing "
        "timesteps too",
        group=OPTIMISATION,
        label="Zero terminal SNR (v-prediction)",
    )
    ip_noise_gamma: float = option(  # input perturbation (Ning et al. 2023); 0.1 is usual
        0.0,
        "input perturbation: the latents are noised with noise + G·(extra noise), the target "
        "stays the noise; 0.1 is usual",
        group=OPTIMISATION,
        min=0,
        max=1,
        metavar="G",
        label="Input perturbation γ",
    )
    multires_noise_iterations: int = option(  # kohya's pyramid_noise_like; 6-10 usual
        0,
        "multi-resolution (pyramid) noise: add this many levels of upsampled coarser noise; "
        "6-10 is usual, 0 off",
        group=OPTIMISATION,
        min=0,
        max=64,
        metavar="N",
        label="Multires noise levels",
    )
    multires_noise_discount: float = option(  # weight of level i is D**i
        0.3,
        "multi-resolution noise: level i is weighted D**i",
        group=OPTIMISATION,
        above=0,
        max=1,
        metavar="D",
        label="Multires noise discount",
    )
    debiased_estimation: bool = option(  # kohya's apply_debiased_estimation
        False,
        "weight each image's loss by 1/sqrt(SNR_t) (v-prediction: 1/(SNR_t+1)), SNR clipped at "
        "1000 (debiased estimation)",
        group=OPTIMISATION,
        label="Debiased estimation",
    )
    prediction_type: str | None = option(  # None: the base's scheduler config says
        None,
        "training target",
        group=OPTIMISATION,
        choices=PREDICTION_TYPES,
        default_text="from the base's scheduler",
    )
    weighting_scheme: str = option(  # SD 3.x: how flow matching draws σ and weights the loss
        "logit_normal",
        "flow matching (SD 3.x): timestep density logit_normal (--logit-mean, --logit-std), "
        "mode (--mode-scale) or uniform; sigma_sqrt (weight 1/σ²) and cosmap (2/(π(1-2σ+2σ²))) "
        "draw uniformly and weight the loss (the diffusers SD3 example's schemes)",
        group=OPTIMISATION,
        choices=WEIGHTING_SCHEMES,
    )
    logit_mean: float = option(  # SD3 paper §3.1: logit-normal(0, 1) was best
        0.0,
        "flow matching, logit_normal: mean of the normal whose sigmoid is the timestep",
        group=OPTIMISATION,
        min=-10,
        max=10,
        metavar="M",
    )
    logit_std: float = option(
        1.0,
        "flow matching, logit_normal: its standard deviation",
        group=OPTIMISATION,
        above=0,
        max=10,
        metavar="S",
    )
    mode_scale: float = option(  # the diffusers example's default 1.29 (SD3 paper §3.1)
        1.29,
        "flow matching, mode: the scale s of the mode density",
        group=OPTIMISATION,
        min=-1,
        max=2,
        metavar="S",
    )
    seed: int = option(  # same seed, same data, same settings: same adapter
        0,
        "same seed and settings, same adapter",
        group=OPTIMISATION,
        min=0,
        max=2**64 - 1,
        resume=MATCH,
        label="Seed",
    )

    # --- regularization (prior-preservation) images: class images beside each batch (prior.py) ---
    reg_data: str | None = option(  # folder of class images (kohya: N_class subfolders)
        None,
        "class images trained beside every batch (kohya: N_class subfolders; DreamBooth's "
        "prior preservation); captions as for DATA_DIR, else --class-prompt, else the N_class "
        "folder's name",
        group=PRIOR,
        metavar="DIR",
        nonempty=True,
        resume=MATCH,
    )
    prior_loss_weight: float = option(  # weight of the class images' loss (DreamBooth's λ)
        1.0,
        "loss = instance + W x class images",
        group=PRIOR,
        min=0,
        max=100,
        metavar="W",
        resume=MATCH,
    )
    class_prompt: str | None = option(  # caption of class images with none of their own
        None,
        "caption of class images that have none",
        group=PRIOR,
        metavar="TEXT",
        resume=MATCH,
    )
    # fill --reg-data up to N class images drawn by the base from --class-prompt before training
    # (seeded, the base's recommended settings), kept in reg_data/sdlora-generated/; 0: never
    reg_generate: int = option(
        0,
        "before training, fill --reg-data up to N class images drawn by the base from "
        "--class-prompt (seeded, the base's recommended settings), kept in "
        "REG_DATA/sdlora-generated/ so a second run draws nothing",
        group=PRIOR,
        default_text="0, never",
        min=0,
        max=10_000,
        metavar="N",
        resume=MATCH,
    )

    # --- pivotal tuning: new words (textual inversion) trained with the LoRA (train/pivotal.py) ---
    new_tokens: list[str] = option(  # TOKEN or TOKEN:N (N vectors), e.g. ohwx
        help="a new word with N vectors (default 1) the text encoder learns beside the LoRA, "
        "e.g. ohwx or ohwx:2; repeat for more. Saved in the adapter (A1111's bundle_emb form) "
        "and as OUTPUT/embeddings/WORD.safetensors (diffusers' load_textual_inversion); put it "
        "in the captions, e.g. with --trigger",
        group=PIVOTAL,
        factory=list,
        flag="new-token",
        metavar="WORD[:N]",
        resume=MATCH,
    )
    # the new words start as this word's embedding; None: random normal at the embeddings' scale
    init_token: str | None = option(
        None,
        "start the new words from this word's embedding (one token of the base, e.g. the "
        "class: person, dog)",
        group=PIVOTAL,
        default_text="random normal at the embeddings' mean and spread",
        metavar="WORD",
        nonempty=True,
        resume=MATCH,
    )
    embedding_lr: float | None = option(  # learning rate of the new words; None: --lr
        None,
        "learning rate of the new words, without weight decay",
        group=PIVOTAL,
        default_text="--lr",
        above=0,
        max=MAX_LR,
        metavar="LR",
    )
    embedding_only_steps: int = option(  # the first N optimizer steps train only the new words
        0,
        "the first N steps train only the new words, then the LoRA joins",
        group=PIVOTAL,
        min=0,
        max=MAX_STEPS,
        metavar="N",
    )

    # --- validation: loss on held-out images at fixed timesteps and noise (train/validate.py) ---
    validation_split: float = option(  # fraction of the images held out (chosen by the seed)
        0.0,
        "hold out this fraction of the images (chosen by --seed) for a validation loss",
        group=VALIDATION,
        default_text="0, none",
        min=0,
        below=1,
        metavar="F",
        resume=MATCH,
    )
    validation_data: str | None = option(  # or a folder of held-out images
        None,
        "a folder of held-out images (captions as for DATA_DIR) for a validation loss",
        group=VALIDATION,
        metavar="DIR",
        nonempty=True,
    )
    validate_every: int = option(  # steps between validation losses (and one at the end)
        100,
        "validation loss (fixed timesteps and noise) every N steps and at the end",
        group=VALIDATION,
        min=1,
        max=MAX_STEPS,
        metavar="N",
    )
    keep_best: bool = option(  # keep the lowest-validation-loss adapter as NAME-best.safetensors
        False,
        "keep the adapter of the lowest validation loss as OUTPUT/NAME-best.safetensors",
        group=VALIDATION,
    )

    # --- checkpoints, samples, logs ---
    save_every: int = option(  # checkpoint every N steps; 0: only the final adapter
        500,
        "checkpoint every N steps, 0 never",
        group=OUTPUTS,
        min=0,
        max=MAX_STEPS,
        metavar="N",
    )
    keep_last: int = option(  # checkpoints kept under output/checkpoints/
        3, "checkpoints kept", group=OUTPUTS, min=1, max=1000, metavar="K"
    )
    sample_every: int = option(  # sample images every N steps (and at the end); 0: never
        0,
        "sample images every N steps and at the end, 0 never",
        group=OUTPUTS,
        min=0,
        max=MAX_STEPS,
        metavar="N",
        label="Sample every",
    )
    sample_prompts: list[str] = option(  # empty: the first caption
        help="prompt for the samples; repeat for more",
        group=OUTPUTS,
        factory=list,
        default_text="a training caption",
        flag="sample-prompt",
        metavar="TEXT",
        label="Sample prompt",
    )
    # one prompt a line, kohya's per-line options (--n --w --h --s --l --d), # comments
    sample_prompts_file: str | None = option(
        None,
        "a file of sample prompts, one a line, with kohya's per-line options: PROMPT --n "
        "NEGATIVE --w WIDTH --h HEIGHT --s STEPS --l GUIDANCE --d SEED (also in --sample-prompt)",
        group=OUTPUTS,
        metavar="FILE",
        nonempty=True,
    )
    sample_steps: int | None = option(  # denoising steps per sample; None: the base's advice
        None,
        "denoising steps per sample",
        group=OUTPUTS,
        default_text="the base's recommended value, 20 for toy, 25 for SD",
        min=1,
        max=1000,
    )
    sample_guidance: float | None = option(  # guidance for samples; None: the base's advice
        None,
        "guidance scale for the samples",
        group=OUTPUTS,
        default_text="the base's recommended value, 2 for toy, 7.5 for SD",
        min=0,
        max=100,
    )
    tensorboard: bool = option(  # TensorBoard logs under output/logs/ (needs tensorboard)
        True, "TensorBoard logs in OUTPUT/logs", group=OUTPUTS, resume=RUN
    )
    log_every: int = option(  # read losses every N steps (each read waits for the GPU)
        10,
        "read and log losses every N steps; each read waits for the GPU",
        group=OUTPUTS,
        min=1,
        max=MAX_STEPS,
        metavar="N",
        resume=RUN,
    )
    resume: str | None = option(  # "latest" or a checkpoint folder; None: start fresh
        None,
        "continue from the latest checkpoint in OUTPUT (or the one given)",
        group=FILES,
        const="latest",
        metavar="CHECKPOINT",
        nonempty=True,
        resume=RUN,
        label="Resume",
    )
    overwrite: bool = option(  # replace an existing adapter and delete old checkpoints
        False,
        "start over where OUTPUT already holds an adapter or checkpoints",
        group=FILES,
        resume=RUN,
        label="Overwrite",
    )

    def optimizer_kwargs(self) -> dict[str, Any]:
        """--optimizer-args as keywords: "d_coef=2 safeguard_warmup=false" gives
        {"d_coef": 2, "safeguard_warmup": False}; values are int, float, bool or text."""
        kwargs: dict[str, Any] = {}
        for item in (part for value in self.optimizer_args for part in value.split()):
            key, sep, text = item.partition("=")
            if not sep or not key.isidentifier():
                raise SdloraError(
                    f"takes KEY=VALUE, e.g. d_coef=2 (got {item!r})", setting="optimizer_args"
                )
            kwargs[key] = parse_arg_value(text)
        return kwargs

    def check(self) -> TrainConfig:
        """Raise SdloraError for settings that cannot work; return self.

        Each field is checked against its declaration first (type, bounds, choices); the rules
        below relate several fields, or say what a declaration cannot."""
        for f in fields(self):
            check_value(f, getattr(self, f.name))

        def need(ok: bool, setting: str, message: str) -> None:
            if not ok:
                raise SdloraError(message, setting=setting)

        if not self.data_dir:  # DATA_DIR has no flag to name: the message says it
            raise SdloraError("no data folder given; pass DATA_DIR (or data_dir in the config)")
        if not self.output:
            raise SdloraError("no output folder given; pass {output} DIR")
        if self.name is not None:
            check_name(self.name)
        check_name(self.adapter_name)  # also a data folder's name taken as the adapter's
        need(
            self.conv_alpha is None or self.conv_rank is not None,
            "conv_alpha",
            "is used only with {conv_rank} (without it k×k convolutions take {rank} and "
            "{alpha}); give {conv_rank} too, or leave {conv_alpha} out",
        )
        need(
            not self.dora or self.nonlinearity == "identity",
            "dora",
            "renormalises W0 + ΔW, and an adapter with a nonlinearity has no ΔW; leave "
            "{nonlinearity} at identity or {dora} out",
        )
        need(
            self.weighting_scheme == "logit_normal" or (self.logit_mean, self.logit_std) == (0, 1),
            "logit_mean",
            "and {logit_std} shape {weighting_scheme} logit_normal (got "
            f"{self.weighting_scheme}); leave them out",
        )
        need(
            self.weighting_scheme == "mode" or self.mode_scale == 1.29,
            "mode_scale",
            f"shapes {{weighting_scheme}} mode (got {self.weighting_scheme}); leave it out",
        )
        need(
            not (self.warmup_steps and self.lr_warmup_ratio),
            "lr_warmup_ratio",
            "and {warmup_steps} cannot both be given: give one",
        )
        self.optimizer_kwargs()  # each KEY=VALUE checked
        need(
            self.mask_data is None or self.masked_loss,
            "mask_data",
            "holds the masks of {masked_loss}; give it too, or leave {mask_data} out",
        )
        need(
            not self.zero_terminal_snr or self.prediction_type != "epsilon",
            "zero_terminal_snr",
            "needs v-prediction: at the last timestep the latents are pure noise, so an "
            "epsilon prediction says nothing about the image; pass {prediction_type} "
            "v_prediction",
        )
        self.sample_prompt_settings()  # each line's options checked
        need(
            self.optimizer != "schedulefree" or self.lr_scheduler == "constant",
            "lr_scheduler",
            f"must be constant with {{optimizer}} schedulefree (got {self.lr_scheduler}): "
            "schedule-free AdamW replaces the schedule; pass {lr_scheduler} constant",
        )
        huber = self.loss_type in ("huber", "smooth_l1")
        need(
            huber or self.huber_c == 0.1,
            "huber_c",
            f"is the threshold of {{loss_type}} huber or smooth_l1 (got {self.loss_type}); "
            "give one of them, or leave {huber_c} out",
        )
        need(
            huber or self.huber_schedule == "snr",
            "huber_schedule",
            f"varies the threshold of {{loss_type}} huber or smooth_l1 (got {self.loss_type}); "
            "give one of them, or leave {huber_schedule} out",
        )
        need(
            self.multires_noise_discount == 0.3 or bool(self.multires_noise_iterations),
            "multires_noise_discount",
            "weights the levels of {multires_noise_iterations}; give it too, or leave "
            "{multires_noise_discount} out",
        )
        need(
            self.steps is None or self.epochs is None,
            "steps",
            "and {epochs} cannot both be given: give {steps} or {epochs}, not both",
        )
        need(
            not self.reg_generate or bool(self.reg_data and self.class_prompt),
            "reg_generate",
            "draws class images into {reg_data} from {class_prompt}; give both",
        )
        tokens = [parse_token_spec(spec)[0] for spec in self.new_tokens]  # each spec checked
        need(
            len(set(tokens)) == len(tokens),
            "new_tokens",
            f"has a word given twice ({', '.join(tokens)})",
        )
        need(
            self.init_token is None or bool(self.new_tokens),
            "init_token",
            "starts new words; give them with {new_tokens}",
        )
        need(
            not self.embedding_only_steps or bool(self.new_tokens),
            "embedding_only_steps",
            "trains new words first; give them with {new_tokens}",
        )
        need(
            self.steps is None or self.embedding_only_steps < self.steps,
            "embedding_only_steps",
            f"{self.embedding_only_steps} leaves no step of the {self.steps} for the LoRA; "
            "give fewer",
        )
        need(
            not (self.validation_split and self.validation_data),
            "validation_split",
            "and {validation_data} cannot both be given; give one",
        )
        need(
            not self.keep_best or self.has_validation,
            "keep_best",
            "needs validation images: add {validation_split} F or {validation_data} DIR",
        )
        need(
            not (self.blocks_to_swap and self.compile == "on"),
            "blocks_to_swap",
            "runs the UNet uncompiled (each swapped layer waits for its copy); leave {compile} "
            "at auto or off",
        )
        need(
            not (self.resume and self.overwrite),
            "resume",
            "continues old checkpoints and {overwrite} deletes them; pick one",
        )
        return self

    @property
    def adapter_name(self) -> str:
        """File stem of the final adapter."""
        return self.name or Path(self.data_dir).resolve().name or "adapter"

    @property
    def adapter_path(self) -> Path:
        return Path(self.output) / f"{self.adapter_name}.safetensors"

    @property
    def best_path(self) -> Path:
        """With --keep-best: the adapter of the lowest validation loss."""
        return Path(self.output) / f"{self.adapter_name}-best.safetensors"

    @property
    def has_validation(self) -> bool:
        return bool(self.validation_split or self.validation_data)

    def sample_prompt_lines(self) -> list[tuple[str, str]]:
        """(where, line) of each sample prompt: "number N" of --sample-prompt, then FILE:LINE
        of --sample-prompts-file (blank lines and # comments left out, as kohya)."""
        lines = [(f"number {i}", text) for i, text in enumerate(self.sample_prompts, 1)]
        if self.sample_prompts_file:
            path = Path(self.sample_prompts_file)
            try:
                text = path.read_text(encoding="utf-8-sig")
            except FileNotFoundError:
                raise SdloraError(
                    f"names {path}, which does not exist; give a file of prompts, one a line",
                    setting="sample_prompts_file",
                ) from None
            except (OSError, UnicodeDecodeError) as err:
                raise SdloraError(
                    f"{path} cannot be read as UTF-8 text ({err})", setting="sample_prompts_file"
                ) from None
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip() and not line.lstrip().startswith("#"):
                    lines.append((f"{path}:{number}", line))
        return lines

    def sample_prompt_settings(self) -> list:
        """Each sample prompt's `SamplePrompt` (train/sample.py), its options checked."""
        from sdlora.train.sample import parse_prompt_line

        return [
            parse_prompt_line(line, where, None if ":" in where else "sample_prompts")
            for where, line in self.sample_prompt_lines()
        ]

    @property
    def caches_latents(self) -> bool:
        """Latents can be cached when every encode of an image gives the same pixels."""
        return self.cache and self.crop == "center" and not self.flip

    @property
    def caches_text(self) -> bool:
        """Text embeddings can be cached when the text encoder is frozen and captions fixed."""
        return self.cache and not self.text_learns and not self.shuffle_tags

    @property
    def text_learns(self) -> bool:
        """Something in the text encoder trains: its LoRA, or new words (pivotal tuning)."""
        return self.train_text_encoder or bool(self.new_tokens)

    def settings(self) -> dict[str, Any]:
        """The settings that describe the adapter, as JSON-able values (for metadata)."""
        return {k: v for k, v in asdict(self).items() if k not in RUN_ONLY}


def parse_arg_value(text: str) -> Any:
    """An --optimizer-args value: int, float, true/false (any case), none, else the text."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def option_of(f: Field) -> Option:
    return f.metadata["option"]


FIELDS = {f.name: f for f in fields(TrainConfig)}
OPTIONS: dict[str, Option] = {name: option_of(f) for name, f in FIELDS.items()}
FIELD_NAMES = set(OPTIONS)
# Fields that decide what a checkpoint means: a resumed run must use the same values.
RESUME_MUST_MATCH = tuple(name for name, o in OPTIONS.items() if o.resume == MATCH)
# Fields about this run rather than about the adapter, left out of the adapter's metadata.
RUN_ONLY = tuple(name for name, o in OPTIONS.items() if o.resume == RUN)
PATH_FIELDS = (
    "data_dir",
    "output",
    "validation_data",
    "reg_data",
    "mask_data",
    "dataset_config",
    "sample_prompts_file",
)
# other names a TOML key or keyword may use: a list's singular flag (sample_prompt = "...")
ALIASES = {o.flag.replace("-", "_"): name for name, o in OPTIONS.items() if o.flag}
FLAGS.update({name: "--" + o.flag for name, o in OPTIONS.items() if o.flag})  # errors name them


def kind_of(f: Field) -> tuple[str, bool]:
    """A field's value type ("int", "float", "str", "bool", "list[str]") and whether None is
    allowed."""
    kind = str(f.type)
    return kind.removesuffix(" | None"), kind.endswith(" | None")


def check_value(f: Field, value: Any) -> None:
    """Raise SdloraError(setting=f.name) when `value` breaks f's declaration."""
    spec, (kind, optional) = OPTIONS[f.name], kind_of(f)

    def refuse(message: str) -> None:
        raise SdloraError(message, setting=f.name)

    if value is None:
        if not optional:
            refuse("must be given")
        return
    if isinstance(value, bool) != (kind == "bool"):
        refuse(f"must be {_KIND_WORDS[kind]} (got {value!r})")
    if kind == "int" and not isinstance(value, int):
        refuse(f"must be a whole number (got {value!r})")
    if kind == "float" and not isinstance(value, int | float):
        refuse(f"must be a number (got {value!r})")
    if kind == "str" and not isinstance(value, str):
        refuse(f"must be text (got {value!r})")
    if kind == "list[str]" and not (
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    ):
        refuse(f"must be a list of text (got {value!r})")
    if kind in ("int", "float"):
        ok = (
            (spec.min is None or value >= spec.min)
            and (spec.max is None or value <= spec.max)
            and (spec.above is None or value > spec.above)
            and (spec.below is None or value < spec.below)
            and (spec.multiple is None or value % spec.multiple == 0)
        )
        if not ok:  # NaN fails every comparison, infinity the upper bound
            refuse(f"must be {spec.bounds()} (got {value!r})")
    if spec.choices is not None and value not in spec.choices:
        refuse(f"must be one of: {', '.join(spec.choices)} (got {value!r})")
    if spec.nonempty and isinstance(value, str) and not value.strip():
        refuse("must not be empty")


_KIND_WORDS = {
    "int": "a whole number",
    "float": "a number",
    "str": "text",
    "bool": "true or false",
    "list[str]": "a list of text",
}


def check_name(name: str) -> None:
    """An adapter name must make plain file names: OUTPUT/NAME.safetensors, NAME-best..."""

    def refuse(message: str) -> None:
        raise SdloraError(f"{name[:60]!r}{'...' if len(name) > 60 else ''} {message}", "name")

    if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        refuse("must be a plain file name (no folders); the adapter is written inside {output}")
    if not name.isprintable():
        refuse("must be printable characters (no newlines, tabs or control characters)")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        refuse(f"is {size} bytes long; give at most {MAX_NAME_BYTES} (file names have a limit)")


def from_text(name: str, text: str) -> Any:
    """A number option's value from command-line text; SdloraError when it is not one."""
    kind, _ = kind_of(FIELDS[name])
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        bounds = OPTIONS[name].bounds()
        what = ("a whole number" if kind == "int" else "a number") + (
            " " if bounds.startswith("from") else ", "
        )
        raise SdloraError(f"must be {what}{bounds} (got {text!r})", setting=name) from None
    return text


def _normalise(values: dict[str, Any], source: str) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        name = ALIASES.get(name, name)
        if name not in FIELD_NAMES:
            close = difflib.get_close_matches(name, FIELD_NAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SdloraError(f"{source}: unknown setting {key!r}{hint}")
        if kind_of(FIELDS[name])[0] == "list[str]" and isinstance(value, str):
            value = [value]
        out[name] = value
    return out


def read_toml_file(path: Path, what: str = "--config") -> dict[str, Any]:
    """A TOML file's tables as they are; one-line SdloraError when it cannot be read."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise SdloraError(
                "reading TOML configs on Python 3.10 needs tomli: pip install tomli"
            ) from None
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SdloraError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise SdloraError(
            f"{path} is a folder; {what} takes a TOML file (e.g. train.toml)"
        ) from None
    except OSError as err:
        raise SdloraError(
            f"{path}: the config file cannot be read ({err.strerror or err})"
        ) from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise SdloraError(f"{path}: not a valid UTF-8 TOML file ({err})") from None
    return raw


def read_toml(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML file; relative paths in it are taken from the file's folder."""
    path = Path(path)
    raw = read_toml_file(path)
    if isinstance(raw.get("train"), dict):  # allow a [train] table
        raw = raw["train"]
    values = _normalise(raw, str(path))
    folder = path.resolve().parent
    for key in PATH_FIELDS:
        if isinstance(values.get(key), str) and values[key]:
            values[key] = os.path.normpath(folder / values[key])  # no "dir/../" in messages
    from sdlora.bases.base import BUILTIN  # here: diffusers' pipelines are slow to import

    for key in ("base", "base_config", "resume"):
        value = values.get(key)
        if (
            isinstance(value, str)
            and value not in (*BUILTIN, "latest")
            and (folder / value).exists()
        ):
            values[key] = os.path.normpath(folder / value)
    return values


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """A TrainConfig from dataclass defaults, then the TOML file at `path`, then `overrides`."""
    values = read_toml(path) if path else {}
    _check_types(values, str(path))
    overrides = _normalise(overrides, "arguments")
    _check_types(overrides, "arguments")
    values.update(overrides)
    if values.get("dataset_config"):
        values = with_dataset_config(values)
    return TrainConfig(**values)


def with_dataset_config(values: dict[str, Any]) -> dict[str, Any]:
    """`values` on top of the settings read from its kohya dataset TOML (dataset_config):
    options given in sdlora's own TOML or on the command line win, except DATA_DIR, which
    the file gives (both is refused)."""
    from sdlora.train.kohya_dataset import read_dataset_config

    if values.get("data_dir"):
        raise SdloraError(
            "and DATA_DIR cannot both be given: the file's image_dir is the data folder",
            setting="dataset_config",
        )
    read = read_dataset_config(values["dataset_config"])
    _check_types(read, str(values["dataset_config"]))
    return {**read, **values, "data_dir": read["data_dir"]}


# annotation -> accepted Python types (TOML gives int for 1 where a float is meant)
_TYPES = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "list[str]": (list,),
}


def _check_types(values: dict[str, Any], source: str) -> None:
    annotations = {f.name: str(f.type) for f in fields(TrainConfig)}
    for key, value in values.items():
        kind = annotations[key]
        optional = kind.endswith(" | None")
        kind = kind.removesuffix(" | None")
        if value is None and optional:
            continue
        ok = isinstance(value, _TYPES[kind]) and not (kind != "bool" and isinstance(value, bool))
        if kind == "list[str]":
            ok = ok and all(isinstance(v, str) for v in value)
        if not ok:
            raise SdloraError(
                f"{source}: {key} must be {kind.replace('str', 'text')}, got {value!r}"
            )
