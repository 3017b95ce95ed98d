"""Compiling in worker processes (train/precompile.py, compile_worker.py): what is recorded
(compile_plan.py), and a worker's run.

On the CPU the workers use the "eager" backend (it only traces), so this checks the workers
rebuild every region and run it with the recorded inputs, and that `--compile auto` switches
from uncompiled steps to compiled regions when they are done; that the graphs they compile are
the training process's own (cache hits) is measured on the GPU (benchmarks/first_run.py).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdlora.bases.base import load_base
from sdlora.io.formats import load_adapter
from sdlora.lora.inject import UNET_TARGETS, add_trainable, target_names
from sdlora.train import TrainConfig, compile_plan, compiling, precompile, speed, train
from sdlora.train.speed import DEEP_REGIONS, REGIONS, regions_of


def _unet_with_adapter(base="tiny"):
    unet = load_base(base).unet
    targets = target_names("attn", UNET_TARGETS)
    add_trainable(unet, "unet", targets, rank=4, nonlinearity="relu", name="training")
    adapter = compile_plan.AdapterSettings(
        targets=tuple(targets),
        rank=4,
        alpha=None,
        nonlinearity="relu",
        dropout=0.0,
        name="training",
    )
    return unet.train(), adapter


def test_recorded_calls_cover_every_region_once_and_leave_no_gradient():
    unet, _ = _unet_with_adapter()
    shapes = [(2, 8), (1, 8), (2, 16)]  # (batch, latent side): two batch sizes, two buckets
    inputs = [
        (torch.randn(b, 4, s, s), torch.randint(0, 1000, (b,)), torch.randn(b, 77, 32))
        for b, s in shapes
    ]
    kept = []  # what autograd would keep for a backward pass: nothing, the pass never runs one
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()), lambda t: t):
        jobs = compile_plan.record_calls(unet, lambda *a: unet(*a).sample, inputs, REGIONS)
    assert kept == []
    names = compile_plan.region_names(unet, REGIONS)
    # autograd ran: past the first adapter layer the regions' inputs need gradients
    hidden = [job["args"][0] for job in jobs]
    assert any(h["requires_grad"] for h in hidden) and not all(h["requires_grad"] for h in hidden)
    covered = [name for job in jobs for name in job["regions"]]
    # each region once per input shape; regions with the same parameters and inputs share a job
    assert sorted(covered) == sorted(names * len(shapes))
    assert len(jobs) < len(covered)
    first = jobs[0]["args"][0]
    assert first["__tensor__"] and len(first["shape"]) == 4
    assert all(p.grad is None for p in unet.parameters())  # forward only


def test_sdxl_compiles_attention_blocks_not_ten_block_transformers():
    assert regions_of(load_base("tiny").unet) == REGIONS
    assert regions_of(load_base("tiny-v2").unet) == REGIONS
    unet = load_base("tiny-xl").unet  # its last level holds 2 attention blocks per transformer
    assert regions_of(unet) == DEEP_REGIONS
    blocks = compile_plan.region_names(unet, DEEP_REGIONS)
    assert sum(".transformer_blocks." in name for name in blocks) == sum(
        len(m.transformer_blocks) for m in unet.modules() if hasattr(m, "transformer_blocks")
    )


@pytest.mark.parametrize("base", ["tiny", "tiny-xl"])
def test_one_job_for_each_graph_the_training_process_compiles(monkeypatch, base):
    # a graph with no job is compiled by the training process itself, at the switch: on SDXL
    # the mid-block resnets (an integer output scale where the others have a float) cost 4.5 s
    unet, _ = _unet_with_adapter(base)
    kwargs = {}
    if base == "tiny-xl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 48),
            "time_ids": torch.randn(2, 6),
        }
    context = 80 if base == "tiny-xl" else 32
    inputs = [(torch.randn(2, 4, 8, 8), torch.randint(0, 1000, (2,)), torch.randn(2, 77, context))]

    def call(*args):
        return unet(*args, **kwargs).sample

    jobs = compile_plan.record_calls(unet, call, inputs, regions_of(unet))
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(speed, "COMPILE_BACKEND", counting)
    torch._dynamo.reset()
    try:
        speed.compile_regions(unet, torch.device("cpu"), 1, cuda_graphs=False)
        call(*inputs[0])
    finally:
        torch._dynamo.reset()
    assert len(graphs) == len(jobs)


@pytest.mark.parametrize(
    ("base", "checkpointing", "context"),
    [("tiny", False, 32), ("tiny", True, 32), ("tiny-xl", True, 80)],
)
def test_a_worker_rebuilds_and_runs_every_recorded_region(
    tmp_path, monkeypatch, caplog, base, checkpointing, context
):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # PyTorch's compile cache
    unet, adapter = _unet_with_adapter(base)
    regions = regions_of(unet)
    if checkpointing:  # blocks then run inside checkpoint wrappers; the worker does the same
        unet.enable_gradient_checkpointing()
    x = torch.randn(2, 4, 8, 8)
    kwargs = {}
    if base == "tiny-xl":
        pooled, ids = torch.randn(2, 48), torch.randn(2, 6)  # 48 + 6 ids × 8 = its 96 inputs
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": ids}

    def call(*args):
        return unet(*args, **kwargs).sample

    inputs = [(x, torch.randint(0, 1000, (2,)), torch.randn(2, 77, context))]
    jobs = compile_plan.record_calls(unet, call, inputs, regions)
    assert sorted(n for job in jobs for n in job["regions"]) == sorted(
        compile_plan.region_names(unet, regions)
    )
    spec = _spec(adapter)  # an fp32 run, tracing-only backend
    fill = precompile.fill_cache
    with caplog.at_level(logging.DEBUG, logger="sdlora.train.precompile"):
        done = fill(unet, jobs, workers=1, gradient_checkpointing=checkpointing, **spec)
    assert done == {"workers": 1, "failed": 0, "seconds": done["seconds"]}
    # the worker's log, in the debug log: when it was ready, and when each job was compiled
    assert re.search(r"\d+\.\d s  ready to compile", caplog.text)
    for job in jobs:
        alike = len(job["regions"]) - 1
        assert f" s  compiled {job['regions'][0]} (and {alike} alike)" in caplog.text
    # the same graphs again (a second run): the cache has them, no worker starts
    again = fill(unet, jobs, workers=1, gradient_checkpointing=checkpointing, **spec)
    assert again == {"workers": 0, "failed": 0, "seconds": 0.0}
    assert len(list((tmp_path / "sdlora-precompiled").iterdir())) == 1


def test_a_worker_starts_without_diffusers_pipelines_nor_transformers():
    """The worker's module (and the package it is in) imports what a job needs, no more: it
    starts in every worker while the training process waits for their graphs."""
    code = (
        "import sys, sdlora.train.precompile, sdlora.train.compile_worker; "
        "print(sorted(set(sys.modules) & {LOADED}))"
    )
    loaded = {"diffusers", "diffusers.pipelines", "transformers", "accelerate"}
    found = subprocess.run(
        [sys.executable, "-c", code.replace("{LOADED}", repr(loaded))],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert found.stdout.strip() == "[]"


def test_workers_get_the_largest_jobs_first_and_even_loads():
    jobs = [{"cost": c, "name": n} for n, c in zip("abcdef", [1, 9, 3, 5, 1, 4], strict=True)]
    shares = compile_plan.share_out(jobs, 3)
    loads = sorted(sum(j["cost"] for j in share) for share in shares)
    assert loads == [7, 7, 9]  # 9 | 5+1+1 | 4+3: largest first, each to the least loaded
    assert compile_plan.share_out(jobs[:2], 5) == [[jobs[1]], [jobs[0]]]  # no empty workers


def _two_jobs():
    unet, adapter = _unet_with_adapter()
    inputs = [(torch.randn(1, 4, 8, 8), torch.randint(0, 1000, (1,)), torch.randn(1, 77, 32))]
    jobs = compile_plan.record_calls(unet, lambda *a: unet(*a).sample, inputs, REGIONS)
    return unet, adapter, jobs[:2]


OPTIONS = dict(dynamic=False, backend="eager", mode=None)


def _spec(adapter) -> dict:
    """What start_workers needs besides the UNet and jobs: an fp32 run, tracing-only backend."""
    return dict(
        adapter=adapter, weight_dtype=torch.float32, autocast_dtype=None, compile_options=OPTIONS
    )


def test_workers_fork_from_a_server_started_earlier_and_report_each_failure(
    tmp_path, monkeypatch, caplog
):
    """The fork server imports while the base loads; each job file becomes a forked worker.
    A worker that fails is reported with its error's last line; the others still compile."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    server = precompile.start_server()
    unet, adapter, jobs = _two_jobs()
    jobs[1] = {**jobs[1], "regions": ["no_such_block"]}
    with caplog.at_level(logging.DEBUG, logger="sdlora.train.precompile"):
        workers = precompile.start_workers(unet, jobs, **_spec(adapter), workers=2, server=server)
        assert workers.forked and workers.count == 2 and server.proc is None  # taken
        done = workers.wait()
    assert done["workers"] == 2 and done["failed"] == 1
    assert "no_such_block" in done["error"]
    assert f"compiled {jobs[0]['regions'][0]} (and" in caplog.text  # the other one's work
    assert not workers.marker.exists()  # not every graph is in the cache


def test_a_server_nobody_needs_ends_and_leaves_no_folder():
    server = precompile.start_server()
    proc, folder = server.proc, Path(server.tmp.name)
    server.close()
    assert proc.returncode is not None and not folder.exists()
    server.close()  # twice: nothing more to do


def test_without_fork_each_worker_is_a_python_process_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(precompile, "can_fork", lambda: False)  # as on Windows
    unet, adapter, jobs = _two_jobs()
    workers = precompile.start_workers(unet, jobs, **_spec(adapter), workers=2)
    assert not workers.forked and len(workers.procs) == 2
    done = workers.wait()
    assert done == {"workers": 2, "failed": 0, "seconds": done["seconds"]}
    assert workers.marker.exists()


def test_stopped_workers_leave_no_process_nor_folder_nor_done_marker(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    unet, adapter = _unet_with_adapter()
    inputs = [(torch.randn(2, 4, 8, 8), torch.randint(0, 1000, (2,)), torch.randn(2, 77, 32))]
    jobs = compile_plan.record_calls(unet, lambda *a: unet(*a).sample, inputs, REGIONS)
    workers = precompile.start_workers(unet, jobs, **_spec(adapter), workers=2)
    folder = Path(workers.tmp.name)
    workers.stop()  # the run ended first
    assert all(proc.returncode is not None for proc in workers.procs)
    assert not folder.exists() and not workers.marker.exists()


def test_auto_trains_uncompiled_until_the_workers_are_done_then_switches(
    tmp_path, monkeypatch, caplog
):
    """--compile auto on a GPU: the first steps run while the workers compile; the regions are
    compiled once they are done. Here on the CPU with the tracing-only backend: the switch
    happens and the adapter is the one an uncompiled run writes."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (40 * i, 200 - 30 * i, 90)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a picture {i}", encoding="utf-8")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(speed, "COMPILE_BACKEND", "eager")
    monkeypatch.setattr(compile_plan, "will_compile", lambda *args, **kwargs: True)
    monkeypatch.setattr(compile_plan, "use_compile_workers", lambda *args: True)
    # the first poll waits for the workers: the switch then follows step 1 on any machine
    monkeypatch.setattr(
        precompile.Workers, "ready", lambda self: all(p.wait() >= 0 for p in self.procs)
    )
    config = TrainConfig(
        data_dir=str(data), base="tiny", output=str(tmp_path / "auto"), resolution=64,
        batch_size=2, steps=3, lr=1e-2, save_every=0, tensorboard=False, workers=0, seed=3,
        compile="auto",
    )  # fmt: skip
    inductor = torch._inductor.config
    monkeypatch.setattr(inductor, "compile_threads", 4)  # as on a 4-core machine; restored after
    with caplog.at_level(logging.INFO, logger="sdlora"):
        compiled = load_adapter(train(config))
    assert "the first steps run uncompiled" in caplog.text
    assert inductor.compile_threads == 1  # the worker compiled it all: no kernel compiling
    assert re.search(
        r"compiled from step 2 on: compile workers \d+ graphs in 1 processes", caplog.text
    )
    off = replace(config, output=str(tmp_path / "off"), compile="off")
    eager = load_adapter(train(off))
    for key, module in eager.modules.items():
        torch.testing.assert_close(compiled.modules[key].up, module.up, rtol=0, atol=1e-6)
        torch.testing.assert_close(compiled.modules[key].down, module.down, rtol=0, atol=1e-6)

    # a 24 GiB GPU: the workers compile before the first step instead (no room beside steps)
    monkeypatch.setattr(compiling, "gpu_memory_gib", lambda device: 24.0)
    caplog.clear()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache-2"))  # workers run again
    small = replace(config, output=str(tmp_path / "small"))
    with caplog.at_level(logging.INFO, logger="sdlora"):
        train(small)
    assert "the first steps run uncompiled" not in caplog.text
    assert re.search(r"speed: .*compile workers \d+ graphs in 1 processes", caplog.text)
    assert "compiled from step" not in caplog.text


def _saved_bytes(block, x, context) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(bytes the forward pass keeps for the backward, output, input gradient)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    x = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x, encoder_hidden_states=context)
    out.square().sum().backward()
    return sum(saved), out.detach(), x.grad


def test_activation_budget_recomputes_inside_the_compiled_block(monkeypatch):
    """A lower budget keeps fewer bytes for the backward pass, same output and gradients.

    The block goes through AOTAutograd with the partitioner Inductor uses (min-cut), without
    Inductor's code generation, so this runs in seconds on the CPU."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    def nop(graph, example_inputs):
        return make_boxed_func(graph)

    backend = aot_autograd(
        fw_compiler=nop, bw_compiler=nop, partition_fn=min_cut_rematerialization_partition
    )
    unet = load_base("tiny").unet
    block = next(m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock")
    add_trainable(block, "unet", ("to_q", "to_k", "to_v", "to_out.0"), rank=4, name="training")
    x, context = torch.randn(2, 64, 32), torch.randn(2, 77, 32)
    results = {}
    for budget in (1.0, 0.0):
        torch._dynamo.reset()
        speed.set_activation_budget(budget)
        compiled = torch.compile(block, backend=backend, dynamic=False)
        results[budget] = _saved_bytes(compiled, x, context)
    speed.set_activation_budget(1.0)
    torch._dynamo.reset()
    (kept, out, grad), (kept_low, out_low, grad_low) = results[1.0], results[0.0]
    assert kept_low < 0.8 * kept
    torch.testing.assert_close(out_low, out, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_low, grad, rtol=0, atol=1e-6)


def test_blocks_start_no_kernel_compiling_processes_when_the_workers_compiled_them(
    monkeypatch,
):
    """With every graph in the cache the blocks only load them: Inductor's kernel-compiling
    processes are not started. Without the workers the usual number compiles."""
    unet, _ = _unet_with_adapter()
    inductor = torch._inductor.config
    monkeypatch.setattr(inductor, "compile_threads", inductor.compile_threads)  # restored after
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "3")  # what PyTorch would choose
    cpu = torch.device("cpu")
    try:
        speed.compile_regions(unet, cpu, 1, cuda_graphs=False, cached=True)
        assert inductor.compile_threads == 1
        speed.compile_regions(unet, cpu, 1, cuda_graphs=False)
        assert inductor.compile_threads == 3
    finally:
        torch._dynamo.reset()


def test_workers_compile_again_for_another_activation_budget(tmp_path, monkeypatch):
    """The budget is part of what the done-marker names: another budget partitions each block
    into other graphs, so a run with it finds no marker and its workers compile."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    unet, adapter = _unet_with_adapter()
    inputs = [(torch.randn(1, 4, 8, 8), torch.randint(0, 1000, (1,)), torch.randn(1, 77, 32))]
    jobs = compile_plan.record_calls(unet, lambda *a: unet(*a).sample, inputs, REGIONS)
    markers = []
    for budget in (1.0, 0.5, 1.0):
        workers = precompile.start_workers(
            unet, jobs, **_spec(adapter), workers=1, activation_budget=budget
        )
        markers.append(workers.marker)
        workers.stop()
    assert markers[0] != markers[1] and markers[0] == markers[2]


def test_auto_compiles_sdxl_from_fewer_steps_than_sd1():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    will_compile = compile_plan.will_compile
    assert will_compile("auto", cuda, 300, 1, family="sdxl")  # paid back from ~200 steps
    assert not will_compile("auto", cuda, 300, 1, family="sd1")  # from 600
    assert not will_compile("auto", cuda, 300, 2, family="sdxl")  # per bucket
    assert will_compile("auto", cuda, 600, 1, family="sd2")
    assert not will_compile("auto", cpu, 10_000, 1, family="sdxl")
    assert will_compile("on", cpu, 1, 1) and not will_compile("off", cuda, 10_000, 1)


def test_the_fork_server_asks_nvml_not_the_cuda_runtime_whether_there_is_a_gpu():
    """Asking the CUDA runtime (diffusers' import does) would leave forked workers unable to
    start CUDA: the server runs with PyTorch's NVML-based check."""
    server = precompile.start_server()
    try:
        proc = Path(f"/proc/{server.proc.pid}")
        for _ in range(200):  # until the new Python runs (a fork not yet past exec reads empty)
            if b"sdlora.train.precompile" in (proc / "cmdline").read_bytes():
                break
            time.sleep(0.05)
        environ = (proc / "environ").read_bytes().split(b"\0")
        assert b"PYTORCH_NVML_BASED_CUDA_CHECK=1" in environ
    finally:
        server.close()


def test_a_fork_server_starts_only_where_a_run_may_compile_on_a_gpu(monkeypatch):
    assert precompile.start_server_for("auto") is None  # this machine has no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert precompile.start_server_for("off") is None
    monkeypatch.setenv("SDLORA_COMPILE_WORKERS", "0")
    assert precompile.start_server_for("on") is None
    monkeypatch.delenv("SDLORA_COMPILE_WORKERS")
    monkeypatch.setattr(precompile, "can_fork", lambda: False)  # as on Windows
    assert precompile.start_server_for("auto") is None
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    server = precompile.start_server_for("auto")
    assert isinstance(server, precompile.Server)
    server.close()
    assert server.proc is None


def test_the_command_closes_the_fork_server_it_started_when_the_run_fails(
    tmp_path, monkeypatch, capsys
):
    """`sdlora train` starts the server before its heavy imports; a run that stops at a user
    mistake ends it too."""
    from sdlora.train import command

    class Server:
        closed = 0

        def close(self):
            Server.closed += 1

    asked = []
    monkeypatch.setattr(command, "start_server_for", lambda mode: asked.append(mode) or Server())
    out = str(tmp_path / "out")
    code = command.main(["train", str(tmp_path / "no_such_folder"), "-o", out, "--compile", "on"])
    assert code == 2 and "no_such_folder" in capsys.readouterr().err
    assert asked == ["on"] and Server.closed == 1


def test_the_base_loads_on_fewer_threads_beside_the_fork_server():
    """A many-threaded load waits for its slowest thread: beside the server's imports it runs
    on two fewer, and gets them all back after (an error included)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(6)
        with compiling.fewer_threads(compiling.SERVER_CORES):
            assert torch.get_num_threads() == 4
        assert torch.get_num_threads() == 6
        with pytest.raises(RuntimeError), compiling.fewer_threads(9):
            assert torch.get_num_threads() == 1  # never none
            raise RuntimeError
        assert torch.get_num_threads() == 6
    finally:
        torch.set_num_threads(threads)


def test_a_worker_forked_where_cuda_cannot_start_runs_as_a_new_process(tmp_path, monkeypatch):
    """Should the server's imports ever start CUDA, its forks could not: each then replaces
    itself with a Python of its own (the spec's environment) and compiles there."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(precompile, "can_fork", lambda: False)
    started = []  # the spec files a worker process would have been started with

    class NotStarted:
        returncode = 0

        def poll(self):
            return 0

    def popen(cmd, **kwargs):
        started.append(cmd[-1])
        return NotStarted()

    monkeypatch.setattr(precompile.subprocess, "Popen", popen)
    unet, adapter, jobs = _two_jobs()
    workers = precompile.start_workers(unet, jobs[:1], **_spec(adapter), workers=1)
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True)  # the fork inherits it
    monkeypatch.setattr(sys, "stderr", sys.__stderr__)  # file 2, as in the server (not pytest's)
    spec, log = started[0], workers.logs[0]
    _, status = os.waitpid(precompile._fork(spec, str(log)), 0)
    text = log.read_text()
    workers.stop()
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "forked after CUDA started: running as a new process" in text
    assert f"compiled {jobs[0]['regions'][0]} (and" in text
