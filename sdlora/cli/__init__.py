"""The `sdlora` command: generate, export, inspect (and train, ui, convert, merge, extract).

Each handler turns argparse values into plain arguments for library calls. User mistakes are
`SdloraError`s, printed as one line (`sdlora: ...`) with exit code 2 and no traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

from sdlora.errors import SdloraError, flag
from sdlora.io.lora_spec import (  # noqa: F401 (parse_lora: re-exported)
    LoraSpec,
    adapter_names,
    parse_lora,
    parse_lora_spec,
)
from sdlora.lora.prompt_tags import LORA_TAG, lora_windows, split_lora_tags

DEFAULT_BASE = "toy"
BASE_HELP = (
    "base model: 'toy' (built in, pretrained on the toy world, 64 px), 'tiny' / 'tiny-v2' / "
    "'tiny-xl' / 'tiny-sd3' (built in, random weights, SD 1.x / SD 2.x / SDXL / SD 3.5 shaped, "
    "for tests), a diffusers "
    "model folder, a single .safetensors checkpoint in the original SD or SDXL layout, or a "
    "Hugging Face Hub id such as stabilityai/stable-diffusion-xl-base-1.0 (cached; "
    "HF_HUB_OFFLINE=1 reads the cache only) "
    "(default: %(default)s)"
)


def add_base_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default=DEFAULT_BASE, help=BASE_HELP)
    p.add_argument(
        "--config",
        metavar="DIR",
        help="diffusers model folder (or Hub id) with the configs and tokenizer for a single-file "
        "--base; its scheduler config says the prediction type (SD 2.x 768 px: v_prediction)",
    )
    p.add_argument(
        "--no-t5",
        action="store_true",
        help="SD 3.x: leave the T5-XXL text encoder out (not loaded; zeros in its place)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:STRENGTH][@NAME][@BLOCKS][@WINDOW]",
        help="adapter to blend in, repeatable; STRENGTH defaults to 1.0 (0 = base, 1 = as "
        "trained); NAME (default: the file name without .safetensors) is how PNG metadata and "
        "--sweep labels call it. Two files of one name (a/style, b/style) are told apart by "
        "their folders. BLOCKS: per-block strengths, e.g. IN=0,MID=1,OUT=0.5 or a LoRA Block "
        "Weight vector of 17/26 (SDXL: 12/20) numbers; kept in the PNG's parameters as :lbw=. "
        "WINDOW (generate): start=0.2, stop=0.8 or both, comma-joined: the adapter acts over "
        "that part of the steps only (a fraction; a whole number counts steps)",
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)"
    )


def load_mix(args: argparse.Namespace, dtype=None, specs: list[LoraSpec] | None = None):
    """Load the base and blend every --lora (or `specs`, the --lora values with a prompt's tags
    applied); return (pipe, mixer, {name: per-block strengths})."""
    import torch

    from sdlora.bases.base import load_base
    from sdlora.lora.blend import Mixer

    if specs is None:
        specs = [parse_lora_spec(spec) for spec in args.lora]
    names, notes = adapter_names(specs)
    for note in notes:
        print(f"sdlora: {note}", file=sys.stderr)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_base(args.base, device=device, dtype=dtype, config=args.config, t5=not args.no_t5)
    mixer = Mixer(pipe)
    for spec, name in zip(specs, names, strict=True):
        mixer.add(spec.path, name=name, strength=spec.strength, blocks=spec.blocks)
    blocks = {name: spec.blocks for spec, name in zip(specs, names, strict=True) if spec.blocks}
    return pipe, mixer, blocks


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from sdlora.bases.fast_sample import expect_images
    from sdlora.bases.generate import GenerateSettings, check_numbers, generate, save_png
    from sdlora.io.files import check_output

    dtype = (
        torch.float16
        if (args.device or "").startswith("cuda")
        or (args.device is None and torch.cuda.is_available())
        else None
    )
    prompt, specs = prompt_tags(args.prompt, [parse_lora_spec(spec) for spec in args.lora])
    if LORA_TAG.search(args.negative_prompt or ""):
        raise SdloraError(
            "holds a <lora:…> tag; adapters join the mix in --prompt or with --lora",
            setting="negative_prompt",
        )
    sweep = parse_sweep(args.sweep, [s.path for s in specs]) if args.sweep else None
    settings = GenerateSettings(
        prompt=prompt,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        width=args.width,
        height=args.height,
        scheduler=args.scheduler,
        num_images=args.num_images,
        compile=args.compile,
    )
    check_numbers(settings)  # before the base loads
    out = Path(args.out)
    for path in png_paths(out, 1 if sweep else settings.num_images):
        check_output(path, args.overwrite, suffix=".png")
    pipe, mixer, blocks = load_mix(args, dtype=dtype, specs=specs)
    settings.adapters, settings.blocks = mixer.strengths(), blocks
    names, _ = adapter_names(specs)
    settings.schedules = {n: s.window for s, n in zip(specs, names, strict=True) if s.window}
    expect_images(pipe, settings.num_images * len(sweep or [1]))  # for --compile auto
    if sweep:
        print(sweep_grid(pipe, mixer, settings, sweep, out))
        return 0
    images = generate(pipe, settings, mixer=mixer)
    for i, (image, path) in enumerate(zip(images, png_paths(out, len(images)), strict=True)):
        save_png(image, path, settings, i)
        print(path)
    return 0


def prompt_tags(prompt: str, specs: list[LoraSpec]) -> tuple[str, list[LoraSpec]]:
    """`<lora:NAME[:STRENGTH][:lbw=BLOCKS]>` tags in --prompt, read as A1111 and the web UI read
    them: taken out of the prompt (the text encoder never sees them); a tag naming a --lora
    adapter sets its strength (and blocks), a tag naming an adapter file (NAME.safetensors or
    NAME) adds it to the mix; any other tag is refused. Returns (prompt, specs)."""
    clean, strengths, blocks = split_lora_tags(prompt)
    if not strengths:
        return prompt, specs
    windows = lora_windows(prompt)
    specs = list(specs)
    names, _ = adapter_names(specs)
    for name, strength in strengths.items():
        if name in names:
            at = names.index(name)
            specs[at] = replace(
                specs[at],
                strength=strength,
                blocks=blocks.get(name, specs[at].blocks),
                window=windows.get(name, specs[at].window),
            )
            continue
        file = next((f for f in (Path(name + ".safetensors"), Path(name)) if f.is_file()), None)
        if file is None:
            raise SdloraError(
                f"has <lora:{name}:{strength:g}>, but no --lora is named {name!r} and there is "
                f"no file {name}.safetensors; add --lora FILE@{name} or remove the tag",
                setting="prompt",
            )
        specs.append(LoraSpec(str(file), strength, None, blocks.get(name), windows.get(name)))
    return clean, specs


def png_paths(out: Path, count: int) -> list[Path]:
    """The files `generate` writes: `out` for one image, `NAME-0.png`, `NAME-1.png` ... for more."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(max(count, 0))]


def parse_sweep(text: str, loras: list[str]) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0]; a sweep needs a --lora to vary."""
    if not loras:
        raise SdloraError("--sweep varies the strength of the last --lora; give one with --lora")
    try:
        strengths = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SdloraError(
            f"--sweep {text!r}: give strengths separated by commas, e.g. 0,0.5,1"
        ) from None
    if not strengths or not all(math.isfinite(s) for s in strengths):
        raise SdloraError(f"--sweep {text!r}: give finite strengths separated by commas")
    return strengths


def sweep_grid(pipe, mixer, settings, strengths: list[float], out: Path) -> Path:
    """The same seeds at each strength of the last adapter: one labelled grid PNG."""
    from sdlora.bases.generate import generate, save_png
    from sdlora.bases.grid import labelled_grid

    name = list(mixer.entries)[-1]
    columns = []
    for strength in strengths:
        mixer.set_strength(name, strength)
        columns.append(generate(pipe, settings, mixer=mixer))
    settings.adapters = mixer.strengths()
    settings.sweep = {name: strengths}
    rows = [[column[i] for column in columns] for i in range(settings.num_images)]
    labels = [f"{s:g}" for s in strengths]
    seeds = [f"seed {settings.seed + i}" for i in range(settings.num_images)]
    grid = labelled_grid(rows, labels, seeds if len(rows) > 1 else [""], f"{name} strength")
    return save_png(grid, out, settings)


def cmd_export(args: argparse.Namespace) -> int:
    from sdlora.lora.embeddings import attached
    from sdlora.tools.export import (
        check_out,
        embeddings_folder,
        export_diffusers,
        export_single_file,
        parse_dtype,
    )

    parse_dtype(args.dtype)
    check_out(
        args.out, folder=args.format == "diffusers", overwrite=args.overwrite, make_parents=False
    )
    args.device = args.device or "cpu"
    timed = [spec for spec in args.lora if parse_lora_spec(spec).window]
    if timed:
        raise SdloraError(
            f"--lora {timed[0]}: a window (start=/stop=) acts while an image is drawn; an "
            "exported checkpoint holds one set of weights, so leave the window out"
        )
    pipe, _, _ = load_mix(args)
    if args.format == "diffusers":
        out = export_diffusers(pipe, args.out, args.dtype, overwrite=args.overwrite)
    else:
        out = export_single_file(pipe, args.out, args.dtype, overwrite=args.overwrite)
    print(out)
    words = attached(pipe)
    if words:
        folder = embeddings_folder(out, folder=args.format == "diffusers")
        print(
            f"new words {', '.join(words)} cannot live in a checkpoint's vocabulary: their "
            f"embeddings are in {folder}/ (copy them to A1111's embeddings/ or ComfyUI's "
            "models/embeddings/; diffusers: pipe.load_textual_inversion(FILE))"
        )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from sdlora.tools.inspect import format_text, inspect_file

    if len(args.file) > 1:
        return _conflict_report(args)
    if args.heatmap:
        raise SdloraError("needs two or more adapter files to compare", setting="heatmap")
    base = None
    if args.base:
        from sdlora.bases.base import load_base

        base = load_base(args.base, config=args.config)
    info = inspect_file(args.file[0], base)
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0


def _conflict_report(args: argparse.Namespace) -> int:
    """`sdlora inspect A B [C…]`: the conflict report (`sdlora.tools.conflict`)."""
    from sdlora.io.files import check_output
    from sdlora.io.formats import load_adapter
    from sdlora.tools.conflict import check_comparable, compare, format_report, write_heatmap

    if args.heatmap:
        check_output(args.heatmap, args.overwrite, setting="heatmap", suffix=".png")
    adapters = [load_adapter(f) for f in args.file]
    check_comparable(adapters)
    if args.base:
        from sdlora.bases.base import load_base
        from sdlora.bases.pipelines import adaptable_models
        from sdlora.lora.adapter import check_family

        models = adaptable_models(load_base(args.base, config=args.config))
        for adapter in adapters:
            check_family(adapter, models)
    report = compare(adapters)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if args.heatmap:
        write_heatmap(report, args.heatmap)
        if not args.json:
            print(f"heat map: {args.heatmap}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdlora",
        description="Train Stable Diffusion LoRA adapters, blend them with exact strengths, "
        "and export merged checkpoints.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "generate",
        help="draw images from a base with adapters blended in",
        description="Draw images from a base with adapters blended in. The PNG "
        "keeps prompt, seed, sampler and adapter strengths in its metadata.",
    )
    add_base_args(p)
    p.add_argument(
        "--prompt",
        required=True,
        help="what to draw; a <lora:NAME:STRENGTH> tag in it (A1111's) is taken out and sets "
        "the strength of the --lora named NAME, or adds the file NAME.safetensors",
    )
    p.add_argument("--negative-prompt", default="", help="what to steer away from")
    p.add_argument(
        "--steps",
        type=int,
        help="denoising steps, 1 to 1000 (default: the base's recommended value, 20 for toy, "
        "25 for SD)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        help="classifier-free guidance scale, 0 to 100 (default: the base's recommended value, "
        "2 for toy, 7.5 for SD)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed, 0 to 2**64 - 1; image i uses seed+i (default: %(default)s)",
    )
    p.add_argument(
        "--width",
        type=int,
        help="image width in px, 8 to 4096 (default: the base's native size)",
    )
    p.add_argument(
        "--height",
        type=int,
        help="image height in px, 8 to 4096 (default: the base's native size)",
    )
    p.add_argument(
        "--scheduler",
        default="pndm",
        help="pndm, ddim, euler, euler_a or dpm++ (default: %(default)s)",
    )
    p.add_argument(
        "--num-images",
        type=int,
        default=1,
        help="images to draw, 1 to 64; more than one adds -0, -1 ... to the name",
    )
    p.add_argument(
        "--sweep",
        metavar="S1,S2,...",
        help="draw the same image at each of these strengths of the last --lora and save them "
        "side by side, labelled, as one grid (e.g. 0,0.5,1)",
    )
    p.add_argument(
        "--compile",
        default="auto",
        help="auto, on or off: draw with the compiled loop whose steps replay as CUDA graphs "
        "(pndm, ddim, euler, dpm++ samplers); auto: on a GPU, for 8 images or more (sweeps "
        "count every image); the first image pays the compilation (default: %(default)s)",
    )
    p.add_argument("--out", required=True, metavar="FILE.png", help="where to save the image")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "export",
        help="write base + adapters as one merged checkpoint",
        description="Merge base + Σ strength·ΔW of the given linear adapters and write "
        "it as a diffusers folder or a single .safetensors in the original SD layout "
        "(loads in AUTOMATIC1111, ComfyUI and diffusers' from_single_file). With no "
        "--lora the base itself is exported.",
    )
    add_base_args(p)
    p.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="folder (diffusers) or .safetensors file (single-file)",
    )
    p.add_argument(
        "--format",
        choices=("diffusers", "single-file"),
        default="diffusers",
        help="(default: %(default)s)",
    )
    p.add_argument("--dtype", default="fp16", help="fp32, fp16 or bf16 (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "inspect",
        help="show what an adapter file holds; with several, where they conflict",
        description="Show an adapter's format, rank, alpha, effective scale, "
        "nonlinearity, modules per component, trigger words and metadata. With two or more "
        "files: the conflict report, for each pair per block (LoRA Block Weight names) and "
        "overall, the cosine similarity of their ΔW (per block over the modules both have; "
        "overall a missing module counts as ΔW = 0), the overlap of their magnitudes "
        "(sum min(|a|,|b|) / sum max(|a|,|b|) over the entries: 1 for an adapter with itself, "
        "0 for disjoint blocks) and the blocks where they push against each other (cosine < "
        "-0.1 and each ΔW norm in the block >= 0.1 x that adapter's largest block norm). "
        "Linear adapters of one model family only.",
    )
    p.add_argument("file", nargs="+", help="adapter .safetensors file(s)")
    p.add_argument(
        "--base",
        help="also check which keys this base has modules for (several files: that they fit it)",
    )
    p.add_argument("--config", metavar="DIR", help="configs for a single-file --base")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument(
        "--heatmap",
        metavar="FILE.png",
        help="several files: also write the cosines as a heat map (rows pairs, columns blocks)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --heatmap")
    p.set_defaults(func=cmd_inspect)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """`register(subparsers)` of the command modules that live outside this file."""
    from sdlora.cli.caption import register as caption
    from sdlora.cli.distill import register as distill
    from sdlora.cli.interop import register as interop
    from sdlora.train.command import register as train
    from sdlora.ui.command import register as ui

    return [train, ui, interop, distill, caption]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sdlora` command."""
    # Only a Hub-id --base reaches the network (HF_HUB_OFFLINE=1 keeps it to the cache);
    # every other load is local-only.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SdloraError as err:
        print(f"sdlora: {err.worded(flag)}", file=sys.stderr)
        return 2
    except OSError as err:  # a failed read or write no one turned into words: still one line
        from sdlora.io.writing import explain

        print(f"sdlora: {explain(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdlora: interrupted", file=sys.stderr)
        return 130
