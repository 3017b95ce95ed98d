"""Training from the UI: `train()` runs in a child process that reports each step as a JSON line.

A child process can be stopped at any moment (the trainer's checkpoints survive a kill, and
"resume" continues from the last one), frees all its memory when it ends, and cannot take the
web server down with it. The child is this module run as `python -m sdlora.ui.training CONFIG`;
it forwards the trainer's log records: `{"step", "loss", "lr"}` per optimizer step,
`{"message"}` for notes and warnings, then `{"done": adapter path}` or `{"error": message}`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from sdlora.errors import SdloraError
from sdlora.writing import written_file

STEP_RECORD = re.compile(r"step (\d+): loss (\S+), lr (\S+)")  # the trainer's per-step debug line


@dataclass
class Status:
    """What a training run has reported so far."""

    total: int  # optimizer steps of the run
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    adapter: Path | None = None  # the finished adapter, once written
    error: str | None = None
    stopped: bool = False  # stopped by the visitor
    running: bool = True

    @property
    def step(self) -> int:
        return self.steps[-1] if self.steps else 0


class TrainJob:
    """One `train()` run in a child process; `status()` reads its progress, `stop()` ends it."""

    def __init__(self, settings: dict, total: int, output: Path, install_to: Path | None = None):
        self.output = Path(output)
        self.install_to = install_to  # where the finished adapter is copied (the adapters folder)
        self._status = Status(total=total)
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
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            with self._lock:
                s = self._status
                if "step" in event:
                    s.steps.append(int(event["step"]))
                    s.losses.append(float(event["loss"]))
                elif "message" in event:
                    s.messages.append(str(event["message"]))
                elif "error" in event:
                    s.error = str(event["error"])
                elif "done" in event:
                    s.adapter = Path(event["done"])
        code = self.process.wait()
        with self._lock:
            s = self._status
            if s.adapter is not None and self.install_to is not None:
                s.adapter = _install(s.adapter, self.install_to)
            if code != 0 and s.error is None and not s.stopped:
                self._stderr.seek(0)
                tail = self._stderr.read().strip().splitlines()[-3:]
                s.error = f"training failed (exit code {code}): " + " / ".join(tail)
            s.running = False
        self._stderr.close()

    def status(self) -> Status:
        """A snapshot of the run's progress."""
        with self._lock:
            s = self._status
            return Status(
                s.total,
                list(s.steps),
                list(s.losses),
                list(s.messages),
                s.adapter,
                s.error,
                s.stopped,
                s.running,
            )

    def latest_sample(self) -> Path | None:
        """The newest sample grid the run has written, if any."""
        found = sorted((self.output / "samples").glob("*.png"), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None

    def wait(self, timeout: float | None = None) -> Status:
        """Block until the run has ended (and its adapter is installed); return its status."""
        self._reader.join(timeout)
        return self.status()

    def stop(self) -> None:
        """End the run now; its last checkpoint stays for a later resume."""
        with self._lock:
            if not self._status.running:
                return
            self._status.stopped = True
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _install(adapter: Path, folder: Path) -> Path:
    """Copy the finished adapter into `folder` under its own name, atomically."""
    dest = folder / adapter.name
    with written_file(dest) as tmp:
        shutil.copyfile(adapter, tmp)
    return dest


class _Forward(logging.Handler):
    """Writes the trainer's log records to stdout as JSON lines."""

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        match = STEP_RECORD.fullmatch(text)
        if match:
            event = {"step": int(match[1]), "loss": float(match[2]), "lr": float(match[3])}
        elif record.levelno >= logging.INFO:
            event = {"message": text}
        else:
            return
        print(json.dumps(event), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Child-process entry: run `train()` on the JSON settings in argv[0]."""
    from sdlora.train import load_config
    from sdlora.train.loop import train

    argv = sys.argv[1:] if argv is None else argv
    log = logging.getLogger("sdlora")
    log.addHandler(_Forward())
    log.setLevel(logging.DEBUG)
    try:
        path = train(load_config(None, **json.loads(argv[0])))
    except SdloraError as err:
        print(json.dumps({"error": str(err)}), flush=True)
        return 2
    print(json.dumps({"done": str(Path(path).resolve())}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
