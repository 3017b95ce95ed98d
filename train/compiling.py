"""Whether and how a run compiles its UNet: the one door the trainer goes through.

`compile_choice(...)` answers "compile or not, and how" (a compile_plan.CompilePlan, from the
settings, the device, the run's length and what this machine allows). `start_compiling(...)`
carries the plan out once the models are prepared: compile workers (precompile.py) fill the
compile cache, then the UNet's regions compile (speed.compile_regions) before the first step, or,
with `--compile auto` on a big GPU, while the first steps run uncompiled (`Compiling`, which the
loop polls and switches). `beside_server` keeps the base's load off the cores of the workers'
fork server while it imports. Processes, forks and NVML stay behind this door.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sdlora.lora.inject import UNET_TARGETS, target_names
from sdlora.train import precompile
from sdlora.train.compile_plan import (
    AdapterSettings,
    CompilePlan,
    batch_shapes,
    plan_compile,
    record_calls,
)
from sdlora.train.condition import Conditioning
from sdlora.train.config import TrainConfig
from sdlora.train.data import BatchPlan
from sdlora.train.speed import compile_options, compile_regions, regions_of

SERVER_CORES = 2  # CPU threads the fork server's imports may keep busy (one, and a spare)


def compile_choice(
    config: TrainConfig, device: torch.device, *, steps: int, buckets: int, family: str | None
) -> CompilePlan:
    """Compile the UNet or not, and how, for a run of `steps` optimizer steps over `buckets`
    buckets on `device` with a base of `family` (compile_plan.plan_compile, with this machine's
    facts: whether compile workers are allowed, the GPU's memory)."""
    return plan_compile(
        config,
        device,
        steps=steps,
        buckets=buckets,
        family=family,
        workers_wanted=precompile.workers_wanted(),
        gpu_gib=gpu_memory_gib(device),
    )


def gpu_memory_gib(device: torch.device) -> float | None:
    """The GPU's total memory in GiB; None for a device that is not a GPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / 2**30


@contextmanager
def fewer_threads(spare: int):
    """PyTorch's CPU work in the block on `spare` fewer threads. Another busy process of ours
    costs a many-threaded load or cast far more than its cores' share: every parallel part waits
    for its slowest thread (SDXL's load and cast took 19 s instead of 8 beside the fork server's
    imports on a 16-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - spare))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def beside_server(server: precompile.Server | None):
    """The block on fewer threads while the compile workers' fork server (if any) may still be
    importing: it is left SERVER_CORES (see fewer_threads)."""
    return fewer_threads(SERVER_CORES if server is not None else 0)


@dataclass
class Compiling:
    """Compile workers at work while the first steps run uncompiled (`--compile auto`): once
    they are `ready`, `switch` compiles the UNet's regions, which then find every graph in the
    compile cache, and says how it went."""

    workers: precompile.Workers
    graphs: int  # distinct graphs the workers compile
    compile: Callable[[bool], str]  # compiles the regions (at their next call); cached?

    def ready(self) -> bool:
        return self.workers.ready()

    def switch(self) -> str:
        done = self.workers.wait()
        if torch.cuda.is_available():  # what the uncompiled steps held goes back to the GPU: the
            torch.cuda.empty_cache()  # CUDA graphs' memory pools come on top of that cache
        compiled = self.compile(not done["failed"])  # all in the cache: nothing to compile
        return f"compile workers {workers_summary(done, self.graphs)}, {compiled}"

    def stop(self) -> None:
        self.workers.stop()


def start_compiling(
    choice: CompilePlan,
    *,
    config: TrainConfig,
    pipe,
    unet: torch.nn.Module,
    accelerator,
    plan: BatchPlan,
    lora_args: dict,
    weight_dtype: torch.dtype,
    server: precompile.Server | None = None,
) -> tuple[Compiling | None, dict[str, str]]:
    """Compile `pipe.unet`'s regions as `choice` says; `unet` is the UNet as accelerate prepared
    it, `lora_args` the adapter's (inject.add_trainable), `server` the workers' fork server.

    Returns (the workers still at work while the first steps run uncompiled, else None; what was
    done, for the speed line of the log)."""
    if not choice.compile:
        return None, {}
    device = accelerator.device
    buckets = len(plan.by_bucket)

    def compile_now(cached: bool) -> str:
        return compile_regions(
            pipe.unet,
            device,
            buckets,
            cuda_graphs=choice.cuda_graphs,
            activation_budget=choice.activation_budget,
            cached=cached,
        )

    workers = None
    if choice.workers:
        workers, graph_count = start_compile_workers(
            choice,
            config=config,
            pipe=pipe,
            unet=unet,
            accelerator=accelerator,
            plan=plan,
            lora_args=lora_args,
            weight_dtype=weight_dtype,
            server=server,
        )
    if workers is not None and workers.count and choice.background:
        said = (
            f"{graph_count} graphs in {workers.count} processes, in the background: "
            "the first steps run uncompiled"
        )
        return Compiling(workers, graph_count, compile_now), {"compile": said}
    done = workers.wait() if workers is not None else None
    said = {}
    if done is not None:
        said["compile workers"] = workers_summary(done, graph_count)
    said["compile"] = compile_now(cached=done is not None and not done["failed"])
    return None, said


def start_compile_workers(
    choice: CompilePlan,
    *,
    config: TrainConfig,
    pipe,
    unet: torch.nn.Module,
    accelerator,
    plan: BatchPlan,
    lora_args: dict,
    weight_dtype: torch.dtype,
    server: precompile.Server | None = None,
) -> tuple[precompile.Workers, int]:
    """Worker processes (forked from `server`, if any) compiling the UNet's regions for every
    batch shape; (them, graph count)."""
    device = accelerator.device
    bare = accelerator.unwrap_model(unet)
    inputs = example_inputs(
        pipe, bare, plan, weight_dtype=weight_dtype, text_learns=config.text_learns, device=device
    )

    def call_unet(noisy, timesteps, kwargs):  # as the prepared UNet runs, without its wrapper
        with accelerator.autocast():
            return bare(noisy, timesteps, **kwargs).sample

    jobs = record_calls(bare, call_unet, inputs, regions_of(bare))
    shape_args = {k: v for k, v in lora_args.items() if k != "generator"}  # values don't matter
    targets = tuple(target_names(config.targets, UNET_TARGETS))
    workers = precompile.start_workers(
        bare,
        jobs,
        adapter=AdapterSettings(targets=targets, **shape_args),
        weight_dtype=weight_dtype,
        autocast_dtype=weight_dtype if weight_dtype != torch.float32 else None,
        compile_options=compile_options(device, choice.cuda_graphs),
        gradient_checkpointing=config.gradient_checkpointing,
        activation_budget=config.activation_budget,
        server=server,
        workers=config.compile_workers or None,  # None: one per graph, at most 8
        base_precision=config.base_precision,
    )
    return workers, len(jobs)


def example_inputs(
    pipe,
    bare: torch.nn.Module,
    plan: BatchPlan,
    *,
    weight_dtype: torch.dtype,
    text_learns: bool,
    device: torch.device,
) -> list[tuple]:
    """(noisy latents, timesteps, UNet keyword arguments) on random values for every batch shape
    of the plan, as a training step hands them to the UNet."""
    channels_last = bare.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    factor = pipe.vae_scale_factor
    conditioning = Conditioning.of(pipe)
    with torch.no_grad():  # real text embeddings have the shapes and dtype a step sees
        text = conditioning.encode([""], device)
    generator = torch.Generator(device).manual_seed(0)  # its own: the training RNG is untouched
    inputs = []
    for batch, w, h in batch_shapes(plan):
        latent = (batch, bare.config.in_channels, h // factor, w // factor)
        noisy = torch.randn(latent, generator=generator, device=device)
        timesteps = torch.randint(0, 1000, (batch,), generator=generator, device=device)
        sizes = torch.tensor([[h, w]] * batch)
        crops = torch.zeros((batch, 2), dtype=torch.long)
        kwargs = conditioning.unet_kwargs(
            text.expand(batch), weight_dtype, sizes=sizes, crops=crops, target=(h, w)
        )
        hidden = kwargs["encoder_hidden_states"].clone()
        kwargs["encoder_hidden_states"] = hidden.requires_grad_(text_learns)
        inputs.append((noisy.to(weight_dtype, memory_format=layout), timesteps, kwargs))
    return inputs


def workers_summary(done: dict, graphs: int) -> str:
    """What the compile workers did, in a few words."""
    if not done["workers"]:
        return f"{graphs} graphs already in the compile cache"
    failed = f", {done['failed']} failed ({done['error']})" if done["failed"] else ""
    return f"{graphs} graphs in {done['workers']} processes, {done['seconds']:.0f} s{failed}"
