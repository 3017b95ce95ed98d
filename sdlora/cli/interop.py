"""The `convert`, `merge` and `extract` commands: thin shims over sdlora.io.convert/merge/extract."""

from __future__ import annotations

import argparse
from pathlib import Path

BASE_HELP = (
    "'tiny' / 'tiny-v2' / 'tiny-xl' (built in), a diffusers model folder, a single .safetensors SD "
    "checkpoint, or a Hub id (owner/name)"
)


def _load_base(spec: str, config: str | None, device: str | None = None):
    from sdlora.bases.base import load_base

    return load_base(spec, device=device or "cpu", config=config)


def _check_out(out: str, overwrite: bool) -> Path:
    from sdlora.io.files import check_output

    return check_output(out, overwrite, suffix=".safetensors")


def cmd_convert(args: argparse.Namespace) -> int:
    from sdlora.bases.pipelines import adaptable_models
    from sdlora.io.convert import convert_adapter
    from sdlora.io.formats import load_adapter

    out = _check_out(args.out, args.overwrite)
    adapter = load_adapter(args.file)
    models = None
    if args.base:
        pipe = _load_base(args.base, args.config)
        models = adaptable_models(pipe)
    print(convert_adapter(adapter, args.to, out, models=models, overwrite=args.overwrite))
    return 0


def _print_report(report, limit: int | None) -> None:
    if report.rank is None:
        print("exact merge: relative error 0")
        return
    worst = sorted(report.errors.items(), key=lambda kv: -kv[1])
    shown = worst if limit is None else worst[:limit]
    for key, err in shown:
        print(f"  {err:9.3e}  {key}")
    if len(shown) < len(worst):
        print(f"  ... {len(worst) - len(shown)} more modules (--all-modules lists every one)")
    print(
        f"rank {report.rank}: overall relative error {report.overall:.3e} over {len(worst)} modules"
    )


def cmd_merge(args: argparse.Namespace) -> int:
    from sdlora.io.files import save_adapter
    from sdlora.io.formats import load_adapter
    from sdlora.io.lora_spec import parse_lora_spec
    from sdlora.lora.blocks import scale_blocks
    from sdlora.tools.merge import merge_adapters

    out = _check_out(args.out, args.overwrite)
    items = []
    for spec in args.files:
        parsed = parse_lora_spec(spec)
        adapter = scale_blocks(load_adapter(parsed.path), parsed.blocks)  # checked for its family
        items.append((adapter, parsed.strength))
    merged, report = merge_adapters(
        items,
        rank=args.rank,
        method=args.method,
        density=args.density,
        seed=args.seed,
        majority_sign=args.majority_sign,
    )
    save_adapter(merged, out, overwrite=args.overwrite)
    _print_report(report, None if args.all_modules else 10)
    print(out)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from sdlora.io.files import save_adapter
    from sdlora.tools.extract import extract_adapter

    out = _check_out(args.out, args.overwrite)
    base = _load_base(args.base, args.config, args.device)
    tuned = _load_base(args.tuned, args.tuned_config or args.config, args.device)
    adapter, report = extract_adapter(
        base, tuned, args.rank, targets=args.targets, base_name=args.base, tuned_name=args.tuned
    )
    save_adapter(adapter, out, overwrite=args.overwrite)
    _print_report(report, None if args.all_modules else 10)
    print(out)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `convert`, `merge` and `extract` to the `sdlora` command."""
    p = sub.add_parser(
        "convert",
        help="write an adapter in the kohya/A1111 or diffusers layout",
        description="Read an adapter of any supported format (sdlora, kohya/A1111 LoRA/LoCon, "
        "LyCORIS LoHa/LoKr, diffusers/PEFT) and write it as kohya flat keys "
        "(lora_unet_..., for A1111/ComfyUI) or in diffusers' pytorch_lora_weights.safetensors "
        "layout (unet./text_encoder. prefixes, lora_A/lora_B; for load_lora_weights). The scale "
        "is folded in, so strength 1.0 means 'as trained' everywhere. Linear adapters only.",
    )
    p.add_argument("file", help="adapter .safetensors file")
    p.add_argument("--to", required=True, choices=("kohya", "diffusers"), help="layout to write")
    p.add_argument("--out", required=True, metavar="FILE.safetensors", help="where to write it")
    p.add_argument(
        "--base",
        help="take module paths from this base and refuse keys it lacks (" + BASE_HELP + "); "
        "default: rebuild paths from SD's module names, which works for SD 1.x/2.x adapters",
    )
    p.add_argument("--config", metavar="DIR", help="configs for a single-file --base")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "merge",
        help="merge adapters into one: exact sum, or SVD/TIES/DARE to a rank",
        description="Merge linear adapters into one file. By default (--method sum) exact: ranks "
        "are concatenated and strengths folded in, so the result at strength 1.0 equals the live "
        "blend (no cross terms); --rank R then compresses each module to rank R by SVD. The other "
        "methods work on each module's ΔW as PEFT's add_weighted_adapter '*_svd' combinations do, "
        "the strengths being the weights: svd (weighted sum), magnitude-prune (keep each ΔW's "
        "largest --density fraction of entries), ties (that trim, then a sign elected per entry "
        "and the mean of the agreeing ones), dare (drop entries at random keeping --density of "
        "them, rescaled by 1/density; --seed makes it repeatable), dare-ties (that drop, then "
        "TIES' sign election and mean); the result is factored to --rank by SVD (default: the "
        "largest rank among the inputs). The relative error is reported per module and overall. "
        "Adapters for different bases and nonlinear adapters are refused.",
    )
    p.add_argument(
        "files", nargs="+", metavar="FILE[:STRENGTH]", help="adapters; STRENGTH defaults to 1.0"
    )
    p.add_argument(
        "--out", required=True, metavar="FILE.safetensors", help="where to write the merged adapter"
    )
    p.add_argument(
        "--rank",
        type=int,
        help="compress every module to this rank by SVD (default: exact for sum, the largest "
        "input rank for the other methods)",
    )
    p.add_argument(
        "--method",
        default="sum",
        metavar="sum|svd|ties|dare|dare-ties|magnitude-prune",
        help="how to combine the adapters (default: %(default)s, exact)",
    )
    p.add_argument(
        "--density",
        type=float,
        metavar="D",
        help="fraction of each ΔW's entries kept, in (0, 1]; needed by ties, dare, dare-ties "
        "and magnitude-prune",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of dare's random drop (default: %(default)s)"
    )
    p.add_argument(
        "--majority-sign",
        choices=("total", "frequency"),
        default="total",
        help="ties/dare-ties sign election: sign of the entries' sum or of the count of their "
        "signs (default: %(default)s)",
    )
    p.add_argument(
        "--all-modules",
        action="store_true",
        help="list the error of every module, not the 10 worst",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "extract",
        help="make a LoRA from the difference of two checkpoints",
        description="Extract a LoRA of rank R from tuned − base by SVD over the target modules "
        "of the UNet and text encoder, and report the relative error per module and overall.",
    )
    p.add_argument("--base", required=True, help="the original model: " + BASE_HELP)
    p.add_argument(
        "--tuned", required=True, help="the fine-tuned model, same architecture: " + BASE_HELP
    )
    p.add_argument("--rank", type=int, required=True, help="rank of the extracted LoRA")
    p.add_argument("--out", required=True, metavar="FILE.safetensors", help="where to write it")
    p.add_argument(
        "--targets",
        default="attn",
        help="modules: attn, attn-ff, all or names (default: %(default)s)",
    )
    p.add_argument("--config", metavar="DIR", help="configs for single-file models")
    p.add_argument(
        "--tuned-config",
        metavar="DIR",
        help="configs for a single-file --tuned (default: --config)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    p.add_argument(
        "--all-modules",
        action="store_true",
        help="list the error of every module, not the 10 worst",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_extract)
