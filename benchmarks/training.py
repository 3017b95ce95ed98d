"""Training speed: sdlora's trainer (`sdlora.train.train`, its own step code) against the diffusers
LoRA example (`reference.py`), side by side on the same SD 1.5-shaped model, in one process.

For each batch size both runs start from a freshly built pipeline in memory (building it is left
out of every number). A run of N steps gives: time to the first finished step (everything the
user waits for before training moves: set-up, latent/text caching, compilation, the step), the
steady step time (mean over the last steps, after the warm-up), and peak GPU memory. The wall
time of a 1,000-step run is extrapolated from those: first step + 999 × steady step + finish
(ours: writing the adapter); the table says so.
"""

from __future__ import annotations

import gc
import logging
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from benchmarks.reference import ReferenceLoop
from benchmarks.sd15 import build_pipeline
from sdlora.train import TrainConfig, speed
from sdlora.train.config import COMPILE_MIN_STEPS
from sdlora.train.loop import train

FLOP_PER_IMAGE = 1.81e12  # SD 1.5 UNet LoRA training step at 512 px, per image (forward+backward)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak, spec sheet
RUN_STEPS = 1000  # the run whose wall time is extrapolated


@dataclass
class Timing:
    first_step_s: float  # from the start of set-up to the end of step 1
    step_s: float  # steady-state seconds per step
    finish_s: float  # after the last step until the call returns (ours: the adapter is written)
    peak_gib: float  # peak GPU memory (on the CPU: the process's peak RSS so far)
    batch: int

    @property
    def images_per_s(self) -> float:
        return self.batch / self.step_s

    @property
    def wall_s(self) -> float:
        """Projected wall time of a RUN_STEPS-step run."""
        return self.first_step_s + (RUN_STEPS - 1) * self.step_s + self.finish_s


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    """Peak GPU memory allocated since the last reset; on the CPU, the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def write_images(folder: Path, count: int, side: int) -> Path:
    """`count` random-colour-field JPEGs of side × side with captions: a training folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(count):
        small = Image.new("RGB", (8, 8))
        small.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(64)])
        small.resize((side, side), Image.Resampling.BICUBIC).save(folder / f"{i:03d}.jpg")
        (folder / f"{i:03d}.txt").write_text(f"a photo of shape {i % 4}", encoding="utf-8")
    return folder


def bench_config(
    smoke: bool, data: Path, out: str, batch: int, steps: int, compile: str
) -> TrainConfig:
    """The benchmarked training run: rank 4 at 512 px (smoke: 64), no checkpoints or logs."""
    return TrainConfig(
        data_dir=str(data),
        output=out,
        resolution=64 if smoke else 512,
        batch_size=batch,
        steps=steps,
        rank=4,
        save_every=0,
        tensorboard=False,
        compile=compile,
        mixed_precision="auto",
    )


def time_ours(
    smoke: bool, device: torch.device, data: Path, batch: int, steps: int, compile: str
) -> Timing:
    """sdlora's `train()` for `steps` steps on the SD 1.5-shaped model (see `time_train`)."""
    pipe = build_pipeline(smoke, device, torch.float32)
    with tempfile.TemporaryDirectory() as out:
        return time_train(pipe, bench_config(smoke, data, out, batch, steps, compile), device)


def time_train(pipe, config: TrainConfig, device: torch.device) -> Timing:
    """`train(config)` on `pipe` (dropped afterwards); syncs only at step 1, the warm-up end
    (a third of the steps, at least 2) and the last."""
    steps, warm = config.steps, max(2, config.steps // 3)
    reset_memory(device)
    marks: dict[int, float] = {}

    def on_step(step: int) -> None:
        if step in (1, warm, steps):
            sync(device)
            marks[step] = time.perf_counter()

    start = time.perf_counter()
    train(config, pipe=pipe, on_step=on_step)
    end = time.perf_counter()
    timing = Timing(
        first_step_s=marks[1] - start,
        step_s=(marks[steps] - marks[warm]) / (steps - warm),
        finish_s=end - marks[steps],
        peak_gib=peak_gib(device),
        batch=config.batch_size,
    )
    del pipe
    torch._dynamo.reset()  # the next run compiles from scratch, as a new process would
    return timing


def time_loop(step, steps: int, start: float, device: torch.device, batch: int) -> Timing:
    """Call `step()` `steps` times and time it like `time_ours`: the first step from `start`
    (set-up included), the steady step over the last two thirds; syncs only at those marks."""
    warm = max(2, steps // 3)
    marks = {}
    for k in range(1, steps + 1):
        step()
        if k in (1, warm, steps):
            sync(device)
            marks[k] = time.perf_counter()
    return Timing(
        first_step_s=marks[1] - start,
        step_s=(marks[steps] - marks[warm]) / (steps - warm),
        finish_s=0.0,
        peak_gib=peak_gib(device),
        batch=batch,
    )


def time_reference(smoke: bool, device: torch.device, batch: int, steps: int) -> Timing:
    """The diffusers example's set-up and loop for `steps` steps, timed like `time_ours`."""
    pipe = build_pipeline(smoke, device, torch.float32)
    reset_memory(device)
    start = time.perf_counter()
    loop = ReferenceLoop(
        pipe, batch, 64 if smoke else 512, mixed_precision="no" if smoke else "bf16"
    )
    timing = time_loop(loop.step, steps, start, device, batch)
    del loop, pipe
    return timing


def row(name, value, unit, target="", met=None, note="") -> dict:
    return dict(
        section="training", name=name, value=value, unit=unit, target=target, met=met, note=note
    )


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def measure(
    smoke: bool,
    device: torch.device,
    batches: tuple[int, ...] = (8, 1, 16),
    steps: int = 30,
    eager: bool = True,
) -> list[dict]:
    """Rows for the table: img/s, peak memory, MFU per batch size; first step and wall time."""
    logging.getLogger("sdlora").setLevel(logging.WARNING)
    if smoke:
        # CPU: dynamo traces the compiled regions (what can break) without generating code
        speed.COMPILE_BACKEND = "eager"
    peak = peak_flops(device)
    targets = {1: 20.0, 16: 130.0}  # img/s on an H100; batch 8: 2.5 × the reference
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_images(Path(tmp) / "data", max(batches) * 2, 64 if smoke else 512)
        for batch in batches:
            ref = time_reference(smoke, device, batch, steps)
            runs = {"compiled": time_ours(smoke, device, data, batch, steps, "on")}
            if eager and batch == 8:
                runs["eager"] = time_ours(smoke, device, data, batch, steps, "off")
            rows += rows_for(batch, ref, runs, peak, targets, smoke)
    return rows


def rows_for(batch, ref: Timing, runs: dict[str, Timing], peak, targets, smoke) -> list[dict]:
    """Table rows for one batch size."""

    def mfu(t: Timing) -> str:
        return f"MFU {t.images_per_s * FLOP_PER_IMAGE / peak:.1%}" if peak else "MFU n/a"

    def check(ok: bool) -> bool | None:
        return None if smoke else ok  # targets are for the H100 run

    ours = runs["compiled"]
    rows = [
        row(
            f"reference img/s, batch {batch}",
            ref.images_per_s,
            "img/s",
            note=f"{mfu(ref)}; peak {ref.peak_gib:.1f} GiB",
        )
    ]
    speedup = ours.images_per_s / ref.images_per_s
    if batch == 8:
        target, ok = f"≥ 2.5 × reference = {2.5 * ref.images_per_s:.1f}", speedup >= 2.5
    elif batch in targets:
        target, ok = f"≥ {targets[batch]:g}", ours.images_per_s >= targets[batch]
    else:
        target, ok = "", None
    rows.append(
        row(
            f"sdlora img/s, batch {batch} (compiled)",
            ours.images_per_s,
            "img/s",
            target,
            check(ok) if target else None,
            f"{speedup:.2f} × reference; {mfu(ours)}",
        )
    )
    rows.append(
        row(
            f"sdlora peak memory, batch {batch}",
            ours.peak_gib,
            "GiB",
            f"≤ reference = {ref.peak_gib:.1f}" if batch == 8 else "",
            check(ours.peak_gib <= ref.peak_gib) if batch == 8 else None,
            f"reference {ref.peak_gib:.1f} GiB",
        )
    )
    if "eager" in runs:
        eager = runs["eager"]
        rows.append(
            row(
                f"sdlora img/s, batch {batch} (--compile off)",
                eager.images_per_s,
                "img/s",
                note=f"{eager.images_per_s / ref.images_per_s:.2f} × reference; {mfu(eager)}; "
                f"first step {eager.first_step_s:.1f} s; peak {eager.peak_gib:.1f} GiB",
            )
        )
    if batch == 8:
        rows.append(
            row(
                "reference time to first step, batch 8",
                ref.first_step_s,
                "s",
                note="set-up (LoRA, optimizer) and step 1; model build excluded",
            )
        )
        rows.append(
            row(
                "sdlora time to first step, batch 8 (compiled)",
                ours.first_step_s,
                "s",
                note="data scan, latent + text caching, compilation, step 1",
            )
        )
        projected = "projected: first step + 999 × steady step (measured over "
        rows.append(
            row(
                f"reference wall time, {RUN_STEPS} steps batch 8",
                ref.wall_s,
                "s",
                note=projected + "the last steps of a short run)",
            )
        )
        # what `--compile auto` runs for a RUN_STEPS-step run of one bucket
        auto = "compiled" if RUN_STEPS >= COMPILE_MIN_STEPS or "eager" not in runs else "eager"
        for kind, timing in runs.items():
            rows.append(
                row(
                    f"sdlora wall time, {RUN_STEPS} steps batch 8 ({kind})",
                    timing.wall_s,
                    "s",
                    f"≤ ½ reference = {ref.wall_s / 2:.0f}" if kind == auto else "",
                    check(timing.wall_s <= ref.wall_s / 2) if kind == auto else None,
                    projected + "the last steps of a short run) + writing the adapter; "
                    f"{ref.wall_s / timing.wall_s:.2f} × faster"
                    + ("; what --compile auto runs" if kind == auto else ""),
                )
            )
    return rows
