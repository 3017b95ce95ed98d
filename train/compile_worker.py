"""A compile worker: compile and run once each job of a spec file, filling PyTorch's compile cache.

`python -m sdlora.train.compile_worker SPEC.json`, or `main(SPEC.json)` in a process forked from
the fork server (precompile.py writes the spec and starts the worker). The worker builds the
UNet on the meta device, injects the same adapter as the training process, materialises only the
blocks of its jobs on the device, compiles them and runs each forward and backward once on random
inputs of the recorded shapes (compile_plan.rebuild): that compiles and stores the graphs.

It imports what a job needs and no more (no diffusers pipelines, transformers nor accelerate): it
starts while the training process waits for its graphs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from sdlora.train.compile_plan import rebuild


def main(spec_path: str) -> None:
    """A worker: compile and run once each job of the spec file (see precompile.start_workers)."""
    from diffusers import UNet2DConditionModel

    from sdlora.lora.fp8 import store_in_fp8
    from sdlora.lora.inject import add_trainable
    from sdlora.train.speed import set_activation_budget

    spec = json.loads(Path(spec_path).read_text())
    started = spec.get("started", time.time())  # when the training process started this one
    os.environ.clear()  # the training process's, as it was when the jobs were handed out
    os.environ.update(spec["env"])
    inductor = torch._inductor.config
    inductor.compile_threads = int(os.environ["TORCHINDUCTOR_COMPILE_THREADS"])
    # its kernel-compiling processes forked from it, with PyTorch and Triton imported, rather
    # than new Pythons importing them again (eight workers' at once: 8-13 s on a 16-core GPU box)
    inductor.worker_start_method = os.environ.get("TORCHINDUCTOR_WORKER_START", "fork")
    set_activation_budget(spec["activation_budget"])
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch._C._set_sdp_priority_order(spec["sdp_order"])
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(spec["unet_config"])
    unet.requires_grad_(False)
    unet.to(dtype=getattr(torch, spec["weight_dtype"]))
    if spec.get("base_precision") == "fp8":
        store_in_fp8(unet)  # on the meta device: the same classes and dtypes, no values
    if spec["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    adapter = dict(spec["adapter"])
    add_trainable(unet, "unet", tuple(adapter.pop("targets")), **adapter)
    unet.train()
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, 4 * len(spec["jobs"]))
    autocast = spec["autocast_dtype"]
    progress(started, "ready to compile (Python, imports, CUDA, the UNet on the meta device)")
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
        progress(started, f"compiled {job['regions'][0]} (and {len(job['regions']) - 1} alike)")


def progress(started: float, what: str) -> None:
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
    main(sys.argv[1])  # a worker of its own (no fork server, see precompile.can_fork)
