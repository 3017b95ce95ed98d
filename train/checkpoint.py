"""Checkpoints under OUTPUT/checkpoints/step-NNNNNN/, written so that a kill never damages one.

A checkpoint is built in a hidden temporary folder beside the others and renamed into place
when complete, so every `step-*` folder is whole. It holds:
  adapter.safetensors   the adapter so far, a normal adapter file (`sdlora generate --lora`)
  trainer_state.pt      raw LoRA factors, optimizer, LR scheduler and loss-scaler state, step
  checkpoint.json       the step, the settings of the run and its adapter's file name
Random draws in training are derived from (seed, micro-step, process), so the step restores the
random state and the batch order as well.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import shutil
import tempfile
from contextlib import suppress
from pathlib import Path

import torch

from sdlora.errors import SdloraError
from sdlora.io.files import load_failure, save_adapter
from sdlora.io.writing import FULL, clean_stale, reported, set_public_mode, write_error
from sdlora.lora.adapter import Adapter

FOLDER = "checkpoints"
NAME = re.compile(r"^step-(\d+)$")
INFO = "checkpoint.json"
STATE = "trainer_state.pt"
ADAPTER = "adapter.safetensors"


def checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints in `output`, oldest first."""
    folder = output / FOLDER
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if NAME.match(p.name) and (p / INFO).is_file()]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)))


def step_name(step: int) -> str:
    """step-000500: how checkpoint folders (and sample grids) are named by their step."""
    return f"step-{step:06d}"


def folder_of(output: Path, step: int) -> Path:
    """Where checkpoint `step` lives."""
    return output / FOLDER / step_name(step)


def latest(output: Path) -> Path | None:
    found = checkpoints(output)
    return found[-1] if found else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    output: Path,
    step: int,
    state: dict,
    adapter: Adapter,
    settings: dict,
    keep_last: int,
    adapter_name: str | None = None,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last`.

    `adapter_name` (the final adapter's file stem) is recorded, so that a resumed run knows
    which files in the folder are its own (setup.check_output).

    A write that fails (a full disk, a folder made read-only) leaves no trace and the earlier
    checkpoints whole, and raises an error naming the last one to --resume from.
    """
    folder = output / FOLDER
    final = folder_of(output, step)
    tmp = trash = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=folder))
        save_adapter(adapter, tmp / ADAPTER)
        # torch.save reports a full disk as a bare RuntimeError; Python's own write names it
        buffer = io.BytesIO()
        torch.save(state, buffer)
        (tmp / STATE).write_bytes(buffer.getbuffer())
        info = {"step": step, "settings": settings}
        if adapter_name is not None:
            info["adapter_name"] = adapter_name
        (tmp / INFO).write_text(json.dumps(info, indent=1))
        for name in (ADAPTER, STATE, INFO):
            _fsync(tmp / name)
        set_public_mode(tmp, folder=True)
        if final.exists():  # a rerun of the same step: move the old one aside first
            trash = folder / f".trash-{final.name}-{os.getpid()}"
            final.rename(trash)
        os.replace(tmp, final)
        if hasattr(os, "O_DIRECTORY"):
            _fsync(folder)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None and not final.exists():
            with suppress(OSError):
                trash.rename(final)
        problem = write_error(err, final)
        if problem is None:
            raise
        raise SdloraError(
            f"cannot write checkpoint {final}: {problem.cause}; training stopped. "
            + _resume_advice(output, problem.code)
        ) from err
    prune(output, keep_last)
    return final


def _resume_advice(output: Path, code: int | None) -> str:
    """What to do after a failed save, naming the checkpoint that is still whole."""
    if code in FULL:
        advice = "free some space"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "make the folder writable"
    else:
        advice = "fix that"
    last = latest(output)
    if last is None:
        return f"No checkpoint was saved before this one; {advice}, then run the command again."
    return f"The last checkpoint, {last}, is intact: {advice}, then {{+resume}} to continue."


def prepare(output: Path, adapter: Path, overwrite: bool) -> None:
    """Make `output` ready before a run loads its model: the folder exists and takes files,
    leftovers of killed writes (checkpoints and the `adapter` file) are gone, and with
    `overwrite` the old checkpoints too. A folder that cannot be written is a WriteError."""
    with reported(output):
        if overwrite:
            remove_all(output)
        clean(output)
        output.mkdir(parents=True, exist_ok=True)
        clean_stale(adapter)
        with tempfile.TemporaryFile(dir=output):  # can files be made here at all?
            pass


def prune(output: Path, keep_last: int) -> None:
    """Delete old checkpoints (renamed away first, so a kill mid-delete leaves no half folder)."""
    folder = output / FOLDER
    for old in checkpoints(output)[:-keep_last]:
        trash = folder / f".trash-{old.name}-{os.getpid()}"
        old.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    clean(output)


def clean(output: Path) -> None:
    """Remove leftovers of interrupted saves and deletes."""
    folder = output / FOLDER
    if folder.is_dir():
        for leftover in folder.glob(".t*-step-*"):
            if leftover.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(leftover, ignore_errors=True)


def remove_all(output: Path) -> None:
    """Delete every checkpoint (for --overwrite)."""
    shutil.rmtree(output / FOLDER, ignore_errors=True)


def load(path: Path) -> tuple[dict, dict]:
    """(info, state) of the checkpoint folder `path`; clear errors when it is not one."""
    if not (path / INFO).is_file() or not (path / STATE).is_file():
        raise SdloraError(
            f"{path}: not a checkpoint folder (needs {INFO} and {STATE}); "
            f"give a folder under OUTPUT/{FOLDER}/ or just --resume for the latest"
        )
    try:
        info = json.loads((path / INFO).read_text())
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        reason = load_failure(err, "resume from another checkpoint")
        raise SdloraError(f"{path}: checkpoint cannot be read ({reason})") from None
    return info, state


def resume_hint(output: Path) -> str:
    """Where a stopped run can continue from, as a sentence for the user; it names settings
    as placeholders (`sdlora.errors.fill`), so each front end words them its own way."""
    last = latest(output)
    if last is None:
        return "No checkpoint was saved yet (see {save_every})."
    return f"The last checkpoint is {last}; {{+resume}} to continue."
