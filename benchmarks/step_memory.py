"""Where a training run's GPU memory goes, step by step: `python benchmarks/step_memory.py`.

`python benchmarks/step_memory.py [--batch 4] [--steps 16] [--live] [--profile-step N]
[--json FILE] [RUN ...]`
`python benchmarks/step_memory.py --smoke`   # the same code on the CPU with tiny-xl (tests)

Trains the SDXL-shaped model of `sdxl.py` (random weights, 1024 px, rank 4, bf16) in one process
with `sdlora.train.train`, once per RUN:

- eager:            `--compile off`
- compiled:         `--compile on` (compile workers, CUDA graphs)
- compiled-plain:   `--compile on` without CUDA graphs
- budget=F:         `--compile on --activation-budget F`

and reports PyTorch's peak allocated memory within each step (the counter is reset after every
step, so step 1 holds set-up too: the cast, the compile workers' recording pass, caching), and the
steady step time (steps 6 to the last). `--live` also records the allocations of steps 2-4
(`torch.cuda.memory` history) and prints what was allocated at their highest point, grouped by
the code that allocated it: the tool that found the compile workers' recording pass holding a
whole training step's activations. `--profile-step N` runs step N under Python's profiler
and prints where its host time went (the functions with the most cumulative time): for the
step that records the CUDA graphs (step 2 with `--compile on`), the longest pause of a compiled
run. A tool for finding memory and pauses, not a table for the README.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

GIB = 2**30
LIVE_STEPS = (1, 4)  # --live records from the end of step 1 to the end of step 4
# frames that say who allocated: the first two of these in an allocation's stack name it
OWNERS = ("/sdlora/", "/diffusers/", "/train/", "/torch/_inductor/", "/torch/nn/")


def settings_of(run: str) -> tuple[dict, bool]:
    """(TrainConfig fields, CUDA graphs allowed) of a RUN name."""
    if run == "eager":
        return {"compile": "off"}, True
    if run == "compiled":
        return {"compile": "on"}, True
    if run == "compiled-plain":
        return {"compile": "on"}, False
    if run.startswith("budget="):
        return {"compile": "on", "activation_budget": float(run.split("=", 1)[1])}, True
    raise SystemExit(f"step_memory.py: unknown run {run!r}; use eager, compiled, "
                     "compiled-plain or budget=F")  # fmt: skip


def owner(frames: list[dict]) -> str:
    names = [
        f"{f['filename'].split('site-packages/')[-1]}:{f['line']} {f['name']}"
        for f in frames
        if any(part in f.get("filename", "") for part in OWNERS)
    ]
    return " < ".join(names[:2]) or "elsewhere"


def live_at_peak(snapshot: dict, top: int = 12) -> list[tuple[float, str]]:
    """(GiB, allocating code) of what was allocated at the highest point of a memory history."""
    live: dict[int, tuple[int, list]] = {}
    total = highest = 0
    at_highest: dict[int, tuple[int, list]] = {}
    for trace in snapshot["device_traces"]:
        for event in trace:
            if event["action"] == "alloc":
                live[event["addr"]] = (event["size"], event.get("frames", []))
                total += event["size"]
                if total > highest:
                    highest, at_highest = total, dict(live)
            elif event["action"] == "free_requested" and event["addr"] in live:
                total -= live.pop(event["addr"])[0]
    groups: collections.Counter = collections.Counter()
    for size, frames in at_highest.values():
        groups[owner(frames)] += size
    return [(round(size / GIB, 3), name) for name, size in groups.most_common(top)]


def top_functions(profile: cProfile.Profile, count: int = 25) -> list[str]:
    """The `count` functions with the most cumulative time, as pstats prints them."""
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(count)
    lines = out.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
    return [line for line in lines[start:] if line.strip()]


def measure(
    run: str, batch: int, steps: int, smoke: bool, live: bool, profile_step: int | None = None
) -> dict:
    import torch

    from benchmarks.sdxl import RESOLUTION, build_pipeline
    from benchmarks.training import write_images
    from sdlora.train import TrainConfig, compile_plan, speed, train

    device = torch.device("cpu" if smoke else "cuda")
    cuda = device.type == "cuda"
    fields, graphs = settings_of(run)
    allowed = compile_plan.cuda_graphs_allowed
    if not graphs:
        compile_plan.cuda_graphs_allowed = lambda *args: False
    if smoke:
        speed.COMPILE_BACKEND = "eager"  # dynamo traces the regions, no code generation
    peaks: list[float | None] = []
    marks: dict[int, float] = {}
    found: list[tuple[float, str]] = []
    profile = cProfile.Profile()
    profiled: list[str] = []

    def on_step(step: int) -> None:
        if step == profile_step:
            if cuda:
                torch.cuda.synchronize()  # the step's own GPU work inside its profile
            profile.disable()
            profiled.extend(top_functions(profile))
        peaks.append(round(torch.cuda.max_memory_allocated() / GIB, 2) if cuda else None)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            if live and step == LIVE_STEPS[0]:
                torch.cuda.memory._record_memory_history(max_entries=400_000)
            if live and step == LIVE_STEPS[1]:
                found.extend(live_at_peak(torch.cuda.memory._snapshot()))
                torch.cuda.memory._record_memory_history(enabled=None)
            torch.cuda.synchronize()
        marks[step] = time.perf_counter()
        if profile_step is not None and step == profile_step - 1:
            profile.enable()

    try:
        pipe = build_pipeline(smoke, device)
        with tempfile.TemporaryDirectory() as tmp:
            side = 64 if smoke else RESOLUTION
            data = write_images(Path(tmp) / "data", max(4 if smoke else 16, batch), side)
            config = TrainConfig(data_dir=str(data), output=str(Path(tmp) / "out"),
                                 resolution=side, batch_size=batch, steps=steps, rank=4,
                                 save_every=0, tensorboard=False, **fields)  # fmt: skip
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            train(config, pipe=pipe, on_step=on_step)
        del pipe
    finally:
        compile_plan.cuda_graphs_allowed = allowed
        torch._dynamo.reset()
    steady = min(6, steps - 1)
    step_ms = (marks[steps] - marks[steady]) / max(steps - steady, 1) * 1000
    return dict(run=run, batch=batch, step_ms=round(step_ms, 1),
                images_per_s=round(batch * 1000 / step_ms, 2), peaks_gib=peaks,
                step_s=[round(marks[k] - marks[k - 1], 2) for k in range(2, steps + 1)],
                live_at_peak=found, profile=profiled)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", default=["eager", "compiled"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--live", action="store_true", help="what is allocated at the peak")
    parser.add_argument("--profile-step", type=int, metavar="N", help="profile step N (≥ 2)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    for run in args.runs:
        settings_of(run)  # every name checked before the first model loads
    if args.smoke:
        args.batch, args.steps = 1, 3
    if args.profile_step is not None and not 2 <= args.profile_step <= args.steps:
        parser.error(f"--profile-step must be from 2 to --steps ({args.steps})")
    from benchmarks.sd15 import device_info

    result = {"info": device_info() | {"mode": "smoke" if args.smoke else "SDXL, 1024 px"}}
    result["rows"] = []
    for run in args.runs:
        row = measure(run, args.batch, args.steps, args.smoke, args.live, args.profile_step)
        result["rows"].append(row)
        brief = {k: v for k, v in row.items() if k not in ("live_at_peak", "profile")}
        print(json.dumps(brief), flush=True)
        for gib, name in row["live_at_peak"]:
            print(f"  {gib:8.3f} GiB  {name}")
        print("\n".join(row["profile"]), flush=True)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
