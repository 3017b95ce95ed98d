"""The run a user makes: the whole `sdlora train` command, timed from the shell, first and second.

`python benchmarks/first_run.py [--steps 1000] [--batches 8,1] [--runs eager,cold,warm,reference]
[--family sd15|sdxl] [--keep DIR]`

Builds a model folder with random weights (fp16 files, as downloaded models are; SD 1.5-shaped,
or SDXL-base-1.0-shaped with `--family sdxl`) and a folder of 64 images at the family's size
(512 or 1024 px), then times whole commands as subprocesses, start-up included (imports, model
load and cast, caching, compiling, the steps, writing the adapter):

- eager:        `sdlora train ... --compile off`
- cold:         `sdlora train ... --compile on` with an empty compile cache (a fresh machine)
- auto:         `sdlora train ...` as it is by default (`--compile auto`: the first steps run
                while the workers compile), on an empty compile cache
- warm:         the same again, the compile cache now holding its graphs (a second run)
- serial:       `cold` with SDLORA_COMPILE_WORKERS=0 (compiling in the training process alone)
- checkpointed: `auto` with `--gradient-checkpointing` (the small-GPU setting)
- reference:    the diffusers LoRA example's loop (`reference.py`) as a command: load the folder,
                set up, run the steps (VAE every step, ready-made batches)

Each row gives the wall time, the first step as the trainer reports it (start-up included), the
rate after it, the wall time of 1,000 steps projected from these, and on CUDA two peaks: the
trainer's own (PyTorch's allocated memory) and the whole GPU's (what `nvidia-smi` reports as
used, sampled every 0.1 s, above what was used before the command: compile workers, CUDA
contexts and the caching allocator's reserve included). An `auto` run that switched also
gives, from its progress bar (1 s resolution), the uncompiled steps and their seconds, the first
compiled step (loading the graphs) and the next (recording the CUDA graphs). Every run gives
its two ends too, from when its lines came out: the start before set-up (`start_s`) and the end
after the final report (`exit_s`). `--keep DIR` builds
the folders there once and reuses them; each command's output goes to DIR/RUN-BATCH.log as it
runs. `--smoke` does the same on the CPU with the tiny base in seconds (tests).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

RUNS = ("eager", "cold", "auto", "warm", "serial", "checkpointed", "reference")
FAMILIES = {"sd15": 512, "sdxl": 1024}  # family: image side
DONE = re.compile(
    r"done: (\d+) steps in ([\d.]+) s \((?:first step ([\d.]+) s, then )?([\d.e+-]+) steps/s, "
    r"([\d.e+-]+) images/s\)"
)
IMAGES = 64
PROJECTED_STEPS = 1000  # the wall-time column projects each run to this many steps
PEAK = re.compile(r"peak memory ([\d.]+) GiB \(GPU\)")
# the training progress bar: "training: ... | STEP/TOTAL [ELAPSED<" with ELAPSED as [h:]mm:ss
BAR = re.compile(r"training:.*?\| *(\d+)/\d+ \[(?:(\d+):)?(\d+):(\d+)<")
SWITCH = re.compile(r"speed: compiled from step (\d+) on")


def build_folders(root: Path, smoke: bool, family: str = "sd15") -> tuple[Path, Path]:
    """(model folder, image folder) under `root`; kept when a previous call built them."""
    import torch

    from benchmarks.training import write_images

    model, images = root / "model", root / "images"
    if (model / "model_index.json").exists() and len(list(images.glob("*.txt"))) == IMAGES:
        return model, images
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    if family == "sdxl":
        from benchmarks.sdxl import build_pipeline as build_xl

        pipe = build_xl(smoke, torch.device(device)).to(dtype=dtype)
    else:
        from benchmarks.sd15 import build_pipeline

        pipe = build_pipeline(smoke, device, dtype)
    partial = root / "model.partial"
    pipe.save_pretrained(partial, safe_serialization=True)
    partial.rename(model)
    del pipe
    if device == "cuda":
        torch.cuda.empty_cache()  # the commands measured next find the GPU as a user would
    return model, write_images(images, IMAGES, side(family, smoke))


def side(family: str, smoke: bool) -> int:
    return 64 if smoke else FAMILIES[family]


def train_command(
    model: Path,
    data: Path,
    out: Path,
    steps: int,
    batch: int,
    compile: str,
    smoke: bool,
    nonlinearity: str = "identity",
    family: str = "sd15",
    checkpointing: bool = False,
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
        str(side(family, smoke)),
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
    ] + (["--gradient-checkpointing"] if checkpointing else [])


def timed(cmd: list[str], env: dict, cwd: Path, log: Path) -> tuple[float, str, float | None, dict]:
    """(wall seconds, output, GiB the whole GPU used above its use before, MARKS seen) of a
    command; raises with its last lines when it fails. The GPU figure is None without
    nvidia-smi. MARKS seen: {name: seconds into the command when its line came out}.

    The output goes to `log` as it comes, so a command stopped from outside still leaves it.
    It runs in `cwd`, away from a source checkout: `-m sdlora.cli` then finds the installed
    package (with sdlora.train), as a user's shell would."""
    before = gpu_used_mib()
    sampler = None
    if before is not None:
        query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        sampler = subprocess.Popen(query + ["-lms", "100"], stdout=subprocess.PIPE, text=True)
    started = time.perf_counter()
    seen: dict[str, float] = {}
    try:
        with (
            log.open("wb") as out,
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd
            ) as run,
        ):
            tail = b""  # enough of the output to find a mark cut across two reads
            while chunk := run.stdout.read1(1 << 16):
                now = time.perf_counter() - started
                out.write(chunk)
                out.flush()
                tail = (tail + chunk)[-4096:]
                for name, mark in MARKS.items():
                    if name not in seen and mark in tail:
                        seen[name] = now
    finally:
        wall = time.perf_counter() - started
        if sampler is not None:
            sampler.terminate()
            samples = [int(v) for v in sampler.communicate()[0].split() if v.isdigit()]
    output = log.read_text(encoding="utf-8", errors="replace")
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed: {output[-2000:]}")
    peak = (max(samples, default=before) - before) / 1024 if sampler is not None else None
    return wall, output, peak, seen


# lines whose time of coming out `timed` notes: set-up's report (it comes when set-up ends) and
# the final report (the adapter is written by then: what follows is the process's end)
MARKS = {"setup": b"set-up took ", "done": b"done: "}


def gpu_used_mib() -> int | None:
    """MiB in use on GPU 0 as nvidia-smi reports it; None where there is no nvidia-smi."""
    query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return int(out.split()[0])


def measure(
    smoke: bool,
    steps: int,
    batches: list[int],
    runs: list[str],
    nonlinearity: str = "identity",
    family: str = "sd15",
    keep: Path | None = None,
) -> dict:

    from benchmarks.sd15 import device_info

    mode = f"{'SDXL' if family == 'sdxl' else 'SD 1.5'}, {side(family, False)} px"
    info = device_info() | {"mode": "smoke (tiny base, CPU)" if smoke else mode}
    info |= {"steps": steps, "images": IMAGES, "rank": 4, "nonlinearity": nonlinearity}
    rows = []
    with tempfile.TemporaryDirectory(prefix="sdlora-first-run-") as tmp:
        root = keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        model, data = build_folders(root, smoke, family)
        for batch in batches:
            for run in runs:
                env = dict(os.environ, PYTHONUNBUFFERED="1")
                if run == "reference":
                    cmd = [sys.executable, __file__, "--reference-run", str(model)]
                    cmd += [str(steps), str(batch), "--family", family]
                    cmd += ["--smoke"] if smoke else []
                else:
                    compile = {"eager": "off", "auto": "auto", "checkpointed": "auto"}.get(
                        run, "on"
                    )
                    cache = root / f"{'cold' if run == 'warm' else run}-cache-{batch}"
                    if run != "warm":  # every other run starts on an empty compile cache
                        shutil.rmtree(cache, ignore_errors=True)
                    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
                    if run == "serial":
                        env["SDLORA_COMPILE_WORKERS"] = "0"
                    out = root / f"out-{run}-{batch}"
                    cmd = train_command(
                        model, data, out, steps, batch, compile, smoke, nonlinearity, family,
                        checkpointing=run == "checkpointed",
                    )  # fmt: skip
                wall, log, gpu, seen = timed(cmd, env, root, root / f"{run}-{batch}.log")
                rows.append(row(run, batch, steps, wall, log, gpu) | ends(wall, log, seen))
                print(json.dumps(rows[-1]), flush=True)
    return {"info": info, "rows": rows}


def row(run: str, batch: int, steps: int, wall: float, log: str, gpu: float | None) -> dict:
    found = DONE.search(log)
    speed = re.search(r"speed: (.*)", log)
    setup = re.search(r"set-up took (.*)", log)
    peak = PEAK.search(log)
    first = float(found.group(3)) if found and found.group(3) else None
    images_s = float(found.group(5)) if found else None
    projected = None
    if first is not None and images_s:  # the command's time outside the steps stays as it was
        projected = wall + (PROJECTED_STEPS - steps) * batch / images_s
    return dict(
        run=run,
        batch=batch,
        steps=steps,
        wall_s=round(wall, 1),
        first_step_s=first,
        images_per_s=images_s,
        wall_1000_s=round(projected, 1) if projected is not None else None,
        peak_gib=float(peak.group(1)) if peak else None,
        gpu_gib=round(gpu, 2) if gpu is not None else None,
        speed=speed.group(1).strip() if speed else "",
        setup=setup.group(1).strip() if setup else "",
    ) | switch_times(log)


def ends(wall: float, log: str, seen: dict[str, float]) -> dict:
    """The command's two ends, from when MARKS came out: `start_s` from the command's start to
    the start of set-up (Python, imports, CUDA) and `exit_s` from the final report to the
    process's end (its tear-down). Those it can tell."""
    found = {}
    setup = re.search(r"set-up took ([\d.]+) s", log)
    if setup and "setup" in seen:
        found["start_s"] = round(seen["setup"] - float(setup.group(1)), 1)
    if "done" in seen:
        found["exit_s"] = round(wall - seen["done"], 1)
    return found


def step_clock(log: str) -> dict[int, int]:
    """{step: seconds into the loop when the progress bar first showed it done} (1 s steps)."""
    clock: dict[int, int] = {}
    for part in re.split(r"[\r\n]", log):
        if (bar := BAR.search(part)) is not None:
            hours, minutes, seconds = (int(g or 0) for g in bar.groups()[1:])
            clock.setdefault(int(bar.group(1)), 3600 * hours + 60 * minutes + seconds)
    return clock


def switch_times(log: str) -> dict:
    """`--compile auto`'s switch as the progress bar timed it: the uncompiled steps and their
    seconds, the first compiled step (it loads the graphs) and the next (it records the CUDA
    graphs). Empty for a run that did not switch."""
    switch = SWITCH.search(log)
    clock = step_clock(log)
    first = int(switch.group(1)) if switch else None
    if first is None or not {first - 1, first, first + 1} <= clock.keys():
        return {}
    return dict(
        uncompiled_steps=first - 1,
        uncompiled_s=clock[first - 1],
        switch_step_s=clock[first] - clock[first - 1],
        recording_step_s=clock[first + 1] - clock[first],
    )


def reference_run(model: str, steps: int, batch: int, smoke: bool, family: str = "sd15") -> None:
    """The diffusers example's loop as one command: load, set up, `steps` steps, report."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from benchmarks.reference import ReferenceLoop, ReferenceLoopXL

    started = time.perf_counter()
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(model, local_files_only=True)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            model, safety_checker=None, local_files_only=True
        )
    mixed = "no" if smoke or not torch.cuda.is_available() else "bf16"
    looping = ReferenceLoopXL if family == "sdxl" else ReferenceLoop
    loop = looping(pipe, batch, side(family, smoke), mixed_precision=mixed)
    loop.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    first = time.perf_counter()
    for _ in range(steps - 1):
        loop.step()  # the example reads the loss every step: each step ends synchronised
    end = time.perf_counter()
    rate = (steps - 1) / max(end - first, 1e-9)
    if torch.cuda.is_available():
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (GPU)")
    print(
        f"done: {steps} steps in {end - started:.1f} s (first step {first - started:.1f} s, then "
        f"{rate:.3g} steps/s, {rate * batch:.3g} images/s)",
        file=sys.stderr,
    )


def table(result: dict) -> str:
    lines = [
        f"| run | batch | steps | wall s | first step s | img/s after it | {PROJECTED_STEPS} steps s "
        "(projected) | peak GiB (PyTorch) | GPU GiB (nvidia-smi) | compile |"
    ]
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        lines.append(
            f"| {r['run']} | {r['batch']} | {r['steps']} | {r['wall_s']} | {r['first_step_s']} | "
            f"{r['images_per_s']} | {r['wall_1000_s']} | {r['peak_gib']} | {r['gpu_gib']} | "
            f"{r['speed']} |"
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
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd15")
    parser.add_argument("--keep", type=Path, help="build the folders here once, reuse them")
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--reference-run", nargs=3, metavar=("MODEL", "STEPS", "BATCH"))
    args = parser.parse_args()
    if args.reference_run:
        model, steps, batch = args.reference_run
        reference_run(model, int(steps), int(batch), args.smoke, args.family)
        return
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        parser.error(f"--runs: unknown {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    batches = [int(b) for b in args.batches.split(",")]
    result = measure(
        args.smoke, args.steps, batches, runs, args.nonlinearity, args.family, args.keep
    )
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
