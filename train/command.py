"""`sdlora train`: the command-line face of `train()`. argparse stops here.

`register(subparsers)` adds the subcommand to the `sdlora` CLI; `run(args)` turns the flags the
user gave (and nothing else) into overrides on top of the TOML config and the defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import Field, fields
from typing import Any

from sdlora.errors import SdloraError, flag
from sdlora.train.config import (
    FIELD_NAMES,
    FIELDS,
    FILES,
    TrainConfig,
    from_text,
    kind_of,
    load_config,
    option_of,
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
  sdlora train samples/style --output runs/style-64 --trigger sdlstyle --steps 300 --resolution 64
  sdlora train --config samples/train_tiny.toml --lr 2e-4
  sdlora train photos/ --output runs/me --base ./sd15 --resume
  accelerate launch --multi_gpu --num_processes 2 -m sdlora.cli train photos/ --output runs/me

A run stopped at any moment loses at most the steps since its last checkpoint: run the same
command with --resume to continue.
"""


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
    """One argument per TrainConfig field, from its declaration (train/config.py), in --help
    groups in the order the fields first name them; plus --config."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(TrainConfig):
        spec = option_of(f)
        if spec.group not in groups:
            groups[spec.group] = p.add_argument_group(spec.group)
        groups[spec.group].add_argument(*names(f), **argument(f))
        if f.name == "output":
            groups[FILES].add_argument(
                "--config", metavar="FILE", help="TOML file with any of these options"
            )


def names(f: Field) -> list[str]:
    """The argument's names: `data_dir` positional, else `--flag` and its short alias."""
    spec = option_of(f)
    if spec.positional:
        return [f.name]
    return [flag(f.name), *([spec.short] if spec.short else [])]


def argument(f: Field) -> dict[str, Any]:
    """`add_argument` keywords for field `f`. Numbers stay text here: `config_from_args` turns
    them into values, so a bad one gets the same one-line error as a bad value in a file."""
    spec, (kind, _) = option_of(f), kind_of(f)
    kw: dict[str, Any] = {"help": help_text(f).replace("%", "%%")}
    if spec.metavar:
        kw["metavar"] = spec.metavar
    elif spec.choices:
        kw["metavar"] = "{" + ",".join(spec.choices) + "}"
    elif kind == "int":
        kw["metavar"] = "N"
    if spec.positional:
        kw["nargs"] = "?"
    elif kind == "bool":
        kw["action"] = argparse.BooleanOptionalAction
    elif kind == "list[str]":
        kw.update(action="append", dest=f.name)
    elif spec.const is not None:
        kw.update(nargs="?", const=spec.const)
    return kw


def help_text(f: Field) -> str:
    """The declaration's help, its bounds and default: "LoRA rank (from 1 to 1024; default: 8)"."""
    spec, (kind, _) = option_of(f), kind_of(f)
    if spec.default_text is not None:
        default = spec.default_text
    elif kind == "bool":
        default = "on" if f.default else "off"
    elif f.default in (None, "") or kind == "list[str]":
        default = None
    else:
        default = f"{f.default:g}" if kind == "float" else str(f.default)
    notes = [spec.bounds(), f"default: {default}" if default is not None else ""]
    notes = "; ".join(n for n in notes if n)
    return f"{spec.help} ({notes})" if notes else spec.help


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from the TOML file named by --config (if any) and the flags given."""
    given = {k: v for k, v in vars(args).items() if k in FIELD_NAMES}  # not func, command...
    for name, value in given.items():
        if isinstance(value, str) and kind_of(FIELDS[name])[0] in ("int", "float"):
            given[name] = from_text(name, value)
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
        print(f"sdlora: {err.worded(flag)}", file=sys.stderr)
        return 2
    except OSError as err:  # a failed read or write no one turned into words: still one line
        from sdlora.io.writing import explain

        print(f"sdlora: {explain(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
