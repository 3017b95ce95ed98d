"""Training settings: one dataclass, loadable from a TOML file with overrides on top.

Every field is also a `sdlora train` flag (`rank` is `--rank`, `sample_prompts` is
`--sample-prompt`) and a TOML key (`rank = 8`; hyphens and underscores both work).
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sdlora.errors import SdloraError
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
OPTIMIZERS = ("adamw", "adamw8bit")
COMPILE_MODES = ("auto", "on", "off")
# --compile auto compiles on CUDA when the run has at least this many optimizer steps per bucket:
# compiling costs about as much time as this many steps save. SD 1.5 on an H200, an empty compile
# cache, compile workers (train/precompile.py): about 65 s more start-up than eager, then 63 ms a
# step instead of 210 at batch 8 and 56 instead of 156 at batch 1, so it pays after 450-650 steps
# (benchmarks/first_run.py, README Performance).
COMPILE_MIN_STEPS = 600
# ... and per family where its measurements differ. SDXL at 1024 px, batch 1, on an H200: the
# uncompiled step waits on the host (0.53 s, 1.9 img/s) and the compiled one takes 0.11 s, so the
# ~80 s that compiling adds (workers 44 s, first step 9.6 s, recording CUDA graphs 26 s) are paid
# back after about 200 steps (whole commands: 300 uncompiled steps 160.9 s; 200 compiled 132.7 s)
COMPILE_MIN_STEPS_BY_FAMILY = {"sdxl": 200}
CROPS = ("center", "random")
PREDICTION_TYPES = ("epsilon", "v_prediction")
# Sides of every training image are multiples of this: the SD VAE's factor 8 times 8, so the
# latent side stays divisible through the UNet's downsampling.
SIDE_MULTIPLE = 64
# SD trains at 512-1024 px; buckets reach twice the resolution, so 2048 already means 4096 px sides
MAX_RESOLUTION = 2048
DEFAULT_STEPS = 1000  # when neither steps nor epochs is given

# Fields that decide what a checkpoint means: a resumed run must use the same values.
RESUME_MUST_MATCH = (
    "base",
    "rank",
    "alpha",
    "nonlinearity",
    "dropout",
    "targets",
    "conv_rank",
    "conv_alpha",
    "train_text_encoder",
    "text_encoder_targets",
    "optimizer",
    "seed",
    "batch_size",
    "grad_accum",
    "resolution",
    "buckets",
    "validation_split",
    "reg_data",
    "prior_loss_weight",
    "class_prompt",
    "reg_generate",
    "new_tokens",
    "init_token",
)
# Fields about this run rather than about the adapter, left out of the adapter's metadata.
RUN_ONLY = (
    "output",
    "resume",
    "overwrite",
    "workers",
    "tensorboard",
    "compile",
    "activation_budget",
    "log_every",
)
PATH_FIELDS = ("data_dir", "output", "validation_data", "reg_data")


@dataclass
class TrainConfig:
    """Everything `train()` needs. Defaults give a sensible SD 1.x LoRA run."""

    # --- what to train on, where results go ---
    data_dir: str = ""  # folder of images, searched recursively
    output: str = ""  # folder for the adapter, checkpoints/, samples/ and logs/
    name: str | None = None  # adapter file name; None: the data folder's name
    base: str = (
        "toy"  # built-in (sdlora.bases.base.BUILTIN), a diffusers folder, a single file, a Hub id
    )
    base_config: str | None = None  # diffusers folder describing a single-file base

    # --- the adapter ---
    rank: int = 8
    alpha: float | None = None  # None means alpha = rank, i.e. scale 1
    nonlinearity: str = "identity"  # σ between down and up; identity is a plain LoRA
    dropout: float = 0.0  # dropout on the adapter's input while training
    targets: str = "attn"  # UNet preset (attn, attn-ff, all, locon) or comma-separated names
    conv_rank: int | None = None  # rank of k×k convolutions (LoCon); None: --rank
    conv_alpha: float | None = None  # None means alpha = conv rank
    train_text_encoder: bool = False  # also train a LoRA on the text encoder
    text_encoder_targets: str = "attn"  # text-encoder preset or module names

    # --- how long ---
    steps: int | None = None  # optimizer steps; None: from epochs, or 1000 if neither is given
    epochs: int | None = None  # passes over the data (with repeats); give steps or epochs
    batch_size: int = 1  # images per process per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step

    # --- data ---
    # about resolution² pixels per image, a multiple of 64; None: the size the base was made for
    # (SD 1.x 512, SD 2.x 768 or 512, SDXL 1024, built-in bases 64; see setup.base_resolution)
    resolution: int | None = None
    buckets: bool = True  # aspect-ratio buckets, so nothing is squashed; False: square crops
    crop: str = "center"  # center or random crop into the bucket
    flip: bool = False  # random horizontal flip (turns latent caching off)
    caption: str | None = None  # caption for images with no .txt or metadata.jsonl entry
    trigger: str | None = None  # word put in front of every caption
    caption_dropout: float = 0.0  # probability of training an image with an empty caption
    shuffle_tags: bool = False  # shuffle comma-separated tags (turns text caching off)
    keep_tags: int = 1  # with shuffle_tags: the first N tags stay in place
    cache: bool = True  # cache VAE latents / text embeddings when nothing random needs re-encoding
    workers: int | None = (
        None  # image loaders when latents are not cached; None: half the cores, ≤ 8
    )

    # --- optimisation ---
    lr: float = 1e-4  # UNet LoRA learning rate
    text_encoder_lr: float | None = None  # None: same as lr (SDXL: both text encoders)
    text_encoder_2_lr: float | None = None  # SDXL's second (OpenCLIP-bigG); None: text_encoder_lr
    lr_scheduler: str = "constant"  # one of LR_SCHEDULERS
    warmup_steps: int = 0
    optimizer: str = "adamw"  # adamw (fused on CUDA) or adamw8bit (needs bitsandbytes)
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0  # gradient clipping; 0 turns it off
    mixed_precision: str = "auto"  # auto: bf16 on GPUs that have it, else fp16; no on CPU
    gradient_checkpointing: bool = False  # less memory, about 30% slower
    # torch.compile the UNet's repeated blocks: "on" before the first step; "auto" on CUDA for runs
    # long enough to pay back the compile time (see speed.py), compiled by worker processes while
    # the first steps run uncompiled (precompile.py); off on the CPU unless "on"
    compile: str = "auto"
    # compiled blocks keep this fraction of their activations for the backward pass and recompute
    # the rest (PyTorch's activation memory budget): 1 keeps all; lower saves memory for speed
    activation_budget: float = 1.0
    min_snr_gamma: float | None = None  # min-SNR-γ loss weighting (Hang et al. 2023); 5 is usual
    noise_offset: float = 0.0  # per-channel noise offset; 0.05-0.1 helps very dark/bright images
    prediction_type: str | None = None  # None: the base's scheduler config says
    seed: int = 0  # same seed, same data, same settings: same adapter

    # --- regularization (prior-preservation) images: class images beside each batch (prior.py) ---
    reg_data: str | None = None  # folder of class images (kohya: N_class subfolders)
    prior_loss_weight: float = 1.0  # weight of the class images' loss (DreamBooth's λ)
    class_prompt: str | None = None  # caption of class images with none of their own
    # fill --reg-data up to N class images drawn by the base from --class-prompt before training
    # (seeded, the base's recommended settings), kept in reg_data/sdlora-generated/; 0: never
    reg_generate: int = 0

    # --- pivotal tuning: new words (textual inversion) trained with the LoRA (train/pivotal.py) ---
    new_tokens: list[str] = field(default_factory=list)  # TOKEN or TOKEN:N (N vectors), e.g. ohwx
    # the new words start as this word's embedding; None: random normal at the embeddings' scale
    init_token: str | None = None
    embedding_lr: float | None = None  # learning rate of the new words; None: --lr
    embedding_only_steps: int = 0  # the first N optimizer steps train only the new words

    # --- validation: loss on held-out images at fixed timesteps and noise (train/validate.py) ---
    validation_split: float = 0.0  # fraction of the images held out (chosen by the seed)
    validation_data: str | None = None  # or a folder of held-out images
    validate_every: int = 100  # steps between validation losses (and one at the end)
    keep_best: bool = False  # keep the lowest-validation-loss adapter as NAME-best.safetensors

    # --- checkpoints, samples, logs ---
    save_every: int = 500  # checkpoint every N steps; 0: only the final adapter
    keep_last: int = 3  # checkpoints kept under output/checkpoints/
    sample_every: int = 0  # sample images every N steps (and at the end); 0: never
    sample_prompts: list[str] = field(default_factory=list)  # empty: the first caption
    sample_steps: int | None = None  # denoising steps per sample; None: the base's recommendation
    sample_guidance: float | None = None  # guidance for samples; None: the base's recommendation
    tensorboard: bool = True  # TensorBoard logs under output/logs/ (needs tensorboard)
    log_every: int = 10  # read losses from the GPU every N steps (each read waits for the GPU)
    resume: str | None = None  # "latest" or a checkpoint folder; None: start fresh
    overwrite: bool = False  # replace an existing adapter and delete old checkpoints

    def check(self) -> TrainConfig:
        """Raise SdloraError for settings that cannot work; return self."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise SdloraError(message)

        need(bool(self.data_dir), "no data folder given; pass DATA_DIR (or data_dir in the config)")
        need(bool(self.output), "no output folder given; pass --output DIR")
        need(
            self.name is None
            or (
                self.name not in ("", ".", "..")
                and "/" not in self.name
                and "\\" not in self.name
                and "\0" not in self.name
            ),
            f"--name {self.name!r} must be a plain file name (no folders); "
            "the adapter is written inside --output",
        )
        need(self.rank >= 1, f"--rank must be at least 1 (got {self.rank})")
        need(self.alpha is None or self.alpha > 0, f"--alpha must be positive (got {self.alpha})")
        need(
            self.conv_rank is None or self.conv_rank >= 1,
            f"--conv-rank must be at least 1 (got {self.conv_rank})",
        )
        need(
            self.conv_alpha is None or self.conv_alpha > 0,
            f"--conv-alpha must be positive (got {self.conv_alpha})",
        )
        need(
            self.nonlinearity in NONLINEARITIES,
            f"--nonlinearity {self.nonlinearity!r} is unknown; choose one of: "
            + ", ".join(NONLINEARITIES),
        )
        need(0 <= self.dropout < 1, f"--dropout must be in [0, 1) (got {self.dropout})")
        need(
            self.steps is None or self.epochs is None,
            "give --steps or --epochs, not both",
        )
        need(
            self.steps is None or self.steps >= 1, f"--steps must be at least 1 (got {self.steps})"
        )
        need(
            self.epochs is None or self.epochs >= 1,
            f"--epochs must be at least 1 (got {self.epochs})",
        )
        need(self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})")
        need(self.grad_accum >= 1, f"--grad-accum must be at least 1 (got {self.grad_accum})")
        need(
            self.resolution is None
            or SIDE_MULTIPLE <= self.resolution <= MAX_RESOLUTION
            and self.resolution % SIDE_MULTIPLE == 0,
            f"--resolution must be a multiple of {SIDE_MULTIPLE} from {SIDE_MULTIPLE} to "
            f"{MAX_RESOLUTION} (e.g. 512); got {self.resolution}",
        )
        need(self.crop in CROPS, f"--crop must be one of: {', '.join(CROPS)}")
        need(
            0 <= self.caption_dropout < 1,
            f"--caption-dropout must be in [0, 1) (got {self.caption_dropout})",
        )
        need(self.keep_tags >= 0, f"--keep-tags must be 0 or more (got {self.keep_tags})")
        need(
            self.workers is None or self.workers >= 0,
            f"--workers must be 0 or more (got {self.workers})",
        )
        need(self.lr > 0, f"--lr must be positive (got {self.lr})")
        need(
            self.text_encoder_lr is None or self.text_encoder_lr >= 0,
            f"--text-encoder-lr must be 0 or more (got {self.text_encoder_lr})",
        )
        need(
            self.text_encoder_2_lr is None or self.text_encoder_2_lr >= 0,
            f"--text-encoder-2-lr must be 0 or more (got {self.text_encoder_2_lr})",
        )
        need(
            self.lr_scheduler in LR_SCHEDULERS,
            f"--lr-scheduler must be one of: {', '.join(LR_SCHEDULERS)}",
        )
        need(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            f"--weight-decay must be a finite number, 0 or more (got {self.weight_decay})",
        )
        need(0 <= self.seed <= 2**64 - 1, f"--seed must be from 0 to 2**64 - 1 (got {self.seed})")
        need(self.warmup_steps >= 0, "--warmup-steps must be 0 or more")
        need(self.optimizer in OPTIMIZERS, f"--optimizer must be one of: {', '.join(OPTIMIZERS)}")
        need(self.max_grad_norm >= 0, "--max-grad-norm must be 0 or more")
        need(
            self.mixed_precision in MIXED_PRECISION,
            f"--mixed-precision must be one of: {', '.join(MIXED_PRECISION)}",
        )
        need(
            self.min_snr_gamma is None or self.min_snr_gamma > 0,
            "--min-snr-gamma must be positive",
        )
        need(self.noise_offset >= 0, "--noise-offset must be 0 or more")
        need(
            self.prediction_type is None or self.prediction_type in PREDICTION_TYPES,
            f"--prediction-type must be one of: {', '.join(PREDICTION_TYPES)}",
        )
        need(
            self.compile in COMPILE_MODES,
            f"--compile must be one of: {', '.join(COMPILE_MODES)} (got {self.compile!r})",
        )
        need(
            0 <= self.activation_budget <= 1,
            f"--activation-budget must be from 0 to 1 (got {self.activation_budget})",
        )
        need(self.log_every >= 1, f"--log-every must be at least 1 (got {self.log_every})")
        need(
            math.isfinite(self.prior_loss_weight) and self.prior_loss_weight >= 0,
            f"--prior-loss-weight must be a finite number, 0 or more (got {self.prior_loss_weight})",
        )
        need(self.reg_generate >= 0, f"--reg-generate must be 0 or more (got {self.reg_generate})")
        need(
            not self.reg_generate or (self.reg_data and self.class_prompt),
            "--reg-generate draws class images into --reg-data from --class-prompt; give both",
        )
        tokens = [parse_token_spec(spec)[0] for spec in self.new_tokens]  # each spec checked
        need(
            len(set(tokens)) == len(tokens),
            f"--new-token: a word is given twice ({', '.join(tokens)})",
        )
        need(
            self.init_token is None or bool(self.new_tokens),
            "--init-token starts new words; give them with --new-token",
        )
        need(
            self.embedding_lr is None
            or (math.isfinite(self.embedding_lr) and self.embedding_lr > 0),
            f"--embedding-lr must be a positive number (got {self.embedding_lr})",
        )
        need(
            self.embedding_only_steps >= 0,
            f"--embedding-only-steps must be 0 or more (got {self.embedding_only_steps})",
        )
        need(
            not self.embedding_only_steps or bool(self.new_tokens),
            "--embedding-only-steps trains new words first; give them with --new-token",
        )
        need(
            self.steps is None or self.embedding_only_steps < self.steps,
            f"--embedding-only-steps {self.embedding_only_steps} leaves no step of the "
            f"{self.steps} for the LoRA; give fewer",
        )
        need(
            0 <= self.validation_split < 1,
            f"--validation-split must be in [0, 1) (got {self.validation_split})",
        )
        need(
            not (self.validation_split and self.validation_data),
            "give --validation-split or --validation-data, not both",
        )
        need(
            self.validate_every >= 1,
            f"--validate-every must be at least 1 (got {self.validate_every})",
        )
        need(
            not self.keep_best or self.has_validation,
            "--keep-best needs validation images: add --validation-split F or "
            "--validation-data DIR",
        )
        need(self.save_every >= 0, "--save-every must be 0 or more")
        need(self.keep_last >= 1, "--keep-last must be at least 1")
        need(self.sample_every >= 0, "--sample-every must be 0 or more")
        need(
            self.sample_steps is None or self.sample_steps >= 1,
            "--sample-steps must be at least 1",
        )
        need(
            self.sample_guidance is None or math.isfinite(self.sample_guidance),
            "--sample-guidance must be a finite number",
        )
        need(
            not (self.resume and self.overwrite),
            "--resume continues old checkpoints and --overwrite deletes them; pick one",
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


FIELD_NAMES = {f.name for f in fields(TrainConfig)}


def _normalise(values: dict[str, Any], source: str) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name == "sample_prompt":
            name = "sample_prompts"
        if name == "new_token":
            name = "new_tokens"
        if name not in FIELD_NAMES:
            close = difflib.get_close_matches(name, FIELD_NAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SdloraError(f"{source}: unknown setting {key!r}{hint}")
        if name in ("sample_prompts", "new_tokens") and isinstance(value, str):
            value = [value]
        out[name] = value
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML file; relative paths in it are taken from the file's folder."""
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
            f"{path} is a folder; --config takes a TOML file (e.g. train.toml)"
        ) from None
    except OSError as err:
        raise SdloraError(
            f"{path}: the config file cannot be read ({err.strerror or err})"
        ) from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise SdloraError(f"{path}: not a valid UTF-8 TOML file ({err})") from None
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
    return TrainConfig(**values)


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
