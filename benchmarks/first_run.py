"""The run a user makes: the whole `sdlora train` command, timed from the shell, first and second.

`python benchmarks/first_run.py [--steps 1000] [--batches 8,1] [--runs eager,cold,warm,reference]`

Builds an SD 1.5-shaped model folder with random weights (fp16 files, as downloaded models are)
and a folder of 64 images at 512 px, then times whole commands as subprocesses, start-up
included (imports, model load and cast, caching, compiling, the steps, writing the adapter):

- eager:     `sdlora train ... --compile off`
- cold:      `sdlora train ... --compile on` with an empty compile cache (a fresh machine)
- warm:      the same again, the compile cache now holding its graphs (a second run)
- serial:    `cold` with SDLORA_COMPILE_WORKERS=0 (compiling in the training process alone)
- reference: the diffusers LoRA example's loop (`reference.py`) as a command: load the folder,
             set up, run the steps (VAE and text encoder every step, ready-made batches)

Each row gives the wall time, the first step as the trainer reports it (start-up included) and
the rate after it. `--smoke` does the same on the CPU with the tiny base in seconds (the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

RUNS = ("eager", "cold", "warm", "serial", "reference")
DONE = re.compile(
    r"done: (\d+) steps in ([\d.]+) s \((?:first step ([\d.]+) s, then )?([\d.e+-]+) steps/s, "
    r"([\d.e+-]+) images/s\)"
)
IMAGES = 64


def build_folders(root: Path, smoke: bool) -> tuple[Path, Path]:
    """(model folder, image folder) under `root`."""
    import torch

    from benchmarks.sd15 import build_pipeline
    from benchmarks.training import write_images

    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    pipe = build_pipeline(smoke, device, torch.float16 if device == "cuda" else torch.float32)
    model = root / "model"
    pipe.save_pretrained(model, safe_serialization=True)
    data = write_images(root / "images", IMAGES, 64 if smoke else 512)
    return model, data


def train_command(
    model: Path,
    data: Path,
    out: Path,
    steps: int,
    batch: int,
    compile: str,
    smoke: bool,
    nonlinearity: str = "identity",
):
    return [
        sys.executable,
        "-m",
        "sdlora.cli",
        "train",
        str(data),
        "--output",
        str(out),
        "--base",
        str(model),
        "--steps",
        str(steps),
        "--batch-size",
        str(batch),
        "--resolution",
        "64" if smoke else "512",
        "--rank",
        "4",
        "--compile",
        compile,
        "--save-every",
        "0",
        "--seed",
        "0",
        "--overwrite",
        "--nonlinearity",
        nonlinearity,
    ]


def timed(cmd: list[str], env: dict, cwd: Path) -> tuple[float, str]:
    """(wall seconds, stderr) of a command; raises with its last lines when it fails.

    It runs in `cwd`, away from a source checkout: `-m sdlora.cli` then finds the installed
    package (with sdlora.train), as a user's shell would."""
    started = time.perf_counter()
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)
    wall = time.perf_counter() - started
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed: {run.stderr[-2000:]}")
    return wall, run.stderr + run.stdout


def measure(
    smoke: bool, steps: int, batches: list[int], runs: list[str], nonlinearity: str = "identity"
) -> dict:

    from benchmarks.sd15 import device_info

    info = device_info() | {"mode": "smoke (tiny base, CPU)" if smoke else "SD 1.5, 512 px"}
    info |= {"steps": steps, "images": IMAGES, "rank": 4, "nonlinearity": nonlinearity}
    rows = []
    with tempfile.TemporaryDirectory(prefix="sdlora-first-run-") as tmp:
        root = Path(tmp)
        model, data = build_folders(root, smoke)
        for batch in batches:
            cache = root / f"compile-cache-{batch}"
            for run in runs:
                env = dict(os.environ, PYTHONUNBUFFERED="1")
                if run == "reference":
                    cmd = [
                        sys.executable,
                        __file__,
                        "--reference-run",
                        str(model),
                        str(steps),
                        str(batch),
                    ]
                    cmd += ["--smoke"] if smoke else []
                else:
                    compile = "off" if run == "eager" else "on"
                    cache_dir = cache if run in ("cold", "warm") else root / f"serial-cache-{batch}"
                    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
                    if run == "serial":
                        env["SDLORA_COMPILE_WORKERS"] = "0"
                    out = root / f"out-{run}-{batch}"
                    cmd = train_command(
                        model, data, out, steps, batch, compile, smoke, nonlinearity
                    )
                wall, log = timed(cmd, env, root)
                rows.append(row(run, batch, steps, wall, log))
                print(json.dumps(rows[-1]), flush=True)
    return {"info": info, "rows": rows}


def row(run: str, batch: int, steps: int, wall: float, log: str) -> dict:
    found = DONE.search(log)
    speed = re.search(r"speed: (.*)", log)
    setup = re.search(r"set-up took (.*)", log)
    first = float(found.group(3)) if found and found.group(3) else None
    images_s = float(found.group(5)) if found else None
    return dict(
        run=run,
        batch=batch,
        steps=steps,
        wall_s=round(wall, 1),
        first_step_s=first,
        images_per_s=images_s,
        speed=speed.group(1).strip() if speed else "",
        setup=setup.group(1).strip() if setup else "",
    )


def reference_run(model: str, steps: int, batch: int, smoke: bool) -> None:
    """The diffusers example's loop as one command: load, set up, `steps` steps, report."""
    import torch
    from diffusers import StableDiffusionPipeline

    from benchmarks.reference import ReferenceLoop

    started = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(
        model, safety_checker=None, local_files_only=True
    )
    mixed = "no" if smoke or not torch.cuda.is_available() else "bf16"
    loop = ReferenceLoop(pipe, batch, 64 if smoke else 512, mixed_precision=mixed)
    loop.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    first = time.perf_counter()
    for _ in range(steps - 1):
        loop.step()  # the example reads the loss every step: each step ends synchronised
    end = time.perf_counter()
    rate = (steps - 1) / max(end - first, 1e-9)
    print(
        f"done: {steps} steps in {end - started:.1f} s (first step {first - started:.1f} s, then "
        f"{rate:.3g} steps/s, {rate * batch:.3g} images/s)",
        file=sys.stderr,
    )


def table(result: dict) -> str:
    lines = ["| run | batch | steps | wall s | first step s | img/s after it | compile |"]
    lines.append("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        lines.append(
            f"| {r['run']} | {r['batch']} | {r['steps']} | {r['wall_s']} | {r['first_step_s']} | "
            f"{r['images_per_s']} | {r['speed']} |"
        )
    info = ", ".join(f"{k}: {v}" for k, v in result["info"].items())
    return info + "\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batches", default="8,1")
    parser.add_argument("--runs", default="eager,cold,warm,reference")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--nonlinearity", default="identity", help="of the trained adapter")
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--reference-run", nargs=3, metavar=("MODEL", "STEPS", "BATCH"))
    args = parser.parse_args()
    if args.reference_run:
        model, steps, batch = args.reference_run
        reference_run(model, int(steps), int(batch), args.smoke)
        return
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        parser.error(f"--runs: unknown {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    batches = [int(b) for b in args.batches.split(",")]
    result = measure(args.smoke, args.steps, batches, runs, args.nonlinearity)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
