"""Blending, generation and export measurements: what a user of the mixer waits for.

- strength change: time from `Mixer.set_strength` to weights ready on the device, 4 linear
  adapters of rank 16 on the UNet and text-encoder attention (diffusers' `set_adapters` on the
  same 4 files beside it, where peft is installed);
- generation: time per denoising step (guidance on, so batch 2) for the bare base, 4 fused linear
  adapters and 1 nonlinear (unfused) adapter, through `sdlora.bases.generate`;
- schedule switch: the extra time of the step on which a `start=0.5` window switches one of
  them on (its layers re-fused, the prompt encoded again under the new strengths);
- export: the 4-adapter blend as one merged single-file checkpoint in fp16.

`measure(smoke, device, dtype)` returns rows for benchmarks/run.py's table.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from sdlora.bases.generate import GenerateSettings, generate
from sdlora.io.files import save_adapter
from sdlora.lora.blend import Mixer
from sdlora.lora.inject import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_trainable, collect_adapter
from sdlora.lora.schedule import Window
from sdlora.tools.export import export_single_file

from .sd15 import build_pipeline

RANK = 16
N_ADAPTERS = 4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_adapter_files(pipe, folder: Path, nonlinearity: str = "identity", count: int = 1):
    """Write `count` random rank-16 adapters for `pipe` (UNet + text-encoder attention)."""
    paths = []
    for i in range(count):
        g = torch.Generator().manual_seed(100 + i)
        injected = add_trainable(
            pipe.unet, "unet", UNET_TARGETS["attn"], RANK, nonlinearity=nonlinearity, generator=g
        )
        injected.update(
            add_trainable(
                pipe.text_encoder,
                "text_encoder",
                TEXT_ENCODER_TARGETS["attn"],
                RANK,
                nonlinearity=nonlinearity,
                generator=g,
            )
        )
        for weights in injected.values():
            with torch.no_grad():
                weights.up.copy_(torch.randn(weights.up.shape, generator=g) * 0.01)
        adapter = collect_adapter(injected, {"sdlora_base_model": "sd15-random"})
        _unwrap(pipe)  # take the trainable layers out again
        path = folder / f"{nonlinearity}{i}.safetensors"
        save_adapter(adapter, path, overwrite=True)
        paths.append(path)
    return paths


def _unwrap(pipe) -> None:
    from sdlora.lora.inject import unwrap_all

    for model in (pipe.unet, pipe.text_encoder):
        unwrap_all(model)


def time_strength_changes(mixer: Mixer, names: list[str], device, repeats: int) -> list[float]:
    """Seconds from set_strength to weights ready, cycling over the adapters."""
    times = []
    for i in range(repeats):
        name = names[i % len(names)]
        _sync(device)
        start = time.perf_counter()
        mixer.set_strength(name, 0.25 + 0.5 * ((i * 7) % 10) / 10)
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def time_diffusers_set_adapters(pipe, paths, device, repeats: int) -> list[float] | None:
    """diffusers' own strength change on the same files, or None where peft is missing."""
    try:
        import peft  # noqa: F401
    except ImportError:
        return None
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # its per-key report of the adapter injection
    names = [f"a{i}" for i in range(len(paths))]
    for name, path in zip(names, paths, strict=True):
        pipe.load_lora_weights(str(path), adapter_name=name)
    times = []
    for i in range(repeats):
        weights = [0.25 + 0.5 * ((i * 7 + j) % 10) / 10 for j in range(len(names))]
        _sync(device)
        start = time.perf_counter()
        pipe.set_adapters(names, adapter_weights=weights)
        _sync(device)
        times.append(time.perf_counter() - start)
    pipe.unload_lora_weights()
    return times


def time_steps(pipe, steps: int, size: int | None, device, **schedule) -> float:
    """Median seconds per denoising step of one 1-image generation with guidance (batch 2)."""
    return statistics.median(step_gaps(pipe, steps, size, device, **schedule))


def step_gaps(pipe, steps: int, size: int | None, device, **schedule) -> list[float]:
    """Seconds of each denoising step after the first (a warm-up generation before);
    `schedule`: generate's `mixer` and `schedules`, for an adapter switched between steps."""
    marks: list[float] = []

    def on_step(done: int, total: int) -> None:
        _sync(device)
        marks.append(time.perf_counter())

    settings = GenerateSettings(
        prompt="a red circle", steps=steps, guidance=7.5, seed=0, width=size, height=size
    )
    generate(pipe, settings, on_step=on_step, **schedule)  # warm-up (kernels, allocator)
    marks.clear()
    generate(pipe, settings, on_step=on_step, **schedule)
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def row(section, name, value, unit, target=None, met=None, note=""):
    return dict(
        section=section, name=name, value=value, unit=unit, target=target, met=met, note=note
    )


def measure(smoke: bool, device, dtype) -> list[dict]:
    """Every blending/generation/export measurement, as table rows."""
    device = torch.device(device)
    pipe = build_pipeline(smoke, device, dtype)
    repeats, steps = (10, 3) if smoke else (50, 20)
    size = None if smoke else 512
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        linear = make_adapter_files(pipe, folder, "identity", N_ADAPTERS)
        (nonlinear,) = make_adapter_files(pipe, folder, "relu", 1)

        bare = time_steps(pipe, steps, size, device)

        mixer = Mixer(pipe)
        _sync(device)
        start = time.perf_counter()
        names = [mixer.add(p, strength=0.5) for p in linear]
        _sync(device)
        load = (time.perf_counter() - start) / len(names)
        layers = sum(len(e.layers) for e in mixer.entries.values())
        change = statistics.median(time_strength_changes(mixer, names, device, repeats))
        rows.append(row("blending", "load + attach one adapter file", load * 1e3, "ms"))
        rows.append(
            row(
                "blending",
                f"strength change, {N_ADAPTERS} adapters rank {RANK} (median)",
                change * 1e3,
                "ms",
                "< 5",
                None if smoke else change < 5e-3,
                f"{layers} adapter-layers, UNet + text encoder",
            )
        )
        fused = time_steps(pipe, steps, size, device)
        # one adapter (UNet + text encoder) switched on half-way: the step that holds the switch
        # (its layers re-fused, the prompt encoded again) beside the median step
        gaps = step_gaps(
            pipe, steps, size, device, mixer=mixer, schedules={names[0]: Window(start=0.5)}
        )
        switch = max(gaps) - statistics.median(gaps)
        rows.append(
            row(
                "blending",
                "schedule switch (start=0.5), one adapter, cost on its step",
                switch * 1e3,
                "ms",
                note="re-fuse of its layers + the prompt encoded again",
            )
        )

        start = time.perf_counter()
        export_single_file(pipe, folder / "merged.safetensors", dtype="fp16")
        export = time.perf_counter() - start
        gib = (folder / "merged.safetensors").stat().st_size / 2**30
        rows.append(
            row(
                "export",
                f"merged single file fp16, {N_ADAPTERS} adapters",
                export,
                "s",
                "< 10",
                None if smoke else export < 10,
                f"{gib:.2f} GiB written",
            )
        )

        mixer.clear()
        mixer.add(nonlinear, strength=0.8)
        unfused = time_steps(pipe, steps, size, device)
        mixer.clear()
        # the bare base once more, now that every kernel and allocation has been seen: the first
        # measurement can carry start-up costs that would flatter the adapters' rows
        bare_again = time_steps(pipe, steps, size, device)
        bare_first, bare = bare, min(bare, bare_again)

        reference = time_diffusers_set_adapters(pipe, linear, device, min(repeats, 10))
        if reference is not None:
            rows.append(
                row(
                    "blending",
                    f"diffusers set_adapters, same {N_ADAPTERS} files (median)",
                    statistics.median(reference) * 1e3,
                    "ms",
                    note="reference, PEFT",
                )
            )

    rows.append(
        row(
            "generation",
            "step, bare base",
            bare * 1e3,
            "ms",
            note=f"guidance on: batch 2; the faster of {bare_first * 1e3:.1f} ms (first) and "
            f"{bare_again * 1e3:.1f} ms (after the adapters were removed)",
        )
    )
    for name, value, limit in (
        (f"step, {N_ADAPTERS} fused linear adapters", fused, 0.02),
        ("step, 1 nonlinear adapter (relu, unfused)", unfused, 0.10),
    ):
        overhead = value / bare - 1
        rows.append(
            row(
                "generation",
                name,
                value * 1e3,
                "ms",
                f"< +{limit:.0%}",
                None if smoke else overhead < limit,
                f"{overhead:+.1%} over the bare base",
            )
        )
    return rows
