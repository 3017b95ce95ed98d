"""Compiling the UNet's blocks in parallel processes, so a first run does not wait minutes.

torch.compile works through the compiled regions (see speed.py) one after another in one
process: on an empty compile cache that is most of three minutes for SD 1.5, while every other
CPU core idles. PyTorch keeps what it compiled in an on-disk cache (Inductor's FX-graph cache and
AOTAutograd's cache), shared by every process of the user on the machine. So before the first
step:

1. `record_calls`: one forward pass of the UNet on random inputs of each bucket's shape records
   what each region receives (shapes, strides, dtypes, requires_grad, keyword values). No
   backward, so no gradient reaches the adapter; the training RNG is untouched.
2. Regions that would compile to the same graph (same class, same parameter shapes, same inputs)
   are grouped; `start_workers` shares the groups among worker processes (`python -m
   sdlora.train.precompile SPEC.json`). Each worker builds the UNet on the meta device, injects
   the same adapter, materialises only its blocks on the GPU, compiles them and runs each forward
   and backward once on random inputs: that compiles and stores the graphs.
3. The training process then compiles its regions as usual and finds every graph in the cache:
   before its first step (`--compile on`), or, with `--compile auto`, while its first steps run
   uncompiled, as soon as every worker is done (`Workers.ready`).

Values never matter to a compiled graph, only shapes and types, so random weights and inputs give
the very graphs the real run needs. A worker that fails costs nothing but time: the training
process compiles whatever is missing itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

MAX_WORKERS = 8  # each holds a CUDA context (~0.5 GiB) and its blocks; more gain little
WORKER_TIMEOUT_S = 900  # a worker still compiling after this is stopped; the trainer compiles
TENSOR = "__tensor__"  # marks a recorded tensor in the JSON job description


@dataclass(frozen=True)
class Adapter:
    """The trainable adapter as injected in the training process (see models.load_models)."""

    targets: tuple[str, ...]
    rank: int
    alpha: float | None
    nonlinearity: str
    dropout: float
    name: str
    conv_rank: int | None = None
    conv_alpha: float | None = None


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
    `inputs` (noisy latents, timesteps, conditioning) runs it as the training step does (prepared by accelerate: same autocast, same wrapper).
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


def done_marker(spec: dict) -> Path:
    """A file in PyTorch's compile-cache folder saying these exact graphs were compiled there.

    Its name hashes everything the graphs depend on (jobs, model, adapter, options, versions),
    so a second run with the same shapes skips the workers and finds the graphs in the cache.
    """
    import diffusers
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    what = json.dumps([spec, torch.__version__, diffusers.__version__], sort_keys=True)
    digest = hashlib.sha256(what.encode()).hexdigest()[:32]
    return Path(cache_dir()) / "sdlora-precompiled" / digest


class Workers:
    """Worker processes filling the compile cache (see `start_workers`); poll with `ready`,
    collect with `wait`, or end early with `stop`."""

    def __init__(self, procs: list, logs: list[Path], tmp, marker: Path, started: float):
        self.procs, self.logs, self.tmp, self.marker = procs, logs, tmp, marker
        self.started = started

    def ready(self) -> bool:
        """Every worker has exited (or overrun WORKER_TIMEOUT_S, and `wait` stops it)."""
        late = time.perf_counter() - self.started > WORKER_TIMEOUT_S
        return late or all(proc.poll() is not None for proc in self.procs)

    def wait(self) -> dict[str, float | int]:
        """Wait for every worker; return what happened: workers started, failed, seconds, and
        the first failure's last line as "error". Never raises for a worker's failure: the
        trainer compiles whatever is missing."""
        failed, why = 0, ""
        for i, (proc, log) in enumerate(zip(self.procs, self.logs, strict=True)):
            left = WORKER_TIMEOUT_S - (time.perf_counter() - self.started)
            try:
                proc.wait(timeout=max(left, 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
            logger.debug(
                "compile worker %d (exit code %s):\n%s", i, proc.returncode, "\n".join(lines)
            )
            if proc.returncode != 0:
                failed += 1
                why = why or (lines[-1] if lines else f"exit code {proc.returncode}")
        self._clean()
        if self.procs and not failed:
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.touch()
        seconds = time.perf_counter() - self.started if self.procs else 0.0
        done = {"workers": len(self.procs), "failed": failed, "seconds": seconds}
        return done | ({"error": why} if why else {})

    def stop(self) -> None:
        """End the workers now (the run ended first); what they compiled stays in the cache."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self._clean()

    def _clean(self) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None


def start_workers(
    unet: nn.Module,
    jobs: list[dict],
    adapter: Adapter,
    weight_dtype: torch.dtype,
    autocast_dtype: torch.dtype | None,
    compile_options: dict,
    gradient_checkpointing: bool = False,
    workers: int | None = None,
    activation_budget: float = 1.0,
) -> Workers:
    """Start worker processes that compile the jobs' graphs into the on-disk compile cache.

    gradient_checkpointing: the training UNet has it on (a region that checkpoints the blocks
    inside it, as SD 1.x's Transformer2DModel does, compiles to another graph); the workers
    switch it on in theirs. activation_budget: the training process's (speed.compile_regions).
    When a previous run compiled these very graphs, none starts.
    """
    device = next(unet.parameters()).device
    channels_last = unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    spec = {
        "unet_config": dict(unet.config),
        "adapter": adapter.__dict__,
        "weight_dtype": str(weight_dtype).removeprefix("torch."),
        "autocast_dtype": str(autocast_dtype).removeprefix("torch.") if autocast_dtype else None,
        "channels_last": channels_last,
        "gradient_checkpointing": gradient_checkpointing,
        "device": str(device),
        "compile": compile_options,
        "activation_budget": activation_budget,
        "sdp_order": [int(b) for b in torch._C._get_sdp_priority_order()],
    }
    marker = done_marker({**spec, "jobs": jobs})
    started = time.perf_counter()
    if marker.exists():
        return Workers([], [], None, marker, started)
    shares = share_out(jobs, workers or default_workers(len(jobs)))
    env = dict(os.environ)
    # the workers share the CPU: each gets its part of Inductor's kernel-compiling threads
    threads = max(1, (os.cpu_count() or 2) // len(shares))
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(threads))
    tmp = tempfile.TemporaryDirectory(prefix="sdlora-precompile-")
    procs, logs = [], []
    for i, share in enumerate(shares):
        path = Path(tmp.name) / f"job-{i}.json"
        path.write_text(json.dumps({**spec, "jobs": share, "started": time.time()}))
        log = Path(tmp.name) / f"job-{i}.log"  # a file, not a pipe: nobody reads it meanwhile
        cmd = [sys.executable, "-m", "sdlora.train.precompile", str(path)]
        with log.open("wb") as err:
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err))
        logs.append(log)
    return Workers(procs, logs, tmp, marker, started)


def fill_cache(*args, **kwargs) -> dict[str, float | int]:
    """`start_workers(...)`, then wait for them: what `Workers.wait` returns."""
    return start_workers(*args, **kwargs).wait()


def default_workers(jobs: int) -> int:
    """One worker per job, at most one per two CPU cores and MAX_WORKERS."""
    return max(1, min(jobs, MAX_WORKERS, (os.cpu_count() or 2) // 2))


def main(spec_path: str) -> None:
    """A worker: compile and run once each job of the spec file (see `start_workers`)."""
    from diffusers import UNet2DConditionModel
    from sdlora.train.speed import set_activation_budget

    from sdlora.inject import add_trainable

    spec = json.loads(Path(spec_path).read_text())
    started = spec.get("started", time.time())  # when the training process started this one
    set_activation_budget(spec["activation_budget"])
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch._C._set_sdp_priority_order(spec["sdp_order"])
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(spec["unet_config"])
    unet.requires_grad_(False)
    unet.to(dtype=getattr(torch, spec["weight_dtype"]))
    if spec["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    adapter = dict(spec["adapter"])
    add_trainable(unet, "unet", tuple(adapter.pop("targets")), **adapter)
    unet.train()
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, 4 * len(spec["jobs"]))
    autocast = spec["autocast_dtype"]
    _progress(started, "ready to compile (Python, imports, CUDA, the UNet on the meta device)")
    for job in spec["jobs"]:
        block = unet.get_submodule(job["regions"][0])
        block.to_empty(device=device)
        if spec["channels_last"]:
            block.to(memory_format=torch.channels_last)
        block.compile(**spec["compile"])
        args, kwargs = rebuild(job["args"], device), rebuild(job["kwargs"], device)
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        dtype = getattr(torch, autocast) if autocast else torch.bfloat16
        with torch.autocast(device.type, dtype=dtype, enabled=autocast is not None):
            out = block(*args, **kwargs)
        out = next(t for t in _tensors(out))
        if out.requires_grad:
            out.float().sum().backward()
        _progress(started, f"compiled {job['regions'][0]} (and {len(job['regions']) - 1} alike)")


def _progress(started: float, what: str) -> None:
    """A line of the worker's log (the trainer's debug log shows it): seconds since the
    training process started this worker, and what is done."""
    print(f"{time.time() - started:7.1f} s  {what}", file=sys.stderr, flush=True)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _tensors(v)
    elif hasattr(value, "to_tuple"):
        yield from _tensors(value.to_tuple())


if __name__ == "__main__":
    main(sys.argv[1])
