"""Training from the UI: `train()` runs in a child process that reports each step as a JSON line.

A child process can be stopped at any moment (the trainer's checkpoints survive a kill, and
"resume" continues from the last one), frees all its memory when it ends, and cannot take the
web server down with it. The child is this module run as `python -m sdlora.ui.training CONFIG`,
in a process group of its own so that Stop reaches everything it started. It writes
`{"at": step}` as each optimizer step ends, `{"step", "loss", "lr"}` when the trainer reads the
losses (every step's, a few steps late), `{"message", "level"}` for notes and warnings, then
`{"done": adapter path}` or `{"error": message, "setting": name}` (an `SdloraError`'s parts, so
the page can word it with its own labels).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from sdlora.errors import SdloraError
from sdlora.io.writing import written_file

STEP_RECORD = re.compile(r"step (\d+): loss (\S+), lr (\S+)")  # the trainer's per-step debug line
STOP_GRACE_S = 10.0  # after SIGTERM, how long the child may take before it is killed
SPEED_WINDOW = 20  # steps the speed (and so the ETA) is measured over


@dataclass
class Status:
    """What a training run has reported so far (a snapshot; times are `time.monotonic()`)."""

    total: int  # optimizer steps of the run
    images_per_step: int  # batch size x gradient accumulation
    started: float  # when the child process was started
    step: int = 0  # the last optimizer step done
    first_step_at: float | None = None  # when the first step of this run ended
    recent: list[tuple[int, float]] = field(default_factory=list)  # (step, time), newest last
    steps: list[int] = field(default_factory=list)  # steps whose loss has been read
    losses: list[float] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the trainer's warnings, as written
    adapter: Path | None = None  # the finished adapter, once written and installed
    error: str | None = None
    stopped: bool = False  # stopped by a visitor
    running: bool = True
    ended: float | None = None  # when the child process ended
    error_setting: str | None = None  # the setting `error` is about (SdloraError.setting)

    def failure(self) -> SdloraError | None:
        """The run's error as the trainer raised it, for the page to word; None if none."""
        return None if self.error is None else SdloraError(self.error, self.error_setting)

    def steps_per_s(self) -> float | None:
        """Recent speed: 1 / the median step time of the last SPEED_WINDOW steps; None before
        two steps. The median, not the mean: a pause for samples or a checkpoint is one slow
        step among twenty and moves it by at most one place, so the ETA does not swing."""
        if len(self.recent) < 2:
            return None
        times = [
            (t1 - t0) / (s1 - s0)
            for (s0, t0), (s1, t1) in zip(self.recent, self.recent[1:], strict=False)
            if s1 > s0
        ]
        return 1 / max(statistics.median(times), 1e-9) if times else None

    def eta_s(self) -> float | None:
        """Seconds left at the recent speed; None while the speed is unknown."""
        rate = self.steps_per_s()
        return None if not rate else (self.total - self.step) / rate


LOSS_LOG = ".ui-losses.jsonl"  # in the run's output folder: (step, loss) per line


def read_losses(log: Path) -> tuple[list[int], list[float]]:
    """The (steps, losses) a run's earlier parts wrote to `log`, the last word per step kept."""
    by_step: dict[int, float] = {}
    try:
        lines = log.read_text(encoding="utf-8").splitlines()
    except OSError:
        return [], []
    for line in lines:
        try:
            step, loss = json.loads(line)
            if by_step and int(step) <= max(by_step):  # a resume went back: drop what followed
                by_step = {k: v for k, v in by_step.items() if k < int(step)}
            by_step[int(step)] = float(loss)
        except (ValueError, TypeError):
            continue
    steps = sorted(by_step)
    return steps, [by_step[k] for k in steps]


def _append_loss(log: Path, step: int, loss: float) -> None:
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a", encoding="utf-8") as f:
            f.write(json.dumps([step, loss]) + "\n")
    except OSError:  # the curve is a convenience: a full disk must not stop the run
        pass


class TrainJob:
    """One `train()` run in a child process; `status()` reads its progress, `stop()` ends it."""

    def __init__(
        self,
        settings: dict,
        output: Path,
        install_to: Path | None = None,
        label: str = "",
    ):
        self.settings = dict(settings)
        self.output = Path(output)
        self.install_to = install_to  # where the finished adapter is copied (the adapters folder)
        self.label = label  # what the page calls the run (the dataset it trains on)
        self.started_wall = time.time()  # samples written since then belong to this run
        total = int(settings["steps"])
        per_step = int(settings.get("batch_size", 1)) * int(settings.get("grad_accum", 1))
        self._status = Status(total=total, images_per_step=per_step, started=time.monotonic())
        self._log = (
            self.output / LOSS_LOG
        )  # every loss read, so a resumed run shows the whole curve
        if settings.get("resume"):
            self._status.steps, self._status.losses = read_losses(self._log)
            self.started_wall = 0.0  # the earlier runs' samples are this run's too
        else:
            self._log.unlink(missing_ok=True)
        self._recent: deque[tuple[int, float]] = deque(maxlen=SPEED_WINDOW + 1)
        self._lock = threading.Lock()
        self._stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sdlora.ui.training", json.dumps(settings)],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,  # its own process group: Stop ends all of it, Ctrl-C none
        )
        self.pid = self.process.pid
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            self._take(event, time.monotonic())
        code = self.process.wait()
        with self._lock:
            s = self._status
            if s.adapter is not None and self.install_to is not None:
                try:
                    s.adapter = _install(s.adapter, self.install_to)
                except SdloraError as err:
                    s.error, s.error_setting, s.adapter = err.message, err.setting, None
            if code != 0 and s.error is None and not s.stopped:
                self._stderr.seek(0)
                tail = self._stderr.read().strip().splitlines()[-3:]
                s.error = f"training failed (exit code {code}): " + " / ".join(tail)
            s.running, s.ended = False, time.monotonic()
        self._stderr.close()

    def _take(self, event: dict, now: float) -> None:
        with self._lock:
            s = self._status
            if "at" in event:
                s.step = int(event["at"])
                if s.first_step_at is None:
                    s.first_step_at = now
                self._recent.append((s.step, now))
            elif "step" in event:
                step, loss = int(event["step"]), float(event["loss"])
                while s.steps and s.steps[-1] >= step:  # resumed from an earlier checkpoint
                    s.steps.pop()
                    s.losses.pop()
                s.steps.append(step)
                s.losses.append(loss)
                _append_loss(self._log, step, loss)
            elif "message" in event:
                if event.get("level", logging.INFO) >= logging.WARNING:
                    s.warnings.append(str(event["message"]))
            elif "error" in event:
                s.error = str(event["error"])
                s.error_setting = event.get("setting")
            elif "done" in event:
                s.adapter = Path(event["done"])

    def status(self) -> Status:
        """A snapshot of the run's progress."""
        with self._lock:
            s = self._status
            return Status(
                s.total,
                s.images_per_step,
                s.started,
                s.step,
                s.first_step_at,
                list(self._recent),
                list(s.steps),
                list(s.losses),
                list(s.warnings),
                s.adapter,
                s.error,
                s.stopped,
                s.running,
                s.ended,
                s.error_setting,
            )

    def samples(self) -> list[Path]:
        """Sample grids this run has written, oldest first (files are named by step)."""
        folder = self.output / "samples"
        if not folder.is_dir():
            return []
        found = [p for p in folder.glob("step-*.png") if p.stat().st_mtime >= self.started_wall]
        return sorted(found)

    def wait(self, timeout: float | None = None) -> Status:
        """Block until the run has ended (and its adapter is installed); return its status."""
        self._reader.join(timeout)
        return self.status()

    def stop(self) -> Status:
        """End the run and everything it started: SIGTERM to its process group, SIGKILL after
        STOP_GRACE_S. Returns once the process is gone; its last checkpoint stays for a resume."""
        with self._lock:
            running = self._status.running
            self._status.stopped = self._status.stopped or running
        if not running:
            return self.status()
        _signal_group(self.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(self.pid, signal.SIGKILL)
            self.process.wait()
        _signal_group(self.pid, signal.SIGKILL)  # anything it started that outlived it
        return self.wait(timeout=STOP_GRACE_S)


def _signal_group(pid: int, sig: int) -> None:
    """Send `sig` to the process group led by `pid` (the child's own, see start_new_session)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def _install(adapter: Path, folder: Path) -> Path:
    """Copy the finished adapter into `folder` under its own name, atomically."""
    dest = folder / adapter.name
    with written_file(dest) as tmp:
        shutil.copyfile(adapter, tmp)
    return dest


def _emit(event: dict) -> None:
    print(json.dumps(event), flush=True)


class _Forward(logging.Handler):
    """Writes the trainer's log records to stdout as JSON lines."""

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        match = STEP_RECORD.fullmatch(text)
        if match:
            _emit({"step": int(match[1]), "loss": float(match[2]), "lr": float(match[3])})
        elif record.levelno >= logging.INFO:
            _emit({"message": text, "level": record.levelno})


def main(argv: list[str] | None = None) -> int:
    """Child-process entry: run `train()` on the JSON settings in argv[0]."""
    from sdlora.train import load_config
    from sdlora.train.loop import train

    argv = sys.argv[1:] if argv is None else argv
    log = logging.getLogger("sdlora")
    log.addHandler(_Forward())
    log.setLevel(logging.DEBUG)
    parent = os.getppid()

    def on_step(step: int) -> None:
        if os.getppid() != parent:  # the web server is gone: nobody can watch or stop this run
            raise SystemExit(3)
        _emit({"at": step})

    try:
        path = train(load_config(None, **json.loads(argv[0])), on_step=on_step)
    except SdloraError as err:
        _emit({"error": err.message, "setting": err.setting})
        return 2
    _emit({"done": str(Path(path).resolve())})
    return 0


if __name__ == "__main__":
    sys.exit(main())
