"""`sdlora train`: the command-line face of `train()`. argparse stops here.

`register(subparsers)` adds the subcommand to the `sdlora` CLI; `run(args)` turns the flags the
user gave (and nothing else) into overrides on top of the TOML config and the defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from sdlora.errors import SdloraError
from sdlora.train.config import (
    COMPILE_MIN_STEPS,
    COMPILE_MIN_STEPS_BY_FAMILY,
    COMPILE_MODES,
    FIELD_NAMES,
    LR_SCHEDULERS,
    MIXED_PRECISION,
    TrainConfig,
    load_config,
)
from sdlora.train.precompile import start_server_for

DESCRIPTION = """\
Fine-tune a LoRA adapter on a folder of images and write OUTPUT/NAME.safetensors.

Images (jpg, jpeg, png, webp, bmp) are found in DATA_DIR and its subfolders, linked folders
included (each folder is read once; links that lead back are named in a warning); a subfolder
named N_name repeats its images N times. Each image's caption is, in order: IMAGE.txt beside
it, its entry in a metadata.jsonl ({"file_name": ..., "text": ...}; file_name inside DATA_DIR,
text a string), --caption, the file name. Unreadable images are skipped with a warning, and so
are reported metadata lines that name no image and captions longer than the text encoder's
77 tokens (they are cut).

Every option can also come from a TOML file (--config FILE; keys are the option names, e.g.
rank = 8, sample_prompts = ["..."]; relative paths there are taken from the file's folder).
Options given on the command line override the file.
"""

EPILOG = """\
output folder:
  OUTPUT/NAME.safetensors       the adapter (trigger words and settings in its metadata)
  OUTPUT/checkpoints/step-N/    every --save-every steps, the last --keep-last kept
  OUTPUT/samples/step-N.png     every --sample-every steps
  OUTPUT/NAME-best.safetensors  with --keep-best: the adapter of the lowest validation loss
  OUTPUT/logs/                  TensorBoard: tensorboard --logdir OUTPUT/logs

examples:
  sdlora train samples/style --output runs/style --trigger sdlstyle --steps 300 --resolution 64
  sdlora train --config samples/train_tiny.toml --lr 2e-4
  sdlora train photos/ --output runs/me --base ./sd15 --resume
  accelerate launch --multi_gpu --num_processes 2 -m sdlora.cli train photos/ --output runs/me

A run stopped at any moment loses at most the steps since its last checkpoint: run the same
command with --resume to continue.
"""

D = TrainConfig()  # defaults, for the help text


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `train` subcommand to an argparse subparsers object; it runs `run(args)`."""
    p = subparsers.add_parser(
        "train",
        help="fine-tune a LoRA on a folder of images",
        # short usage: a mistyped flag gives two lines, not the whole option list
        usage="%(prog)s DATA_DIR --output DIR [options]   (or --config FILE; see --help)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # only flags the user gave override the config
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    on_off = argparse.BooleanOptionalAction

    g = p.add_argument_group("data and output")
    g.add_argument("data_dir", nargs="?", metavar="DATA_DIR", help="folder of training images")
    g.add_argument("--output", "-o", metavar="DIR", help="folder for the adapter and checkpoints")
    g.add_argument("--config", metavar="FILE", help="TOML file with any of these options")
    g.add_argument("--name", help="adapter file name (default: the data folder's name)")
    g.add_argument(
        "--base",
        help="base model: toy (built in, pretrained, 64 px), tiny / tiny-v2 (built in, random "
        "weights, SD 1.x / SD 2.x shaped, for tests), a diffusers model folder, a single "
        "original-layout .safetensors file, or a Hub id such as stabilityai/stable-diffusion-2-1 "
        f"(default: {D.base})",
    )
    g.add_argument(
        "--base-config", metavar="DIR", help="diffusers folder describing a single-file base"
    )
    g.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CHECKPOINT",
        help="continue from the latest checkpoint in OUTPUT (or the one given)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="start over where OUTPUT already holds an adapter or checkpoints",
    )

    g = p.add_argument_group("adapter")
    g.add_argument("--rank", type=int, help=f"LoRA rank (default: {D.rank})")
    g.add_argument("--alpha", type=float, help="LoRA alpha; scale = alpha / rank (default: rank)")
    g.add_argument(
        "--nonlinearity",
        help="σ between down and up: identity, relu, leaky_relu, "
        f"gelu, silu, tanh (default: {D.nonlinearity})",
    )
    g.add_argument(
        "--dropout", type=float, help=f"dropout on the adapter input (default: {D.dropout})"
    )
    g.add_argument(
        "--targets",
        help="UNet modules: attn, attn-ff, all, locon (all + ResNet convolutions and the "
        f"down/up-samplers), or comma-separated module names (default: {D.targets})",
    )
    g.add_argument(
        "--conv-rank",
        type=int,
        metavar="R",
        help="rank of k×k convolutions (LoCon: a k×k down, a 1×1 up) (default: --rank)",
    )
    g.add_argument(
        "--conv-alpha",
        type=float,
        metavar="A",
        help="alpha of k×k convolutions (default: the conv rank, i.e. scale 1)",
    )
    g.add_argument(
        "--train-text-encoder",
        action=on_off,
        help="also train a LoRA on the text encoder (SDXL: on both) (default: off)",
    )
    g.add_argument(
        "--text-encoder-targets",
        help="text-encoder modules: attn, attn-ff, all, "
        f"or names (default: {D.text_encoder_targets})",
    )

    g = p.add_argument_group("length and batches")
    g.add_argument("--steps", type=int, help="optimizer steps (default: 1000 unless --epochs)")
    g.add_argument("--epochs", type=int, help="passes over the data, repeats included")
    g.add_argument(
        "--batch-size",
        type=int,
        help=f"images per process per micro-batch (default: {D.batch_size})",
    )
    g.add_argument(
        "--grad-accum", type=int, help=f"micro-batches per optimizer step (default: {D.grad_accum})"
    )

    g = p.add_argument_group("images and captions")
    g.add_argument(
        "--resolution",
        type=int,
        help="about RESOLUTION² pixels per image, a multiple of 64 up to 2048 (default: the "
        "base's own size: SD 1.x 512, SD 2.x 768 or 512, SDXL 1024, built-in bases 64)",
    )
    g.add_argument(
        "--buckets", action=on_off, help="aspect-ratio buckets so nothing is squashed (default: on)"
    )
    g.add_argument(
        "--crop", choices=("center", "random"), help="crop into the bucket (default: center)"
    )
    g.add_argument("--flip", action=on_off, help="random horizontal flips (default: off)")
    g.add_argument("--caption", help="caption for images without a .txt or metadata.jsonl entry")
    g.add_argument("--trigger", metavar="WORD", help="word put in front of every caption")
    g.add_argument(
        "--caption-dropout",
        type=float,
        metavar="P",
        help="train with an empty caption with probability P (default: 0)",
    )
    g.add_argument(
        "--shuffle-tags", action=on_off, help="shuffle comma-separated tags (default: off)"
    )
    g.add_argument(
        "--keep-tags",
        type=int,
        metavar="N",
        help=f"with --shuffle-tags, keep the first N in place (default: {D.keep_tags})",
    )
    g.add_argument(
        "--cache",
        action=on_off,
        help="cache latents and text embeddings when possible (default: on)",
    )
    g.add_argument(
        "--workers",
        type=int,
        help="image-loading processes when latents are not cached (default: half the CPU "
        "cores, at most 8)",
    )

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, help=f"learning rate (default: {D.lr})")
    g.add_argument(
        "--text-encoder-lr",
        type=float,
        help="text-encoder learning rate, SDXL: of both encoders (default: --lr)",
    )
    g.add_argument(
        "--text-encoder-2-lr",
        type=float,
        help="SDXL: learning rate of the second text encoder, OpenCLIP-bigG "
        "(default: --text-encoder-lr)",
    )
    g.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, help=f"(default: {D.lr_scheduler})")
    g.add_argument("--warmup-steps", type=int, help=f"LR warm-up steps (default: {D.warmup_steps})")
    g.add_argument(
        "--optimizer",
        choices=("adamw", "adamw8bit"),
        help="adamw (fused on CUDA) or adamw8bit (needs bitsandbytes) (default: adamw)",
    )
    g.add_argument("--weight-decay", type=float, help=f"(default: {D.weight_decay})")
    g.add_argument(
        "--max-grad-norm", type=float, help=f"gradient clipping, 0 off (default: {D.max_grad_norm})"
    )
    g.add_argument(
        "--mixed-precision",
        choices=MIXED_PRECISION,
        help="auto: bf16 (or fp16) on a GPU, no on the CPU (default: auto)",
    )
    g.add_argument(
        "--gradient-checkpointing", action=on_off, help="less memory, slower steps (default: off)"
    )
    g.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        help="torch.compile the UNet's repeated blocks; on: before the first step; auto: on a "
        f"GPU for runs of {COMPILE_MIN_STEPS}+ steps per bucket (SDXL: "
        f"{COMPILE_MIN_STEPS_BY_FAMILY['sdxl']}+), in the background while the "
        "first steps run uncompiled (default: auto)",
    )
    g.add_argument(
        "--activation-budget",
        type=float,
        metavar="FRACTION",
        help="compiled blocks keep this fraction of their activations for the backward pass and "
        "recompute the rest: less memory, slower steps; unlike --gradient-checkpointing the "
        f"blocks still replay as CUDA graphs (default: {D.activation_budget:g}, keep all)",
    )
    g.add_argument(
        "--min-snr-gamma",
        type=float,
        metavar="GAMMA",
        help="min-SNR loss weighting, 5 is usual (default: off)",
    )
    g.add_argument(
        "--noise-offset", type=float, help=f"per-channel noise offset (default: {D.noise_offset})"
    )
    g.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction"),
        help="training target (default: from the base's scheduler)",
    )
    g.add_argument(
        "--seed", type=int, help=f"same seed and settings, same adapter (default: {D.seed})"
    )

    g = p.add_argument_group("regularization (prior-preservation) images")
    g.add_argument(
        "--reg-data",
        metavar="DIR",
        help="class images trained beside every batch (kohya: N_class subfolders; DreamBooth's "
        "prior preservation); captions as for DATA_DIR, else --class-prompt, else the N_class "
        "folder's name",
    )
    g.add_argument(
        "--prior-loss-weight",
        type=float,
        metavar="W",
        help=f"loss = instance + W x class images (default: {D.prior_loss_weight})",
    )
    g.add_argument("--class-prompt", metavar="TEXT", help="caption of class images that have none")
    g.add_argument(
        "--reg-generate",
        type=int,
        metavar="N",
        help="before training, fill --reg-data up to N class images drawn by the base from "
        "--class-prompt (seeded, the base's recommended settings), kept in "
        "REG_DATA/sdlora-generated/ so a second run draws nothing (default: 0, never)",
    )

    g = p.add_argument_group("pivotal tuning (new words trained with the LoRA)")
    g.add_argument(
        "--new-token",
        dest="new_tokens",
        action="append",
        metavar="WORD[:N]",
        help="a new word with N vectors (default 1) the text encoder learns beside the LoRA, "
        "e.g. ohwx or ohwx:2; repeat for more. Saved in the adapter (A1111's bundle_emb form) "
        "and as OUTPUT/embeddings/WORD.safetensors (diffusers' load_textual_inversion); put it "
        "in the captions, e.g. with --trigger",
    )
    g.add_argument(
        "--init-token",
        metavar="WORD",
        help="start the new words from this word's embedding (one token of the base, e.g. "
        "the class: person, dog) (default: random normal at the embeddings' mean and spread)",
    )
    g.add_argument(
        "--embedding-lr",
        type=float,
        metavar="LR",
        help="learning rate of the new words, without weight decay (default: --lr)",
    )
    g.add_argument(
        "--embedding-only-steps",
        type=int,
        metavar="N",
        help="the first N steps train only the new words, then the LoRA joins (default: 0)",
    )

    g = p.add_argument_group("validation")
    g.add_argument(
        "--validation-split",
        type=float,
        metavar="F",
        help="hold out this fraction of the images (chosen by --seed) for a validation loss "
        "(default: 0, none)",
    )
    g.add_argument(
        "--validation-data",
        metavar="DIR",
        help="a folder of held-out images (captions as for DATA_DIR) for a validation loss",
    )
    g.add_argument(
        "--validate-every",
        type=int,
        metavar="N",
        help="validation loss (fixed timesteps and noise) every N steps and at the end "
        f"(default: {D.validate_every})",
    )
    g.add_argument(
        "--keep-best",
        action=on_off,
        help="keep the adapter of the lowest validation loss as OUTPUT/NAME-best.safetensors "
        "(default: off)",
    )

    g = p.add_argument_group("checkpoints, samples, logs")
    g.add_argument(
        "--save-every",
        type=int,
        metavar="N",
        help=f"checkpoint every N steps, 0 never (default: {D.save_every})",
    )
    g.add_argument(
        "--keep-last", type=int, metavar="K", help=f"checkpoints kept (default: {D.keep_last})"
    )
    g.add_argument(
        "--sample-every",
        type=int,
        metavar="N",
        help="sample images every N steps and at the end, 0 never (default: 0)",
    )
    g.add_argument(
        "--sample-prompt",
        dest="sample_prompts",
        action="append",
        metavar="TEXT",
        help="prompt for the samples; repeat for more (default: a training caption)",
    )
    g.add_argument(
        "--sample-steps",
        type=int,
        help="denoising steps per sample (default: the base's recommended value, 20 for toy, "
        "25 for SD)",
    )
    g.add_argument(
        "--sample-guidance",
        type=float,
        help="guidance scale for the samples (default: the base's recommended value, 2 for "
        "toy, 7.5 for SD)",
    )
    g.add_argument(
        "--tensorboard", action=on_off, help="TensorBoard logs in OUTPUT/logs (default: on)"
    )
    g.add_argument(
        "--log-every",
        type=int,
        metavar="N",
        help=f"read and log losses every N steps; each read waits for the GPU (default: "
        f"{D.log_every})",
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from the TOML file named by --config (if any) and the flags given."""
    given = {k: v for k, v in vars(args).items() if k in FIELD_NAMES}  # not func, command...
    return load_config(getattr(args, "config", None), **given)


def setup_logging() -> None:
    """Show the trainer's messages on stderr, one line each."""
    log = logging.getLogger("sdlora")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def run(args: argparse.Namespace) -> int:
    """Run `sdlora train` from parsed arguments; return the exit code."""
    config = config_from_args(args)
    # the compile workers' fork server starts first: its imports overlap this process's own
    server = start_server_for(config.compile)
    try:
        from sdlora.train.loop import train  # heavy imports only once a run starts

        setup_logging()
        train(config, compile_server=server)
    finally:
        if server is not None:
            server.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m sdlora.train.command ...`: the same as `sdlora train ...`."""
    # Only a Hub-id --base reaches the network (HF_HUB_OFFLINE=1 keeps it to the cache);
    # every other load is local-only.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    parser = argparse.ArgumentParser(prog="sdlora")
    register(parser.add_subparsers(dest="command", required=True))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv if argv[:1] == ["train"] else ["train", *argv])
    try:
        return args.func(args)
    except SdloraError as err:
        print(f"sdlora: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a failed read or write no one turned into words: still one line
        from sdlora.io.writing import explain

        print(f"sdlora: {explain(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
