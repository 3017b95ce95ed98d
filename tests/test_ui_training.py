"""Training from the web UI without a browser: the form checked at once in the form's words, the
dataset preview, the run in its child process (every step reported, Stop ends the process
group, one run at a time), Resume offered only with a checkpoint, and what the page shows."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdlora.errors import SdloraError, flag
from sdlora.train.checkpoint import checkpoints
from sdlora.ui import handlers as h
from sdlora.ui import train_setup, train_view
from sdlora.ui.engine import Engine
from sdlora.ui.jobs import Busy, Jobs
from sdlora.ui.train_setup import Form
from sdlora.ui.training import TrainJob

pytestmark = pytest.mark.usefixtures("one_thread")
TOY = dict(lr=1e-3, resolution=64, batch_size=4, rank=2)  # the toy base's starting values
WAIT_S = 240  # a child process imports torch and diffusers first; the machine may be busy


@pytest.fixture(scope="module", autouse=True)
def one_thread_children():
    env = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the child processes gain nothing from threads either
    yield
    if env is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> h.Context:
    """Datasets `style` (12 captioned 128 px images), `empty` (no image), `tiny` (one 32 px)."""
    root = tmp_path_factory.mktemp("ui-train")
    datasets = root / "datasets"
    shutil.copytree(Path(__file__).parents[1] / "samples" / "style", datasets / "style")
    (datasets / "empty").mkdir()
    (datasets / "empty" / "readme.txt").write_text("no pictures")
    (datasets / "tiny").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(datasets / "tiny" / "a.png")
    (datasets / "tiny" / "a.txt").write_text("noise")
    return h.Context("toy", root / "adapters", datasets, root / "outputs", Engine("cpu"))


def wait_for(condition, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# ---------------------------------------------------------------- the form


@pytest.mark.parametrize(
    "dataset, form, message",
    [
        ("empty", Form(), "dataset 'empty': no images found"),
        ("", Form(), "pick a dataset folder first"),
        ("../style", Form(), "'..'"),
        ("nope", Form(), "no such folder"),
        ("style", Form(name="../x"), "adapter name"),
        ("style", Form(lr=0, **{k: v for k, v in TOY.items() if k != "lr"}), "Learning rate must"),
        ("style", Form(resolution=65), "Resolution must be a multiple of 64"),
        ("style", Form(steps=0, resolution=64), "Steps must be from 1 to 1000000"),
        ("style", Form(batch_size=13, resolution=64), "Batch size 13 is larger than the 12"),
        ("style", Form(resume=True, overwrite=True), "pick one"),
        ("style", Form(lr=5, resolution=64), "Learning rate must be positive, at most 1 \\(got 5"),
        ("style", Form(steps=2.5, resolution=64), "Steps: give a whole number"),
        ("style", Form(sample_every=2.5, resolution=64), "Sample every: give a whole number"),
        ("style", Form(name="never", resume=True), "no checkpoint to continue from"),
    ],
)
def test_form_mistakes_are_refused_at_once_in_the_forms_words(ctx, dataset, form, message):
    started = time.monotonic()
    with pytest.raises(SdloraError, match=message) as caught:
        train_setup.checked_run(ctx, "toy", dataset, form)
    assert time.monotonic() - started < 5  # no model load, no child process
    text = str(caught.value)
    assert "--" not in text and str(ctx.datasets.parent) not in text, text


def test_ui_words_use_the_forms_labels_and_short_folder_names(ctx):
    err = SdloraError(  # the trainer's words: settings as placeholders (sdlora.errors.fill)
        f"loss became [nan] at step 7; training stopped. The last checkpoint is "
        f"{ctx.outputs}/train/x/checkpoints/step-000005; {{+resume}} to continue. "
        "Try a lower {lr}, or {mixed_precision} no"
    )
    assert train_setup.ui_words(err, ctx) == (
        "loss became [nan] at step 7; training stopped. The last checkpoint is "
        "outputs/train/x/checkpoints/step-000005; tick Resume and press Start to continue. "
        "Try a lower Learning rate, or mixed precision no"
    )
    assert err.worded(flag).endswith(  # the command line says the same with its flags
        "step-000005; run the same command with --resume to continue. "
        "Try a lower --lr, or --mixed-precision no"
    )
    # an error about one setting is named by the form's label for it, the CLI's flag for it
    err = SdloraError("must be from 1 to 1024 (got 0)", setting="rank")
    assert train_setup.ui_words(err, ctx) == "Rank must be from 1 to 1024 (got 0)"
    assert err.worded(flag) == "--rank must be from 1 to 1024 (got 0)"


def test_preview_shows_every_image_with_its_caption(ctx):
    found = train_setup.preview(ctx, "style", 64)
    assert found.count == 12 and len(found.thumbnails) == 12 and found.sizes == [(64, 64)]
    image, caption = found.thumbnails[0]
    assert caption == (ctx.datasets / "style" / "00.txt").read_text().strip()
    assert max(image.size) == train_setup.THUMB_SIDE  # 128 px shrunk to fit
    assert "**12 images**, trained at 64×64" in found.summary()

    small = train_setup.preview(ctx, "tiny", 64)  # one 32 px image: enlarged 3x, pixel for pixel
    image, caption = small.thumbnails[0]
    original = np.asarray(Image.open(ctx.datasets / "tiny" / "a.png"))
    assert image.size == (96, 96) and caption == "noise"
    assert np.array_equal(np.asarray(image)[::3, ::3], original)
    assert "enlarged" in small.summary() and "--" not in small.summary()

    with pytest.raises(SdloraError, match="dataset 'empty': no images found"):
        train_setup.preview(ctx, "empty", 64)


def test_settings_use_the_bases_recommendation_and_give_the_form_back(ctx):
    form = Form(name="rec", trigger="zq", sample_prompt="a cat", seed=5, **TOY)
    run = train_setup.checked_run(ctx, "toy", "style", form)
    assert "sample_guidance" not in run.settings and "sample_steps" not in run.settings
    assert run.images == 12 and run.output == ctx.outputs / "train" / "rec"
    assert train_setup.form_of(run.settings, ctx) == ("style", form)


# ---------------------------------------------------------------- the run


def start(jobs: Jobs, ctx: h.Context, form: Form) -> tuple[str, TrainJob]:
    run = train_setup.checked_run(ctx, "toy", "style", form)
    job_id = jobs.start(lambda: TrainJob(run.settings, run.output, ctx.adapters, "style"))
    return job_id, jobs.get(job_id)


def test_one_run_at_a_time_stop_ends_its_process_and_resume_finishes(ctx, tmp_path):
    jobs = Jobs()
    form = Form(name="resumed", steps=30, sample_every=30, sample_prompt="a red circle", **TOY)
    job_id, job = start(jobs, ctx, form)  # a checkpoint every 3 steps
    assert jobs.running() == job_id
    with pytest.raises(Busy, match=r"\*\*resumed\*\* is training now") as busy:
        start(jobs, ctx, Form(name="other", steps=2, **TOY))
    assert busy.value.job_id == job_id
    wait_for(lambda: checkpoints(job.output), "a checkpoint")

    s = job.status()
    assert s.running and s.first_step_at is not None and s.images_per_step == 4
    text = train_view.status_text(s, "resumed", "style", job.output, 3, time.monotonic())
    assert f"step {s.step} of 30" in text and "images/s" in text and "left" in text

    s = job.stop()
    assert gone(job.pid)
    with pytest.raises(ProcessLookupError):
        os.killpg(job.pid, 0)  # nothing of its process group is left either
    assert s.stopped and not s.running and s.adapter is None and s.error is None
    assert jobs.running() is None and not (ctx.adapters / "resumed.safetensors").exists()
    last = int(checkpoints(job.output)[-1].name.split("-")[-1])
    text = train_view.status_text(s, "resumed", "style", job.output, 3, time.monotonic())
    assert text == (
        f"Stopped at step {s.step}. The last checkpoint is at step {last}: tick **Resume** "
        "and press Start to go on from there."
    )
    text = train_view.stopped_text(s, tmp_path, 3)  # a run folder without checkpoints
    assert text.startswith(f"Stopped at step {s.step}, before the first checkpoint")
    assert "Resume" not in text

    form.resume = True
    _, job = start(jobs, ctx, form)
    s = job.wait(timeout=WAIT_S)
    assert s.error is None and not s.running, s
    assert s.step == 30 and s.steps[-(30 - last) :] == list(range(last + 1, 31))  # every step
    # issue 32: the whole run's curve across Resume, from step 1, each step once
    assert s.steps[0] == 1 and s.steps == sorted(set(s.steps)) and len(s.steps) == len(s.losses)
    assert len(s.steps) > 30 - last
    assert [step for step, _ in s.recent][-2:] == [29, 30] and all(np.isfinite(s.losses))
    assert s.adapter == ctx.adapters / "resumed.safetensors" and s.adapter.is_file()
    assert "resumed" in h.list_adapters(ctx)
    text = train_view.status_text(s, "resumed", "style", job.output, 3, time.monotonic())
    assert text.startswith("Done: **resumed** is in the adapters folder")

    # the sample grid, shown at a whole zoom with crisp pixels
    (sample,) = job.samples()
    assert sample.name == "step-000030.png" and Image.open(sample).size == (64, 64)
    html = train_view.samples_html([sample])
    assert 'width="256" height="256"' in html and "image-rendering:pixelated" in html
    assert "step 30 · 4×" in html


# ---------------------------------------------------------------- what the page shows


def test_loss_plot_has_whole_steps_and_a_smoothed_curve():
    losses = [1.0, 0.0, 1.0, 0.0]
    frame = train_view.loss_frame([1, 2, 3, 4], losses)
    assert str(frame["step"].dtype) == "int64"
    assert list(frame["curve"]) == ["loss"] * 4 + ["smoothed"] * 4
    smooth = train_view.smoothed(losses, 0.5)  # bias-corrected EMA: the first value is kept
    np.testing.assert_allclose(smooth, [1.0, 1 / 3, 5 / 7, 5 / 15])
    assert train_view.smoothed([0.3] * 50) == pytest.approx([0.3] * 50)
    long = train_view.loss_frame(list(range(1, 5001)), [0.1] * 5000)
    assert len(long) <= 2 * train_view.PLOT_POINTS and long["step"].iloc[0] == 1


def test_clock():
    assert [train_view.clock(s) for s in [0, 65, 720, 3723]] == ["0:00", "1:05", "12:00", "1:02:03"]


def test_the_loss_log_keeps_the_whole_curve_and_drops_what_a_resume_redid(tmp_path):
    from sdlora.ui.training import _append_loss, read_losses

    log = tmp_path / "run" / ".ui-losses.jsonl"
    assert read_losses(log) == ([], [])
    for step in range(1, 8):  # the first part ran to step 7; its last checkpoint was step 5
        _append_loss(log, step, 1.0 / step)
    for step in range(6, 10):  # the resumed part redoes 6 and 7 from the checkpoint
        _append_loss(log, step, 2.0)
    log.open("a").write("not json\n")
    steps, losses = read_losses(log)
    assert steps == list(range(1, 10))
    assert losses[:5] == [1.0 / s for s in range(1, 6)] and losses[5:] == [2.0] * 4
