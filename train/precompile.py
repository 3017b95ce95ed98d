"""Compile workers: processes that fill PyTorch's compile cache before the first step needs it.

torch.compile works through the compiled regions (see speed.py) one after another in one
process: on an empty compile cache that is most of three minutes for SD 1.5, while every other
CPU core idles. PyTorch keeps what it compiled in an on-disk cache (Inductor's FX-graph cache and
AOTAutograd's cache), shared by every process of the user on the machine. So before the first
step:

1. compile_plan.py records which graphs there are (one job each) and deals them out.
2. `start_workers` starts a worker per share: forks of a server that imported PyTorch, diffusers
   and the compiler early (`start_server`), or, where processes do not fork,
   `python -m sdlora.train.compile_worker SPEC.json`. Each runs compile_worker.main: it compiles
   its jobs' graphs and stores them.
3. The training process then compiles its regions as usual and finds every graph in the cache:
   before its first step (`--compile on`), or, with `--compile auto`, while its first steps run
   uncompiled, as soon as every worker is done (`Workers.ready`).

A worker that fails costs nothing but time: the training process compiles whatever is missing
itself. The trainer reaches all this through compiling.py only.
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
from pathlib import Path

import torch
from torch import nn

from sdlora.train import compile_worker
from sdlora.train.compile_plan import AdapterSettings, default_workers, share_out

logger = logging.getLogger(__name__)

WORKER_TIMEOUT_S = 900  # a worker still compiling after this is stopped; the trainer compiles


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
        self, procs: list, logs: list[Path], *, tmp, marker: Path, started: float, forked=False
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
    *,
    adapter: AdapterSettings,
    weight_dtype: torch.dtype,
    autocast_dtype: torch.dtype | None,
    compile_options: dict,
    gradient_checkpointing: bool = False,
    workers: int | None = None,
    activation_budget: float = 1.0,
    server: Server | None = None,
    base_precision: str = "full",
) -> Workers:
    """Start worker processes that compile the jobs' graphs (compile_plan.record_calls) into
    the on-disk compile cache.

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
        "base_precision": base_precision,  # fp8: the regions' weights as sdlora/lora/fp8.py stores them
        "sdp_order": [int(b) for b in torch._C._get_sdp_priority_order()],
    }
    marker = done_marker({**spec, "jobs": jobs})
    started = time.perf_counter()
    if marker.exists():
        if server is not None:
            server.close()
        return Workers([], [], tmp=None, marker=marker, started=started)
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
            cmd = [sys.executable, "-m", "sdlora.train.compile_worker", str(path)]
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
    return Workers(procs, logs, tmp=tmp, marker=marker, started=started, forked=forked)


def fill_cache(*args, **kwargs) -> dict[str, float | int]:
    """`start_workers(...)`, then wait for them: what `Workers.wait` returns."""
    return start_workers(*args, **kwargs).wait()


def serve() -> None:
    """The fork server (see `start_server`): import SERVER_IMPORTS; read lines "SPEC<tab>LOG"
    until the training process closes standard input; fork a worker for each
    (compile_worker.main, its error output to LOG); wait for them all and write each one's exit
    code to LOG.exit."""
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
    """A forked worker running `compile_worker.main(spec_path)`; its pid (in the server)."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(log, 2)
        os.close(log)
        if torch.cuda._is_in_bad_fork():  # the server started CUDA after all: start afresh
            compile_worker.progress(
                time.time(), "forked after CUDA started: running as a new process"
            )
            env = json.loads(Path(spec_path).read_text())["env"]
            argv = [sys.executable, "-m", "sdlora.train.compile_worker", spec_path]
            os.execve(sys.executable, argv, env)
        compile_worker.main(spec_path)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:  # never back into the server's loop: end here, as a process of its own would
        atexit._run_exitfuncs()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    serve()
