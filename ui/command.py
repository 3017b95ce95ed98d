"""`sdlora ui`: the command-line face of `build_app()`. argparse stops here."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Open the mixer web UI: load adapters from the adapters folder, the training runs folder and any
other --adapters folder (or upload them), blend them with
strength sliders, generate, compare strengths on a grid, export merged checkpoints or one merged
LoRA, train new adapters on a dataset folder, and inspect adapter files.

The UI only reads and writes inside the folders given here: uploads and temporary files go to
the hidden .cache folder of --outputs, emptied at start (uploads are deleted once handled, and
whatever is left there after an hour goes). The models' own caches stay where their libraries
keep them (Hugging Face downloads of a Hub-id base, torch's compile cache). It listens on
127.0.0.1 (this machine only) unless --host says otherwise, and makes no public link unless
--share is given.
Jobs that run the model go one at a time through a queue; each visitor has their own mix.
"""


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `ui` subcommand to an argparse subparsers object; it runs `run(args)`."""
    p = subparsers.add_parser(
        "ui",
        help="open the mixer web UI (Gradio)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--base",
        default="toy",
        help="base model: 'toy' (built in, pretrained), 'tiny' / 'tiny-v2' / 'tiny-xl' (built "
        "in, random weights, SD 1.x / SD 2.x / SDXL shaped), a diffusers model folder, a single .safetensors "
        "checkpoint, or a Hub id such as stabilityai/stable-diffusion-2-1 (default: %(default)s)",
    )
    p.add_argument(
        "--adapters",
        action="append",
        metavar="DIR",
        help="adapter files; uploads and trained adapters go into the first. Repeat it to list "
        "more folders, each under its folder's name (default: adapters)",
    )
    p.add_argument(
        "--runs",
        default="runs",
        metavar="DIR",
        help="training runs: the adapters in each of its folders (as `sdlora train --output "
        "runs/NAME` writes them) are listed as runs/NAME/FILE; '' for none (default: %(default)s)",
    )
    p.add_argument(
        "--datasets",
        default="samples",
        metavar="DIR",
        help="folder whose subfolders are training datasets (default: %(default)s)",
    )
    p.add_argument(
        "--outputs",
        default="outputs",
        metavar="DIR",
        help="images, grids, exports and training runs go here (default: %(default)s)",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument("--share", action="store_true", help="also make a public gradio.live link")
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)"
    )
    p.add_argument(
        "--max-upload-mb",
        type=int,
        default=2048,
        help="largest adapter upload (default: %(default)s)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Build the app from parsed arguments and serve it until interrupted."""
    from pathlib import Path

    from sdlora.ui.app import keep_temporary_files_in, launch  # gradio, torch now
    from sdlora.ui.handlers import CACHE

    app = app_from_args(args)
    keep_temporary_files_in(Path(args.outputs).resolve() / CACHE / "tmp")
    launch(app, host=args.host, port=args.port, share=args.share, max_upload_mb=args.max_upload_mb)
    return 0


def app_from_args(args: argparse.Namespace):
    """The app `sdlora ui` serves for these arguments (not yet launched)."""
    from sdlora.ui.app import build_app

    first, *more = args.adapters or ["adapters"]
    return build_app(
        base=args.base,
        adapters_dir=first,
        datasets_dir=args.datasets,
        outputs_dir=args.outputs,
        device=args.device,
        max_upload_mb=args.max_upload_mb,
        more_adapters=more,
        runs_dir=args.runs or None,
    )
