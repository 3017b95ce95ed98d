"""Quality of nonlinear adapters (issue 16): does σ between down and up help, when, by how much?

Trains the toy base with the library's own trainer (`sdlora.train.train`, the samples/style.toml
recipe: targets attn, batch 4, 64 px, cosine schedule, warm-up 20 steps) for every cell of a grid
(nonlinearity x rank x learning rate x seed, same steps everywhere) on two data sets, and measures
each adapter after training on one fixed yardstick:

- held-out loss: `sdlora.train.validate.Validation.loss` (denoising loss at fixed timesteps
  100..900 and fixed noise) on held-out images, with validation seed 0 for every cell;
- style distance: `toyworld.style_distance` (4 bins per channel, as tests/test_style.py) between
  pictures drawn with `sdlora.bases.generate` (guidance 2, 20 steps) for trigger prompts and the
  held-out pictures through the base's autoencoder (the best an adapter can reach); lower is better;
- base change: mean absolute pixel difference (0-255) from the plain base for prompts without the
  trigger word, same seeds; lower means the base is better preserved;
- parameters: numbers in the adapter file.

Data sets:
- `style`: samples/style/ (12 pictures, "... in sks style"), 3 held out (chosen by
  `split_items(..., 0.25, seed 0)`), 9 trained on;
- `stripes`: a new toy-world style drawn here, "... in zks style": diagonal gold stripes on dark
  purple, white outlines; 24 pictures of random shapes, 16 trained on, 8 held out.

Plus the alpha/rank question: alpha = rank vs alpha = 1 at the same lr, and alpha = 1 at lr x rank
and lr x sqrt(rank) (see the README section "Nonlinear adapters: do they help?").

    python benchmarks/quality.py --json benchmarks/results/cpu-2026-12-04-quality.json
    python benchmarks/quality.py --smoke     # seconds: 2 cells, 2 steps each

The JSON is rewritten after every cell, so a stopped run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

from diffusers import DDPMScheduler  # noqa: E402

from benchmarks.sd15 import device_info  # noqa: E402
from sdlora.bases import toyworld  # noqa: E402
from sdlora.bases.base import load_base  # noqa: E402
from sdlora.bases.generate import GenerateSettings, generate  # noqa: E402
from sdlora.lora.blend import Mixer  # noqa: E402
from sdlora.lora.layer import NONLINEARITIES  # noqa: E402
from sdlora.train import TrainConfig, train  # noqa: E402
from sdlora.train.condition import Conditioning  # noqa: E402
from sdlora.train.data import discover  # noqa: E402
from sdlora.train.validate import Validation, split_items  # noqa: E402

DRAW_SEEDS = (100, 101)
BINS = 4  # as tests/test_style.py
PLAIN_PROMPTS = (  # no trigger word: what the base should still draw unchanged
    "a red circle",
    "a big blue square at the left",
    "a small yellow star on a white background",
    "a green heart at the top",
)
STYLE_PROMPTS = (  # tests/test_style.py's prompts
    "a red circle in sks style",
    "a blue square in sks style",
    "a yellow star in sks style",
    "a green heart in sks style",
    "a purple triangle at the left in sks style",
    "a small white ring in sks style",
    "a big orange cross at the top in sks style",
    "a pink circle on the right in sks style",
)
STRIPES = {"background": (70, 40, 110), "stripes": (235, 190, 60), "outline": (255, 255, 255)}


@dataclass
class DataSet:
    name: str
    train_dir: Path
    held_dir: Path
    trigger: str
    prompts: tuple[str, ...]  # trigger prompts for the style distance


def make_style(folder: Path) -> DataSet:
    """samples/style split into 9 trained and 3 held out, by the trainer's own split_items."""
    items, _, _ = discover(TrainConfig(data_dir=str(ROOT / "samples" / "style"), resolution=64))
    trained, held = split_items(items, 0.25, seed=0)
    for sub, chosen in (("train", trained), ("held", held)):
        (folder / sub).mkdir(parents=True)
        for item in chosen:
            for path in (item.path, item.path.with_suffix(".txt")):
                shutil.copy(path, folder / sub / path.name)
    return DataSet("style", folder / "train", folder / "held", "sks", STYLE_PROMPTS)


def make_stripes(folder: Path, count: int = 24, held: int = 8) -> DataSet:
    """A toy-world style the base has never seen: gold stripes on purple, white outlines."""
    scenes = toyworld.sample_scenes(count, seed=4321)
    rgb = {
        k: torch.tensor(v, dtype=torch.float32).expand(count, 3) / 255 for k, v in STRIPES.items()
    }
    scenes = replace(
        scenes,
        background=torch.full((count,), -1),  # captions name no background
        background_rgb=rgb["background"],
        pattern=torch.full((count,), toyworld.PATTERNS.index("stripes")),
        pattern_rgb=rgb["stripes"],
        pattern_period=torch.full((count,), 8.0),
        outline=torch.full((count,), 2.5),
        outline_rgb=rgb["outline"],
    )
    images = toyworld.render(scenes)  # (count, 3, 64, 64)
    prompts = []
    for i in range(count):
        sub = folder / ("train" if i < count - held else "held")
        sub.mkdir(parents=True, exist_ok=True)
        pixels = (images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(sub / f"{i:02d}.png")
        text = toyworld.caption(scenes, i) + " in zks style"
        (sub / f"{i:02d}.txt").write_text(text, encoding="utf-8")
        if i >= count - held:
            prompts.append(text)
    return DataSet("stripes", folder / "train", folder / "held", "zks", tuple(prompts))


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1]."""
    arrays = [torch.from_numpy(np.asarray(im.convert("RGB")).copy()) for im in images]
    return torch.stack(arrays).permute(0, 3, 1, 2).float() / 255


def draw(pipe, prompts: tuple[str, ...]) -> torch.Tensor:
    """Each prompt at each of DRAW_SEEDS through sdlora.bases.generate (guidance 2, 20 steps)."""
    images = []
    for prompt in prompts:
        settings = GenerateSettings(
            prompt, steps=20, guidance=2.0, seed=DRAW_SEEDS[0], num_images=len(DRAW_SEEDS)
        )
        images += generate(pipe, settings)
    return to_tensor(images)


class Judge:
    """The fixed yardstick for one data set: held-out latents and noise, reference, base pictures."""

    def __init__(self, pipe, data: DataSet):
        self.pipe, self.data = pipe, data
        config = TrainConfig(data_dir=str(data.held_dir), resolution=64, trigger=data.trigger)
        items, _, _ = discover(config)
        self.validation = Validation.encode(items, pipe.vae, config)  # seed 0 for every cell
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        with torch.inference_mode():  # held-out pictures as the autoencoder draws them
            pixels = to_tensor(
                [Image.open(it.path).resize((64, 64), Image.BICUBIC) for it in items]
            )
            latents = pipe.vae.encode(pixels * 2 - 1).latent_dist.mean
            self.reference = (pipe.vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
        self.base_plain = draw(pipe, PLAIN_PROMPTS)
        self.base = self.measure()

    def measure(self) -> dict:
        pipe = self.pipe
        conditioning = Conditioning.of(pipe)  # built per call: the Mixer may have wrapped it
        loss = self.validation.loss(
            pipe.unet, conditioning, self.scheduler, "epsilon", torch.float32
        )
        styled = draw(pipe, self.data.prompts)
        plain = draw(pipe, PLAIN_PROMPTS)
        return {
            "heldout_loss": loss,
            "style_distance": toyworld.style_distance(styled, self.reference, bins=BINS),
            "base_change": float((plain - self.base_plain).abs().mean() * 255),
        }

    def adapter(self, path: Path) -> dict:
        mixer = Mixer(self.pipe)
        mixer.add(path, name="cell")
        try:
            return self.measure()
        finally:
            mixer.remove("cell")


def parameters(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return sum(
            math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith(".alpha")
        )


def grid(args) -> list[dict]:
    """Cells in order of importance, so a stopped run keeps the main table."""
    cells = []
    base = {"lr": args.lr, "seed": 0, "alpha": None}
    for data in args.data:
        for rank in args.ranks:
            for sigma in args.nonlinearities:
                cells.append({"data": data, "nonlinearity": sigma, "rank": rank} | base)
        for seed in args.noise_seeds:  # seed noise: identity again with other seeds
            for rank in args.ranks:
                cells.append(
                    {"data": data, "nonlinearity": "identity", "rank": rank} | base | {"seed": seed}
                )
    for (
        rank
    ) in args.alpha_ranks:  # alpha = 1 at lr, lr x sqrt(rank), lr x rank; alpha = rank is above
        for factor in (1.0, math.sqrt(rank), float(rank)):
            cells.append(
                {"data": args.data[0], "nonlinearity": "identity", "rank": rank}
                | base
                | {"lr": args.lr * factor, "alpha": 1.0}
            )
    for data in args.data:
        for lr in args.sweep_lrs:
            for sigma in args.nonlinearities:
                cells.append(
                    {"data": data, "nonlinearity": sigma, "rank": args.sweep_rank}
                    | base
                    | {"lr": lr}
                )
    return cells


def train_cell(cell: dict, data: DataSet, out: Path, steps: int) -> Path:
    config = TrainConfig(
        data_dir=str(data.train_dir),
        output=str(out),
        name="cell",
        base="toy",
        trigger=data.trigger,
        rank=cell["rank"],
        alpha=cell["alpha"],
        nonlinearity=cell["nonlinearity"],
        targets="attn",
        resolution=64,
        batch_size=4,
        steps=steps,
        lr=cell["lr"],
        lr_scheduler="cosine",
        warmup_steps=min(20, steps // 5),
        seed=cell["seed"],
        save_every=0,
        tensorboard=False,
        overwrite=True,
    )
    return train(config)


def alpha_check(steps: int = 30, k: float = 16.0) -> dict[str, float]:
    """Largest loss difference over `steps` steps between a rank-4 linear LoRA with alpha x k and
    one with alpha at a changed lr and A init, under SGD and under Adam (the trainer's AdamW).

    A float32 toy problem (64 x 16 inputs, random targets); 0 means the two runs are the same.
    """
    rows = {}
    for optimizer in ("sgd", "adam"):

        def run(scale: float, init: float, lr: float, optimizer: str = optimizer) -> list[float]:
            g = torch.Generator().manual_seed(0)
            x, y = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
            down = (torch.randn(4, 16, generator=g) / 4 * init).requires_grad_()
            up = torch.zeros(16, 4, requires_grad=True)  # zero-init B, as the library
            make = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
            opt, losses = make([down, up], lr=lr), []
            for _ in range(steps):
                opt.zero_grad()
                loss = ((scale * (x @ down.T) @ up.T - y) ** 2).mean()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            return losses

        reference = run(k, 1.0, 1e-2)  # alpha x k
        for name, init, lr in (
            ("lr x k, A init x sqrt(k)", math.sqrt(k), k),
            ("lr x sqrt(k), A init x sqrt(k)", math.sqrt(k), math.sqrt(k)),
            ("lr x k, same init", 1.0, k),
            ("lr x sqrt(k), same init", 1.0, math.sqrt(k)),
        ):
            other = run(1.0, init, 1e-2 * lr)
            rows[f"{optimizer}: {name}"] = max(
                abs(a - b) for a, b in zip(reference, other, strict=True)
            )
    return rows


def cell(rows: list[dict], **key) -> dict | None:
    found = [r for r in rows if all(r[k] == v for k, v in key.items())]
    return found[0] if found else None


def summary(result: dict) -> str:
    """Compact tables: σ x rank per data set, seed noise, lr sweep, alpha cells, alpha check."""
    rows, info, out = result["rows"], result["info"], []
    lr = min((r["lr"] for r in rows if r["alpha"] is None), key=lambda v: abs(v - 1e-3))
    fmt = "{heldout_loss:.4f} · {style_distance:.3f} · {base_change:.0f}".format
    for data, base in result["base"].items():
        ranks = sorted({r["rank"] for r in rows if r["data"] == data and r["lr"] == lr})
        sigmas = list(dict.fromkeys(r["nonlinearity"] for r in rows if r["data"] == data))
        out += [
            f"**{data}**, lr {lr:g}, {info['steps']} steps; each cell: held-out loss · style "
            "distance · base change (lower is better for all three)",
            "",
            "| σ | " + " | ".join(f"rank {k}" for k in ranks) + " |",
            "|---|" + "---|" * len(ranks),
            f"| no adapter | {fmt(**base)} |" + " |" * (len(ranks) - 1),
        ]
        for sigma in sigmas:
            found = [
                cell(rows, data=data, nonlinearity=sigma, rank=k, lr=lr, seed=0, alpha=None)
                for k in ranks
            ]
            out.append(f"| {sigma} | " + " | ".join(fmt(**c) if c else "" for c in found) + " |")
        for seed in sorted({r["seed"] for r in rows if r["data"] == data} - {0}):
            found = [
                cell(rows, data=data, nonlinearity="identity", rank=k, lr=lr, seed=seed, alpha=None)
                for k in ranks
            ]
            out.append(
                f"| identity, seed {seed} | "
                + " | ".join(fmt(**c) if c else "" for c in found)
                + " |"
            )
        out.append("")
        sweep = sorted({r["lr"] for r in rows if r["data"] == data and r["alpha"] is None})
        sweep_ranks = {
            r["rank"] for r in rows if r["data"] == data and r["lr"] != lr and r["alpha"] is None
        }
        for k in sorted(sweep_ranks):
            out += [
                f"**{data}**, learning rates at rank {k} (held-out loss · style distance · base change)",
                "",
                "| σ | " + " | ".join(f"lr {v:g}" for v in sweep) + " |",
                "|---|" + "---|" * len(sweep),
            ]
            for sigma in sigmas:
                found = [
                    cell(rows, data=data, nonlinearity=sigma, rank=k, lr=v, seed=0, alpha=None)
                    for v in sweep
                ]
                if any(found):
                    out.append(
                        f"| {sigma} | " + " | ".join(fmt(**c) if c else "" for c in found) + " |"
                    )
            out.append("")
    alphas = [r for r in rows if r["alpha"] is not None]
    if alphas:
        out += [
            "**alpha** (identity; held-out loss · style distance · base change)",
            "",
            "| data | rank | alpha | lr | result |",
            "|---|---|---|---|---|",
        ]
        for r in alphas:
            same = cell(
                rows,
                data=r["data"],
                nonlinearity="identity",
                rank=r["rank"],
                lr=lr,
                seed=0,
                alpha=None,
            )
            if same and same not in [a.get("_shown") for a in alphas]:
                out.append(f"| {r['data']} | {r['rank']} | rank | {lr:g} | {fmt(**same)} |")
                for a in alphas:
                    a["_shown"] = same
            out.append(
                f"| {r['data']} | {r['rank']} | {r['alpha']:g} | {r['lr']:.3g} | {fmt(**r)} |"
            )
        for a in alphas:
            a.pop("_shown", None)
        out.append("")
    if result.get("alpha_check"):
        out += [
            "**alpha x 16 vs alpha at a changed lr and init** (toy linear LoRA, 30 steps, "
            "largest loss difference; 0 = the same run)",
            "",
            "| change | max loss diff |",
            "|---|---|",
        ]
        out += [f"| {k} | {v:.2g} |" for k, v in result["alpha_check"].items()]
    return "\n".join(out)


def merge(paths: list[str]) -> dict:
    """One result from several runs' JSON files (e.g. one process per data set)."""
    parts = [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]
    info = dict(parts[0]["info"])
    info["command"] = " ; ".join(p["info"]["command"] for p in parts)
    info["cells"] = sum(p["info"]["cells"] for p in parts)
    info["benchmark time"] = " + ".join(p["info"]["benchmark time"] for p in parts)
    stopped = [p["info"]["stopped"] for p in parts if "stopped" in p["info"]]
    if stopped:
        info["stopped"] = "; ".join(stopped)
    else:
        info.pop("stopped", None)
    result = {"info": info, "base": {}, "rows": []}
    for p in parts:
        result["base"] |= p["base"]
        result["rows"] += p["rows"]
    result["alpha_check"] = alpha_check()
    return result


def markdown(result: dict) -> str:
    lines = [", ".join(f"{k}: {v}" for k, v in result["info"].items()), ""]
    lines.append(
        "| data | σ | rank | alpha | lr | seed | params | held-out loss | style dist. | base change | train s |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, b in result["base"].items():
        lines.append(
            f"| {name} | (no adapter) | | | | | 0 | {b['heldout_loss']:.5f} | "
            f"{b['style_distance']:.3f} | 0 | |"
        )
    for r in result["rows"]:
        alpha = "rank" if r["alpha"] is None else f"{r['alpha']:g}"
        lines.append(
            f"| {r['data']} | {r['nonlinearity']} | {r['rank']} | {alpha} | {r['lr']:.3g} | "
            f"{r['seed']} | {r['params']} | {r['heldout_loss']:.5f} | {r['style_distance']:.3f} | "
            f"{r['base_change']:.2f} | {r['train_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/quality.py", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    names = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    parser.add_argument("--smoke", action="store_true", help="2 cells of 2 steps (the test)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per cell")
    parser.add_argument("--ranks", type=ints, default=[1, 4, 16])
    parser.add_argument("--lr", type=float, default=1e-3, help="lr of the main grid")
    parser.add_argument("--sweep-lrs", type=floats, default=[3e-4, 3e-3], help="other lrs")
    parser.add_argument("--sweep-rank", type=int, default=4, help="rank of the lr sweep")
    parser.add_argument("--noise-seeds", type=ints, default=[1], help="extra seeds (identity)")
    parser.add_argument("--alpha-ranks", type=ints, default=[16], help="alpha = 1 cells")
    parser.add_argument("--nonlinearities", type=names, default=list(NONLINEARITIES))
    parser.add_argument("--data", type=names, default=["style", "stripes"])
    parser.add_argument("--limit-minutes", type=float, default=0, help="stop after; 0: never")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (2 on a shared 2-core CPU thrash)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the JSON to FILE")
    parser.add_argument(
        "--merge", nargs="+", metavar="JSON", help="only merge these runs' JSON files and print"
    )
    args = parser.parse_args(argv)
    if args.merge:
        result = merge(args.merge)
        print(summary(result))
        text = json.dumps(result, indent=1, ensure_ascii=False)
        if args.json:
            Path(args.json).write_text(text + "\n", encoding="utf-8")
        return 0
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.steps, args.ranks, args.sweep_lrs, args.noise_seeds = 2, [1], [], []
        args.alpha_ranks, args.nonlinearities, args.data = [], ["identity", "relu"], ["style"]
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    started = time.perf_counter()
    cells = grid(args)
    info = device_info("cpu") | {
        "command": "python "
        + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "steps": args.steps,
        "seeds": f"training seed 0 (identity also {args.noise_seeds}); validation latents and "
        f"noise seed 0; drawing seeds {list(DRAW_SEEDS)}",
        "recipe": "toy base, targets attn, batch 4, 64 px, cosine, warm-up min(20, steps/5), AdamW",
        "cells": len(cells),
        "torch threads": args.threads,
    }
    result = {"info": info, "base": {}, "rows": [], "alpha_check": alpha_check()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pipe = load_base("toy")
        make = {"style": make_style, "stripes": make_stripes}
        datasets = {name: make[name](tmp / name) for name in args.data}
        judges = {name: Judge(pipe, data) for name, data in datasets.items()}
        result["base"] = {name: judge.base for name, judge in judges.items()}
        for cell in cells:
            if args.limit_minutes and time.perf_counter() - started > args.limit_minutes * 60:
                info["stopped"] = f"after {len(result['rows'])} of {len(cells)} cells (time limit)"
                break
            t0 = time.perf_counter()
            path = train_cell(cell, datasets[cell["data"]], tmp / "run", args.steps)
            train_s = time.perf_counter() - t0
            row = cell | {"params": parameters(path), "train_s": train_s}
            row |= judges[cell["data"]].adapter(path)
            result["rows"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            info["benchmark time"] = f"{time.perf_counter() - started:.0f} s"
            if args.json:
                text = json.dumps(result, indent=1, ensure_ascii=False)
                Path(args.json).write_text(text + "\n", encoding="utf-8")
    info["benchmark time"] = f"{time.perf_counter() - started:.0f} s"
    print(markdown(result))
    print()
    print(summary(result))
    text = json.dumps(result, indent=1, ensure_ascii=False)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
