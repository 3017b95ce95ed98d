"""The Train tab's status line (issue 32, item 11): what the trainer is busy with between steps,
an ETA that does not swing, and notes that do not outlive the run. Pure functions and a fake
job: no child process, no browser."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sdlora.ui import tab_train, train_view
from sdlora.ui.jobs import JOBS
from sdlora.ui.training import SPEED_WINDOW, Status


def run_status(times: list[float], total: int) -> Status:
    """The status after steps 1..len(times), step k ending at times[k-1]."""
    recent = list(enumerate(times, start=1))[-(SPEED_WINDOW + 1) :]
    return Status(
        total=total,
        images_per_step=1,
        started=0.0,
        step=len(times),
        first_step_at=times[0],
        recent=recent,
    )


def test_busy_says_what_the_trainer_writes_after_a_step():
    assert train_view.busy(30, save_every=10, sample_every=0) == "saving checkpoint…"
    assert train_view.busy(25, save_every=10, sample_every=25) == "drawing samples…"
    assert train_view.busy(50, 10, 25) == "saving checkpoint, then drawing samples…"
    assert train_view.busy(7, 10, 25) == ""
    s = run_status([float(k) for k in range(1, 21)], total=100)
    text = train_view.status_text(s, "cat", "cats", Path("/nowhere"), 10, 21.0, sample_every=0)
    assert "step 20 of 100, saving checkpoint…" in text
    text = train_view.status_text(s, "cat", "cats", Path("/nowhere"), 7, 21.0, sample_every=0)
    assert "…" not in text


def test_eta_does_not_swing_when_samples_and_checkpoints_pause_the_run():
    """Rule: steps take 1 s, and every 10th step is followed by a 20 s pause (samples and a
    checkpoint). From step 5 on, the ETA stays within 1.5 s of (steps left) × 1 s, so it falls
    by about one second a step and never jumps (the mean over the window said 4:27 for 1:29 at
    step 11)."""
    total, times, now = 100, [], 0.0
    for step in range(1, total):
        now += 1.0
        times.append(now)
        if step % 10 == 0:
            now += 20.0
        if step >= 5:
            eta = run_status(times, total).eta_s()
            assert eta == pytest.approx(total - step, abs=1.5), step
    s = run_status(times, total)
    assert s.steps_per_s() == pytest.approx(1.0, rel=0.01)


@dataclass
class FakeJob:
    status_now: Status
    output: Path
    settings: dict = field(default_factory=lambda: {"name": "cat", "save_every": 10})
    label: str = "cats"

    def status(self) -> Status:
        return self.status_now

    def samples(self) -> list[Path]:
        return []


def test_a_note_above_the_status_is_cleared_when_the_run_stops(tmp_path, monkeypatch):
    s = run_status([1.0, 2.0, 3.0], total=100)
    job = FakeJob(s, tmp_path)
    monkeypatch.setitem(JOBS._jobs, "job-1", job)
    note = "**Not started:** a training is running."
    watch = tab_train.Watch("job-1", note=note)
    watch, text, *_ = tab_train.show("job-1", watch, ctx=None)
    assert text.startswith(note)  # while it runs, the answer to the click stays in view
    job.status_now = Status(100, 1, 0.0, step=3, first_step_at=1.0, stopped=True, running=False)
    watch, text, *_ = tab_train.show("job-1", watch, ctx=None)
    assert "Not started" not in text and text.startswith("Stopped at step 3")
    assert watch.note == ""


# ------------------------------------------------ the form's numbers (issue 32, item 13)


def test_a_number_out_of_range_is_named_beside_its_field_with_the_clis_bounds():
    from sdlora.train.config import MAX_LR, OPTIONS
    from sdlora.ui.train_setup import field_note

    lr = OPTIONS["lr"]
    assert (lr.above, lr.max) == (0, MAX_LR)  # the CLI's declaration: the form's only bounds
    plain = field_note("lr", None)
    assert "positive, at most 1" in plain and not plain.startswith("⚠")
    assert field_note("lr", 1e-4) == plain
    assert field_note("lr", MAX_LR) == plain
    for bad in (5.0, MAX_LR * 1.001, 0.0, -1e-4, float("nan")):
        note = field_note("lr", bad)
        assert note.startswith("⚠ Learning rate must be positive, at most 1 (got"), note
        assert "Start refuses it" in note
    assert field_note("steps", 300.0) == field_note("steps", None)  # whole floats are fine
    assert field_note("steps", 2.5).startswith("⚠ Steps must be a whole number (got 2.5)")
    assert field_note("steps", 0).startswith("⚠ Steps must be from 1 to")
    assert field_note("resolution", 65).startswith("⚠ Resolution must be a multiple of 64")


def test_the_forms_number_controls_neither_round_nor_clamp():
    """precision=0 would turn 2.5 into 2 and minimum/maximum would clamp or overlay an error:
    the controls keep what was typed, and the note says what is wrong."""
    import gradio as gr

    with gr.Blocks():
        steps = tab_train.control("steps", 200)
        lr = tab_train.control("lr", 1e-4)
    for box in (steps, lr):
        assert box.precision is None and box.minimum is None and box.maximum is None
    assert tab_train.number_note("lr", 5.0).info.startswith("⚠ Learning rate")


def test_every_number_of_the_train_form_gets_its_note_on_change(tmp_path):
    import functools

    from sdlora.ui.app import build_app
    from sdlora.ui.train_setup import MORE_SETTINGS

    app = build_app("toy", tmp_path / "a", tmp_path / "d", tmp_path / "o", device="cpu")
    noted = {
        fn.fn.args[0]
        for fn in app.fns.values()
        if isinstance(fn.fn, functools.partial) and fn.fn.func is tab_train.number_note
    }
    numbers = {
        n for n in MORE_SETTINGS if tab_train.kind_of(tab_train.FIELDS[n])[0] in ("int", "float")
    }
    assert {"lr", "steps", "rank", "resolution", "batch_size", "seed", "sample_every"} <= noted
    assert numbers <= noted
