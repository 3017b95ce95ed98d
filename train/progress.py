"""What a run reports while it trains: losses (checked for NaN), the progress bar, TensorBoard."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import Accelerator

from sdlora.errors import SdloraError
from sdlora.train.checkpoint import resume_hint
from sdlora.train.config import TrainConfig

logger = logging.getLogger(__name__)


class LossLog:
    """Losses of the steps since the last read, kept on the device until `read()` fetches them.

    A read is one host sync for all of them: it stops the run on a non-finite loss, then logs
    each step (a debug line per step, TensorBoard, the progress bar).
    """

    def __init__(
        self, accelerator: Accelerator, *, output: Path, writer, progress, lr_names: list[str]
    ):
        self.accelerator, self.output, self.writer, self.progress = (
            accelerator,
            output,
            writer,
            progress,
        )
        self.lr_names = lr_names  # of the optimizer's parameter groups: "unet", "text_encoder"...
        self.steps: list[int] = []
        self.losses: list[torch.Tensor] = []  # () each, on the device
        self.lrs: list[list[float]] = []
        self.shown: dict[str, str] = {}  # more for the progress bar (e.g. the validation loss)

    def add(self, step: int, loss: torch.Tensor, lrs: list[float]) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        self.lrs.append(list(lrs))

    def read(self, rate: float) -> None:
        if not self.steps:
            return
        gathered = self.accelerator.gather(torch.stack(self.losses))  # (processes * n,)
        per_process = gathered.reshape(-1, len(self.steps)).float().cpu()  # the host sync
        finite = torch.isfinite(per_process).all(dim=0)
        if not finite.all():
            bad = int((~finite).nonzero()[0])
            raise SdloraError(
                f"loss became {per_process[:, bad].tolist()} at step {self.steps[bad]}; "
                f"training stopped. {resume_hint(self.output)} "
                "Try a lower {lr}, or {mixed_precision} no"
            )
        losses = per_process.mean(dim=0).tolist()
        for step, loss, lrs in zip(self.steps, losses, self.lrs, strict=True):
            logger.debug("step %d: loss %.6f, lr %.3g", step, loss, lrs[0])
            if self.writer is not None:
                self.writer.add_scalar("loss", loss, step)
                for name, group_lr in zip(self.lr_names, lrs, strict=True):
                    self.writer.add_scalar(f"lr/{name}", group_lr, step)
        self.progress.set_postfix(
            loss=f"{losses[-1]:.4f}", lr=f"{self.lrs[-1][0]:.2e}", img_s=f"{rate:.1f}", **self.shown
        )
        self.steps, self.losses, self.lrs = [], [], []


class Pace:
    """Training speed as a user should read it: the first step apart, then the recent rate.

    The first step carries the start-up (compiling, CUDA-graph capture, kernel choice); averaging
    it into the rate would show a fraction of the speed the steps actually run at. `mark` is
    called at each loss read (the loop's only host syncs), so the times are the GPU's.
    """

    def __init__(self, images_per_step: int, first_step: int, started: float):
        self.images_per_step, self.started = images_per_step, started
        self.first: tuple[int, float] = (first_step, started)  # (step, time) the run began at
        self.after_first: tuple[int, float] | None = None  # when the first step was done
        self.last: tuple[int, float] = self.first

    def mark(self, step: int, now: float) -> float:
        """Record a read at `step`; return images/s since the previous read."""
        if self.after_first is None:
            self.after_first = (step, now)
        previous, self.last = self.last, (step, now)
        return (step - previous[0]) * self.images_per_step / max(now - previous[1], 1e-9)

    def summary(self, step: int, now: float) -> str:
        """ "N steps in T s (first step F s, then R steps/s, I images/s)"."""
        done, elapsed = step - self.first[0], now - self.started
        if self.after_first is None or step <= self.after_first[0]:
            rate = done / max(elapsed, 1e-9)
            return f"{done} steps in {elapsed:.1f} s ({rate:.3g} steps/s, {rate * self.images_per_step:.3g} images/s)"
        first_s = self.after_first[1] - self.started
        (last_step, last), (one, one_at) = self.last, self.after_first
        rate = (last_step - one) / max(
            last - one_at, 1e-9
        )  # steps after the first, to the last read
        return (
            f"{done} steps in {elapsed:.1f} s (first step {first_s:.1f} s, then {rate:.3g} "
            f"steps/s, {rate * self.images_per_step:.3g} images/s)"
        )


def open_tensorboard(output: Path, config: TrainConfig):
    """A SummaryWriter under output/logs, or None (with a note) when tensorboard is missing."""
    if not config.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.info("TensorBoard logs are off: pip install tensorboard to get them")
        return None
    return SummaryWriter(log_dir=str(output / "logs"))
