"""The compile plan: whether a run compiles its UNet and how, and which graphs there are to compile.

Pure planning, no processes and no GPU: everything here runs and is tested on the CPU.

- `plan_compile`: compile or not (`--compile`, the device, steps per bucket, the base's family),
  with CUDA graphs or not, in worker processes or not, beside the first steps or before them.
- `record_calls`: the graphs themselves. One forward pass of the UNet on random inputs of each
  batch shape (`batch_shapes`) records what each compiled region receives (shapes, strides,
  dtypes, requires_grad, keyword values); regions that would compile to the same graph (same
  class, parameters, inputs and settings) make one job.
- `share_out`: the jobs dealt among the workers (precompile.py starts them; compile_worker.py is
  what each one runs, rebuilding the recorded inputs with `rebuild`).

Values never matter to a compiled graph, only shapes and types, so random weights and inputs give
the very graphs the real run needs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from sdlora.errors import SdloraError
from sdlora.train.config import (
    COMPILE_MIN_STEPS,
    COMPILE_MIN_STEPS_BY_FAMILY,
    COMPILE_MODES,
    TrainConfig,
)

MAX_WORKERS = 8  # each holds a CUDA context (~0.5 GiB) and its blocks; more gain little
TENSOR = "__tensor__"  # marks a recorded tensor in the JSON job description
# CUDA graphs with gradient checkpointing (see cuda_graphs_allowed): off, since recording them
# failed on an H200 (torch 2.11, SDXL, batch 1): checkpointing's recomputation frees an input
# during recording that replay keeps ("graph recording observed an input tensor deallocate")
CUDA_GRAPHS_CHECKPOINTED = False
# --compile auto runs the compile workers beside uncompiled steps only on GPUs with at least this
# much memory; on smaller ones they compile before the first step, as --compile on does. SDXL at
# batch 1 on an H200 (whole commands): the workers took ~11 GiB beside the loaded model (16.6 GiB
# peak of the whole GPU with them) and uncompiled steps 12.8 GiB, so side by side they would
# not fit a 24 GiB card (an estimate from those two figures, not measured together)
BACKGROUND_COMPILE_MIN_GIB = 32


@dataclass(frozen=True, kw_only=True)
class CompilePlan:
    """Whether a run compiles the UNet's regions, and how (see `plan_compile`)."""

    compile: bool  # torch.compile the UNet's regions (speed.compile_regions)
    cuda_graphs: bool = False  # compiled regions replay as CUDA graphs (on CUDA only)
    workers: bool = False  # worker processes fill the compile cache first (precompile.py)
    background: bool = False  # the workers compile while the first steps run uncompiled
    activation_budget: float = 1.0  # of each compiled region's activations kept for backward
    warning: str | None = None  # a setting the plan leaves unused, worded for the log


def plan_compile(
    config: TrainConfig,
    device: torch.device,
    *,
    steps: int,
    buckets: int,
    family: str | None,
    workers_wanted: bool,
    gpu_gib: float | None,
) -> CompilePlan:
    """Compile or not, and how, for a run of `steps` optimizer steps over `buckets` buckets.

    workers_wanted: compile workers are allowed (SDLORA_COMPILE_WORKERS is not 0); gpu_gib: the
    GPU's total memory (None: not a GPU)."""
    if not will_compile(config.compile, device, steps, buckets, family=family):
        warning = None
        if config.activation_budget < 1:
            warning = (
                "--activation-budget applies to compiled blocks and this run is not compiled "
                f"(--compile {config.compile}): every activation is kept; "
                "--gradient-checkpointing saves memory without compiling"
            )
        return CompilePlan(compile=False, warning=warning)
    allowed = cuda_graphs_allowed(config.grad_accum, config.gradient_checkpointing)
    return CompilePlan(
        compile=True,
        cuda_graphs=allowed and device.type == "cuda",
        workers=use_compile_workers(device, workers_wanted),
        background=config.compile == "auto" and room_for_background(gpu_gib),
        activation_budget=config.activation_budget,
    )


def will_compile(
    mode: str, device: torch.device, steps: int, buckets: int, *, family: str | None = None
) -> bool:
    """Whether to compile: `on`, `off`, or `auto` (CUDA, and enough steps per bucket to pay for
    it: COMPILE_MIN_STEPS, or the base's family's own number)."""
    if mode not in COMPILE_MODES:
        raise SdloraError(f"--compile must be one of: {', '.join(COMPILE_MODES)} (got {mode!r})")
    if mode == "auto":
        least = COMPILE_MIN_STEPS_BY_FAMILY.get(family, COMPILE_MIN_STEPS)
        return device.type == "cuda" and steps >= least * buckets
    return mode == "on"


def cuda_graphs_allowed(grad_accum: int, gradient_checkpointing: bool) -> bool:
    """May compiled regions replay as CUDA graphs? Not when gradients accumulate over micro-batches
    (the graphs reuse their output memory every step), nor, unless CUDA_GRAPHS_CHECKPOINTED, when
    gradient checkpointing runs each region's forward a second time inside the backward pass."""
    return grad_accum == 1 and (CUDA_GRAPHS_CHECKPOINTED or not gradient_checkpointing)


def use_compile_workers(device: torch.device, wanted: bool) -> bool:
    """Compile in parallel worker processes first (precompile.py)? On CUDA, when `wanted`.

    With gradient checkpointing the workers switch it on in their UNet too, so the regions they
    compile are the training process's own."""
    return wanted and device.type == "cuda"


def room_for_background(gpu_gib: float | None) -> bool:
    """May the compile workers run beside training steps (see BACKGROUND_COMPILE_MIN_GIB)?"""
    return gpu_gib is None or gpu_gib >= BACKGROUND_COMPILE_MIN_GIB


def batch_shapes(plan) -> list[tuple[int, int, int]]:
    """(batch, width, height) of every micro-batch a data.BatchPlan can hand out."""
    shapes = set()
    for (width, height), indices in plan.by_bucket.items():
        shapes.add((min(plan.batch_size, len(indices)), width, height))
        if len(indices) % plan.batch_size:
            shapes.add((len(indices) % plan.batch_size, width, height))
    return sorted(shapes)


@dataclass(frozen=True, kw_only=True)
class AdapterSettings:
    """The trainable adapter as injected in the training process (models.load_models), for the
    workers to inject the same (inject.add_trainable's arguments)."""

    targets: tuple[str, ...]
    rank: int
    alpha: float | None
    nonlinearity: str
    dropout: float
    name: str
    conv_rank: int | None = None
    conv_alpha: float | None = None
    dora: bool = False


def describe(value):
    """A JSON-able record of one argument: tensors by shape, stride, dtype, requires_grad."""
    if isinstance(value, torch.Tensor):
        return {
            TENSOR: True,
            "shape": list(value.shape),
            "stride": list(value.stride()),
            "dtype": str(value.dtype).removeprefix("torch."),
            "requires_grad": value.requires_grad,
        }
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
    raise TypeError(f"cannot record an argument of type {type(value).__name__}")


def rebuild(record, device: torch.device):
    """A random tensor (or the plain value) matching a `describe` record."""
    if isinstance(record, dict) and record.get(TENSOR):
        dtype = getattr(torch, record["dtype"])
        empty = torch.empty_strided(record["shape"], record["stride"], dtype=dtype, device=device)
        value = empty.normal_() if dtype.is_floating_point else empty.random_(0, 2)
        return value.requires_grad_(record["requires_grad"])
    if isinstance(record, list):
        return [rebuild(v, device) for v in record]
    if isinstance(record, dict):
        return {k: rebuild(v, device) for k, v in record.items()}
    return record


def region_names(unet: nn.Module, regions: tuple[str, ...]) -> list[str]:
    return [name for name, m in unet.named_modules() if type(m).__name__ in regions]


def record_calls(
    unet: nn.Module,
    call_unet,
    inputs: list[tuple],
    regions: tuple[str, ...],
) -> list[dict]:
    """What each region receives, for each set of UNet inputs (one per bucket shape).

    `unet` is the bare UNet (its submodules are hooked); `call_unet(*args)` for each `args` in
    `inputs` (noisy latents, timesteps, conditioning) runs it as the training step does (prepared
    by accelerate: same autocast, same wrapper).
    Returns one job per distinct graph: {"regions": [names], "args": [...], "kwargs": {...}}.
    """
    calls: list[tuple[str, dict]] = []
    hooks = []
    for name in region_names(unet, regions):

        def pre(module, args, kwargs, name=name):
            calls.append((name, {"args": describe(list(args)), "kwargs": describe(kwargs)}))

        hooks.append(unet.get_submodule(name).register_forward_pre_hook(pre, with_kwargs=True))
    try:
        # autograd runs (which inputs need gradients is part of each call) but keeps nothing
        # for a backward pass that never comes: the pass needs the memory of inference, not
        # of a training step (SDXL at batch 4: 30 GiB less)
        with torch.autograd.graph.saved_tensors_hooks(_drop, _drop):
            for args in inputs:
                out = call_unet(*args)
                del out  # no backward: nothing reaches the adapter's gradients
    finally:
        for hook in hooks:
            hook.remove()
    jobs: dict[str, dict] = {}
    for name, call in calls:
        module = unet.get_submodule(name)
        params = [
            (n, list(p.shape), str(p.dtype), p.requires_grad) for n, p in module.named_parameters()
        ]
        key = json.dumps([type(module).__name__, params, settings(module), call], sort_keys=True)
        # compile time grows with the graph: its module count is the worker's load estimate
        cost = sum(1 for _ in module.modules())
        jobs.setdefault(key, {"regions": [], "cost": cost, **call})["regions"].append(name)
    return list(jobs.values())


def settings(module: nn.Module) -> dict[str, bool | int | float | str]:
    """The plain Python values a region's code reads from itself and its submodules.

    Compiled code is specialised on them (a guard such as `self.output_scale_factor == 1.0`):
    two regions alike in class, parameters and inputs but set differently (SD's mid-block
    resnets keep the config's integer scale 1, the others a float 1.0) are two graphs, and a
    worker must compile both or the training process compiles the second itself."""
    found = {}
    for prefix, sub in module.named_modules():
        for name, value in vars(sub).items():
            if not name.startswith("_") and isinstance(value, bool | int | float | str):
                found[f"{prefix}.{name}" if prefix else name] = value
    return found


def _drop(_tensor) -> None:
    """A saved-tensor hook that keeps nothing (record_calls never runs a backward pass)."""
    return None


def share_out(jobs: list[dict], count: int) -> list[list[dict]]:
    """Jobs dealt to `count` workers, largest first to the least loaded (LPT scheduling)."""
    shares: list[list[dict]] = [[] for _ in range(count)]
    loads = [0] * count
    for job in sorted(jobs, key=lambda j: -j["cost"]):
        i = loads.index(min(loads))
        shares[i].append(job)
        loads[i] += job["cost"]
    return [share for share in shares if share]


def default_workers(jobs: int) -> int:
    """One worker per job, at most one per two CPU cores and MAX_WORKERS."""
    return max(1, min(jobs, MAX_WORKERS, (os.cpu_count() or 2) // 2))
