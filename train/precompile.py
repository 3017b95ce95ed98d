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
   are grouped; `start_workers` shares the groups among worker processes: forks of a server
   that imported PyTorch, diffusers and the compiler early (`start_server`), or, where processes
   do not fork, `python -m sdlora.train.precompile SPEC.json`. Each worker builds the UNet on
   the meta device, injects the same adapter, materialises only its blocks on the GPU, compiles
   them and runs each forward and backward once on random inputs: that compiles and stores the
   graphs.
3. The training process then compiles its regions as usual and finds every graph in the cache:
   before its first step (`--compile on`), or, with `--compile auto`, while its first steps run
   uncompiled, as soon as every worker is done (`Workers.ready`).

Values never matter to a compiled graph, only shapes and types, so random weights and inputs give
the very graphs the real run needs. A worker that fails costs nothing but time: the training
process compiles whatever is missing itself.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
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
    collect with `wait`, or end early with `stop`.

    procs: the workers; or, when `forked`, the one fork server whose children they are (it
    exits once they all have, and writes each one's exit code beside its log)."""

    def __init__(
        self, procs: list, logs: list[Path], tmp, marker: Path, started: float, forked=False
    ):
        self.procs, self.logs, self.tmp, self.marker = procs, logs, tmp, marker
        self.started, self.forked = started, forked

    @property
    def count(self) -> int:
        return len(self.logs)

    def ready(self) -> bool:
        """Every worker has exited (or overrun WORKER_TIMEOUT_S, and `wait` stops it)."""
        late = time.perf_counter() - self.started > WORKER_TIMEOUT_S
        return late or all(proc.poll() is not None for proc in self.procs)

    def wait(self) -> dict[str, float | int]:
        """Wait for every worker; return what happened: workers started, failed, seconds, and
        the first failure's last line as "error". Never raises for a worker's failure: the
        trainer compiles whatever is missing."""
        for proc in self.procs:
            left = WORKER_TIMEOUT_S - (time.perf_counter() - self.started)
            try:
                proc.wait(timeout=max(left, 0.1))
            except subprocess.TimeoutExpired:
                self._kill(proc)
        failed, why = 0, ""
        for i, log in enumerate(self.logs):
            code = self._exit_code(i)
            lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
            logger.debug("compile worker %d (exit code %s):\n%s", i, code, "\n".join(lines))
            if code != 0:
                failed += 1
                why = why or (lines[-1] if lines else self._no_log_why(code))
        self._clean()
        if self.count and not failed:
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.touch()
        seconds = time.perf_counter() - self.started if self.count else 0.0
        done = {"workers": self.count, "failed": failed, "seconds": seconds}
        return done | ({"error": why} if why else {})

    def stop(self) -> None:
        """End the workers now (the run ended first); what they compiled stays in the cache."""
        for proc in self.procs:
            if proc.poll() is None:
                self._kill(proc)
        self._clean()

    def _kill(self, proc) -> None:
        if self.forked:  # the server leads a process group of its own: it and its workers
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait()

    def _exit_code(self, i: int) -> int | None:
        if not self.forked:
            return self.procs[i].returncode
        written = Path(f"{self.logs[i]}.exit")
        return int(written.read_text()) if written.exists() else None

    def _no_log_why(self, code: int | None) -> str:
        if code is not None:
            return f"exit code {code}"
        server_log = Path(self.tmp.name) / SERVER_LOG if self.tmp is not None else None
        lines = server_log.read_text(errors="replace").strip().splitlines() if server_log else []
        return lines[-1] if lines else "stopped before it started"

    def _clean(self) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None


# What the fork server imports once (see `start_server`): each worker forked from it starts
# with them. None starts CUDA, and the server asks NVML, not the CUDA runtime, whether there is
# a GPU: either would leave its forks unable to start CUDA.
SERVER_IMPORTS = (
    "sdlora.train.speed",
    "sdlora.lora.inject",
    "diffusers.models.unets.unet_2d_condition",
    "torch._inductor.compile_fx",
    "torch._inductor.lowering",
    "torch._inductor.scheduler",
    "torch._inductor.codegen.simd",
)
# What only a PyTorch built for CUDA has (Triton and Inductor's code for it): imported where
# there, skipped where not.
SERVER_IMPORTS_IF_THERE = (
    "triton",
    "torch._inductor.codegen.triton",
    "torch._inductor.runtime.triton_heuristics",
)
SERVER_LOG = "server.log"


class Server:
    """The compile workers' fork server (see `start_server`), until `start_workers` takes it;
    `close` ends it if nobody did."""

    def __init__(self, proc: subprocess.Popen, tmp: tempfile.TemporaryDirectory):
        self.proc, self.tmp = proc, tmp

    def take(self) -> tuple[subprocess.Popen, tempfile.TemporaryDirectory]:
        taken = self.proc, self.tmp
        self.proc = self.tmp = None
        return taken

    def close(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.tmp.cleanup()
            self.proc = self.tmp = None


def can_fork() -> bool:
    return hasattr(os, "fork") and hasattr(os, "killpg")


def workers_wanted() -> bool:
    """Compile workers unless SDLORA_COMPILE_WORKERS=0 (they run on CUDA only)."""
    return os.environ.get("SDLORA_COMPILE_WORKERS", "") != "0"


def start_server_for(compile_mode: str) -> Server | None:
    """A fork server (`start_server`) when a run with this --compile may start compile workers
    here (a GPU, processes that fork); None otherwise. Start it before the heavy imports and
    the base's load, which its own imports then overlap; close it when the run ends
    (`Server.close`: nothing happens when the workers took it)."""
    may = compile_mode != "off" and workers_wanted() and can_fork()
    return start_server() if may and torch.cuda.is_available() else None


def start_server() -> Server:
    """Start a Python process that imports PyTorch, diffusers' UNet and the compiler now (while
    the training process loads the base) and later forks each worker, ready at once. A new
    Python process per worker spends about 7 s importing them, 15-19 s when eight start
    together on a 16-core GPU machine. POSIX only (see `can_fork`)."""
    tmp = tempfile.TemporaryDirectory(prefix="sdlora-precompile-")
    with (Path(tmp.name) / SERVER_LOG).open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sdlora.train.precompile"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,  # its own process group: `Workers.stop` ends it with them
            # PyTorch's CUDA check through NVML: asking the CUDA runtime (as diffusers' and
            # Triton's imports do) would leave every forked worker unable to start CUDA
            env={**os.environ, "PYTORCH_NVML_BASED_CUDA_CHECK": "1"},
        )
    return Server(proc, tmp)


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
    server: Server | None = None,
) -> Workers:
    """Start worker processes that compile the jobs' graphs into the on-disk compile cache.

    gradient_checkpointing: the training UNet has it on (a region that checkpoints the blocks
    inside it, as SD 1.x's Transformer2DModel does, compiles to another graph); the workers
    switch it on in theirs. activation_budget: the training process's (speed.compile_regions).
    When a previous run compiled these very graphs, none starts. Where processes fork, the
    workers are forks of `server` (started earlier, see `start_server`; else now).
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
        if server is not None:
            server.close()
        return Workers([], [], None, marker, started)
    shares = share_out(jobs, workers or default_workers(len(jobs)))
    env = dict(os.environ)
    # the workers share the CPU: each gets its part of Inductor's kernel-compiling threads
    threads = max(1, (os.cpu_count() or 2) // len(shares))
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(threads))
    forked = can_fork()
    if forked:
        proc, tmp = (server or start_server()).take()
    else:
        tmp = tempfile.TemporaryDirectory(prefix="sdlora-precompile-")
    procs, logs = [], []
    for i, share in enumerate(shares):
        path = Path(tmp.name) / f"job-{i}.json"
        path.write_text(json.dumps({**spec, "jobs": share, "started": time.time(), "env": env}))
        log = Path(tmp.name) / f"job-{i}.log"  # a file, not a pipe: nobody reads it meanwhile
        logs.append(log)
        if not forked:
            cmd = [sys.executable, "-m", "sdlora.train.precompile", str(path)]
            with log.open("wb") as err:
                procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err))
    if forked:
        try:  # one line per worker, then the end of input: the server forks them
            proc.stdin.write(
                "".join(f"{log.with_suffix('.json')}\t{log}\n" for log in logs).encode()
            )
            proc.stdin.close()
        except OSError:  # it died importing: `wait` reports its log's last line
            pass
        procs = [proc]
    return Workers(procs, logs, tmp, marker, started, forked)


def fill_cache(*args, **kwargs) -> dict[str, float | int]:
    """`start_workers(...)`, then wait for them: what `Workers.wait` returns."""
    return start_workers(*args, **kwargs).wait()


def default_workers(jobs: int) -> int:
    """One worker per job, at most one per two CPU cores and MAX_WORKERS."""
    return max(1, min(jobs, MAX_WORKERS, (os.cpu_count() or 2) // 2))


def main(spec_path: str) -> None:
    """A worker: compile and run once each job of the spec file (see `start_workers`)."""
    from diffusers import UNet2DConditionModel

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


def serve() -> None:
    """The fork server (see `start_server`): import SERVER_IMPORTS; read lines "SPEC<tab>LOG"
    until the training process closes standard input; fork a worker for each (`main`, its error
    output to LOG); wait for them all and write each one's exit code to LOG.exit."""
    for name in SERVER_IMPORTS:
        importlib.import_module(name)
    for name in SERVER_IMPORTS_IF_THERE:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    lines = sys.stdin.read().splitlines()
    children = {}
    for line in lines:
        spec_path, log_path = line.split("\t")
        children[_fork(spec_path, log_path)] = log_path
    for pid, log_path in children.items():
        _, status = os.waitpid(pid, 0)
        Path(f"{log_path}.exit").write_text(str(os.waitstatus_to_exitcode(status)))


def _fork(spec_path: str, log_path: str) -> int:
    """A forked worker running `main(spec_path)`; its pid (in the server)."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(log, 2)
        os.close(log)
        if torch.cuda._is_in_bad_fork():  # the server started CUDA after all: start afresh
            _progress(time.time(), "forked after CUDA started: running as a new process")
            env = json.loads(Path(spec_path).read_text())["env"]
            os.execve(
                sys.executable, [sys.executable, "-m", "sdlora.train.precompile", spec_path], env
            )
        main(spec_path)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:  # never back into the server's loop: end here, as a process of its own would
        atexit._run_exitfuncs()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])  # a worker of its own (no fork server, see `can_fork`)
    else:
        serve()
