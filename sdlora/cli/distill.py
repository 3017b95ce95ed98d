"""The `distill` command: a thin shim over `sdlora.tools.distill.distill_adapter`."""

from __future__ import annotations

import argparse

from sdlora.errors import SdloraError


def read_prompts(path: str) -> list[str]:
    """One prompt per line of a UTF-8 text file; blank lines are skipped."""
    from sdlora.io.files import check_input

    file = check_input(path, setting="prompts_file")
    if file.is_dir():
        raise SdloraError(f"{file} is a folder; give a text file", setting="prompts_file")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise SdloraError(f"{file}: not UTF-8 text; save it as UTF-8", "prompts_file") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise SdloraError(f"{file}: holds no prompts (one per line)", setting="prompts_file")
    return prompts


def cmd_distill(args: argparse.Namespace) -> int:
    import torch

    from sdlora.bases.base import load_base
    from sdlora.io.files import check_output, save_adapter
    from sdlora.io.formats import load_adapter
    from sdlora.tools.distill import check_request, distill_adapter

    out = check_output(args.out, args.overwrite, suffix=".safetensors")
    prompts = read_prompts(args.prompts_file) if args.prompts_file else args.prompts
    adapter = load_adapter(args.file)
    check_request(adapter, args.rank, args.samples, args.seed)  # before the base loads
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_base(args.base, device=device, config=args.config)
    linear, report = distill_adapter(
        pipe,
        adapter,
        args.rank,
        prompts=prompts,
        samples=args.samples,
        seed=args.seed,
        held_out=args.held_out,
    )
    save_adapter(linear, out, overwrite=args.overwrite)
    worst = sorted(report.errors.items(), key=lambda kv: -kv[1])
    shown = worst if args.all_modules else worst[:10]
    for key, err in shown:
        print(f"  {err:9.3e}  {key}")
    if len(shown) < len(worst):
        print(f"  ... {len(worst) - len(shown)} more modules (--all-modules lists every one)")
    print(
        f"rank {report.rank}: overall relative error {report.overall:.3e} over {len(worst)} modules"
    )
    held_out = "prompts" if args.held_out else "noise"
    print(
        f"noise prediction on held-out {held_out}: differs by {report.output_difference:.3e} "
        f"of its norm, {report.effect_difference:.3e} of the adapter's effect"
    )
    print(out)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `distill` to the `sdlora` command."""
    p = sub.add_parser(
        "distill",
        help="turn a nonlinear adapter into a linear LoRA of a given rank",
        description="Fit a linear LoRA of rank R to a nonlinear adapter at every layer, on the "
        "inputs each layer really sees: the base runs with the adapter applied on the given "
        "prompts (default: the training prompts the file records, plus the empty prompt that "
        "guidance uses) at several noise levels, and each layer's change is solved by "
        "reduced-rank regression. Prints the relative error per module and overall, and how "
        "much the UNet's noise prediction differs on fresh noise. The result is a kohya-layout "
        "file: it can be fused, merged, exported and read by other tools.",
    )
    p.add_argument("file", help="nonlinear adapter .safetensors file")
    p.add_argument(
        "--base",
        required=True,
        help="the base the adapter was trained on, of any family (SD 1.x, 2.x, SDXL): 'toy', "
        "'tiny', 'tiny-v2', 'tiny-xl', a diffusers model folder or a single .safetensors "
        "checkpoint",
    )
    p.add_argument("--config", metavar="DIR", help="configs for a single-file --base")
    p.add_argument("--rank", type=int, required=True, help="rank of the linear LoRA")
    p.add_argument("--out", required=True, metavar="FILE.safetensors", help="where to write it")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--prompts",
        nargs="+",
        metavar="PROMPT",
        help="prompts to collect activations on (default: those the file records: its sample "
        "prompts, caption, trigger words and kohya's ss_tag_frequency, most frequent tags first)",
    )
    source.add_argument("--prompts-file", metavar="FILE", help="UTF-8 text file, one prompt a line")
    p.add_argument(
        "--held-out",
        nargs="+",
        metavar="PROMPT",
        help="prompts for the output check only, not fitted on (default: the fitting prompts, "
        "on fresh noise)",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=4,
        # the bound is sdlora.tools.distill.MAX_SAMPLES (importing it would load diffusers for
        # every command's --help; tests/test_refusals.py keeps the two equal)
        help="noise draws per prompt, at timesteps spread over the schedule, 1 to 256 "
        "(each prompt's draws run as one UNet batch) (default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seeds the noise and timesteps (default: %(default)s)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    p.add_argument(
        "--all-modules",
        action="store_true",
        help="list the error of every module, not the 10 worst",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_distill)
