"""Where a training step's GPU time goes: `python benchmarks/profile_step.py [--batch 8] [RUN...]`.

RUN is `ref` (the diffusers example loop, reference.py), `off` (sdlora eager) or `on` (sdlora,
regional compilation). Each run trains a few steps of the SD 1.5-shaped model, profiles steps
after the warm-up with torch.profiler and prints the GPU kernels that take the most time, grouped
into families (matmul, convolution, attention, normalisation, elementwise, optimizer, copies), so
two runs can be compared family by family. A tool for finding what to speed up next, not a table
for the README (that is `run.py`).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

FAMILIES = [  # (family, regex on the kernel name), first match wins
    ("attention", r"flash|fmha|attention|sdpa|cudnn.*mha"),
    ("matmul", r"gemm|matmul|cutlass|sm90_xmma|nvjet|cublas"),
    ("convolution", r"conv|implicit|dgrad|wgrad|fprop|xmma"),
    ("normalisation", r"norm|welford"),
    ("optimizer", r"adam|foreach|multi_tensor"),
    ("copies", r"copy|cast|transpose|convert|memcpy|memset|cat"),
    ("compiled (triton)", r"triton"),
    ("elementwise", r"elementwise|vectorized|reduce|unrolled|silu|gelu|add|mul"),
]


def family(name: str) -> str:
    low = name.lower()
    return next((f for f, pattern in FAMILIES if re.search(pattern, low)), "other")


def profile(run: str, batch: int, warm: int, active: int, device) -> list[tuple[str, float, int]]:
    """(kernel name, total ms per step, calls per step) of `active` steps after `warm` steps."""
    import torch
    from torch.profiler import ProfilerActivity, schedule

    from benchmarks import training
    from benchmarks.reference import ReferenceLoop
    from benchmarks.sd15 import build_pipeline

    prof = torch.profiler.profile(
        activities=[ProfilerActivity.CUDA],
        schedule=schedule(wait=0, warmup=warm, active=active, repeat=1),
    )
    steps = warm + active + 1
    with prof:
        if run == "ref":
            loop = ReferenceLoop(build_pipeline(False, device), batch, 512, mixed_precision="bf16")
            for _ in range(steps):
                loop.step()
                torch.cuda.synchronize(device)
                prof.step()
        else:
            from sdlora.train.loop import train

            with tempfile.TemporaryDirectory() as tmp:
                data = training.write_images(Path(tmp) / "data", batch * 2, 512)
                config = training.bench_config(
                    False, data, str(Path(tmp) / "out"), batch, steps, run
                )
                train(config, pipe=build_pipeline(False, device), on_step=lambda s: prof.step())
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.key_averages():
        if event.device_type.name == "CUDA" and event.device_time_total > 0:
            entry = totals[event.key]
            entry[0] += event.device_time_total / 1000 / active
            entry[1] += event.count // active
    return sorted(((k, v[0], v[1]) for k, v in totals.items()), key=lambda r: -r[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/profile_step.py", description=__doc__)
    parser.add_argument("runs", nargs="*", default=["ref", "off", "on"], help="ref, off, on")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--top", type=int, default=15, help="kernels listed per run (15)")
    args = parser.parse_args(argv)
    import torch

    device = torch.device("cuda")
    for run in args.runs:
        kernels = profile(run, args.batch, warm=4, active=3, device=device)
        total = sum(ms for _, ms, _ in kernels)
        by_family: dict[str, float] = defaultdict(float)
        for name, ms, _ in kernels:
            by_family[family(name)] += ms
        print(f"\n## {run}, batch {args.batch}: {total:.1f} ms of GPU kernels per step")
        for name, ms in sorted(by_family.items(), key=lambda r: -r[1]):
            print(f"- {name}: {ms:.1f} ms ({ms / total:.0%})")
        print("| kernel | ms/step | calls/step |\n|---|---|---|")
        for name, ms, calls in kernels[: args.top]:
            print(f"| {name[:110]} | {ms:.2f} | {calls} |")
        torch._dynamo.reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())
