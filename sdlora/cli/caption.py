"""The `caption` command: a thin shim over `sdlora.tools.caption`."""

from __future__ import annotations

import argparse

from sdlora.errors import SdloraError

EPILOG = """\
models tried: BLIP (Salesforce/blip-image-captioning-base and -large; a tiny random BLIP in the
tests). BLIP-2 (Salesforce/blip2-opt-2.7b) loads through the same classes. Florence-2's own
repositories need --trust-remote-code and a task prompt:
  sdlora caption photos/ --model microsoft/Florence-2-base --trust-remote-code \\
      --prompt "<MORE_DETAILED_CAPTION>"

examples:
  sdlora caption photos/ --model Salesforce/blip-image-captioning-large --trigger sks
  sdlora caption photos/ --model ./blip --prefix "a photo of " --overwrite
"""


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "caption",
        help="write IMAGE.txt captions beside images with an image-to-text model",
        description="Caption every image in DATA_DIR (subfolders too, the images `sdlora "
        "train` reads) with a transformers image-to-text model, writing IMAGE.txt beside each. "
        "Images that already have a caption file are skipped unless --overwrite.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data_dir", metavar="DATA_DIR", help="folder of images")
    p.add_argument(
        "--model",
        required=True,
        metavar="ID_OR_FOLDER",
        help="captioning model: a Hub id (e.g. Salesforce/blip-image-captioning-large) or a "
        "folder holding the model and its processor",
    )
    p.add_argument("--prefix", default="", help="text put before each caption, e.g. 'a photo of '")
    p.add_argument("--trigger", metavar="WORD", help="word put in front of each caption")
    p.add_argument(
        "--prompt",
        metavar="TEXT",
        help="text the model is given to continue (Florence-2: a task token such as "
        "<MORE_DETAILED_CAPTION>); its echo is taken off the caption",
    )
    p.add_argument(
        "--batch-size", type=int, default=8, metavar="N", help="images per model call (default: 8)"
    )
    p.add_argument(
        "--max-tokens", type=int, default=40, metavar="N", help="longest caption (default: 40)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing caption files")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model repository's own code (Florence-2); only for repositories you trust",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    p.set_defaults(func=cmd_caption)
    return p


def cmd_caption(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from sdlora.tools.caption import Captioner, caption_folder, find_images

    for name in ("batch_size", "max_tokens"):
        if getattr(args, name) < 1:
            raise SdloraError(f"must be at least 1 (got {getattr(args, name)})", setting=name)
    find_images(args.data_dir)  # a wrong folder is named before the model loads
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    captioner = Captioner(
        args.model,
        device=device,
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        trust_remote_code=args.trust_remote_code,
    )
    report = caption_folder(
        args.data_dir,
        captioner,
        prefix=args.prefix,
        trigger=args.trigger,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        progress=lambda batches: tqdm(batches, desc="captioning", unit="batch"),
    )
    print(
        f"wrote {len(report.written)} caption(s); kept {len(report.kept)} existing "
        f"(--overwrite replaces them)"
        + (f"; the model gave no words for {len(report.empty)}" if report.empty else "")
    )
    return 0
