"""How a training run looks on the page: the status line, the loss curve, the sample gallery.

Pure functions of a `training.Status` (and the run's files), so that every page watching the
same run shows the same thing, and tests need no browser.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pandas as pd
from PIL import Image

from sdlora.train.checkpoint import checkpoints
from sdlora.ui.training import Status

SMOOTHING = 0.9  # EMA factor of the smoothed loss (TensorBoard's default is 0.6; steps are noisy)
PLOT_POINTS = 1000  # at most this many points per curve are sent to the page
SAMPLE_SIDE = 256  # samples smaller than this are enlarged by a whole factor to reach it


def clock(seconds: float) -> str:
    """1:05, 12:00, 1:02:03."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def busy(step: int, save_every: int, sample_every: int) -> str:
    """What the trainer does after optimizer step `step` before the next one (train/loop.py:
    checkpoint, then samples, when due), in the visitor's words; "" when nothing is due. The
    next step's report ends it, so the status says this for exactly as long as it lasts."""
    due = []
    if save_every and step % save_every == 0:
        due.append("saving checkpoint")
    if sample_every and step % sample_every == 0:
        due.append("drawing samples")
    return ", then ".join(due) + "…" if due else ""


def status_text(
    s: Status,
    name: str,
    label: str,
    output: Path,
    save_every: int,
    now: float,
    sample_every: int = 0,
) -> str:
    """One or two lines in the visitor's words: what the run is doing, how fast, how long."""
    elapsed = (s.ended or now) - s.started
    if not s.running:
        if s.error:
            where = f" at step {s.step}" if s.step else ""
            return f"**Training {name} failed{where}:** {s.error}"
        if s.adapter is not None:
            return (
                f"Done: **{s.adapter.stem}** is in the adapters folder (Mix tab). "
                f"{s.step} steps in {clock(elapsed)}{speed(s)}."
            )
        return stopped_text(s, output, save_every)
    if s.first_step_at is None:
        return (
            f"Starting **{name}** on {label}: loading the base and reading the images… "
            f"{clock(elapsed)}"
        )
    if s.step >= s.total:
        return f"Finishing **{name}**: writing the adapter… {clock(elapsed)}"
    parts = [f"Training **{name}** on {label}: step {s.step} of {s.total}"]
    doing = busy(s.step, save_every, sample_every)
    if doing:
        parts[0] += f", {doing}"
    rate = s.steps_per_s()
    if rate:
        parts.append(f"{rate * s.images_per_step:.3g} images/s")
    parts.append(f"{clock(elapsed)} elapsed")
    eta = s.eta_s()
    if eta is not None:
        parts.append(f"about {clock(eta)} left")
    return " · ".join(parts)


def speed(s: Status) -> str:
    rate = s.steps_per_s()
    return f", {rate * s.images_per_step:.3g} images/s" if rate else ""


def stopped_text(s: Status, output: Path, save_every: int) -> str:
    """Stopped: offer Resume only when there is a checkpoint to resume from."""
    found = checkpoints(output)
    if not found:
        return (
            f"Stopped at step {s.step}, before the first checkpoint (one is kept every "
            f"{save_every} steps): nothing to resume. Start begins again."
        )
    last = int(found[-1].name.split("-")[-1])
    return (
        f"Stopped at step {s.step}. The last checkpoint is at step {last}: tick **Resume** "
        "and press Start to go on from there."
    )


def smoothed(losses: list[float], factor: float = SMOOTHING) -> list[float]:
    """Exponential moving average, bias-corrected so that the first values are not pulled to 0."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses, start=1):
        avg = factor * avg + (1 - factor) * loss
        out.append(avg / (1 - factor**i))
    return out


def loss_frame(steps: list[int], losses: list[float]) -> pd.DataFrame:
    """Long-form frame for gr.LinePlot: step (int), loss, curve ("loss" or "smoothed")."""
    smooth = smoothed(losses)
    keep = slice(None, None, max(1, -(-len(steps) // PLOT_POINTS)))  # thin out long runs
    kept = steps[keep]
    return pd.DataFrame(
        {
            "step": pd.array(kept + kept, dtype="int64"),
            "loss": losses[keep] + smooth[keep],
            "curve": ["loss"] * len(kept) + ["smoothed"] * len(kept),
        }
    )


def zoom(side: int, target: int = SAMPLE_SIDE) -> int:
    """The whole factor that brings an image of `side` pixels to about `target` (at least 1)."""
    return max(1, target // max(1, side))


def samples_html(samples: list[Path]) -> str:
    """The sample grids, newest first, each at a whole-number zoom with crisp pixels and its
    step below it. Files are served from the outputs folder (a static path of the app)."""
    figures = []
    for path in reversed(samples):
        with Image.open(path) as image:
            width, height = image.size
        factor = zoom(height)  # a grid is one row of `resolution`-high samples
        step = int(path.stem.split("-")[-1])
        figures.append(
            f'<figure style="display:inline-block;margin:0 .6em .6em 0;vertical-align:top">'
            f'<img src="gradio_api/file={quote(str(path))}" alt="samples at step {step}" '
            f'width="{width * factor}" height="{height * factor}" '
            f'style="image-rendering:pixelated;max-width:none">'
            f"<figcaption>step {step} · {factor}×</figcaption></figure>"
        )
    return "".join(figures)
