"""The web UI's Train form shows every labelled trainer setting (issue 35's loss, noise,
optimizer, LoRA+ and mask options among them) from the declarations, and hands the values
that differ from the defaults to the trainer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sdlora.errors import SdloraError
from sdlora.train.config import OPTIONS
from sdlora.ui import handlers as h
from sdlora.ui import train_setup
from sdlora.ui.train_setup import MORE_SETTINGS, Form

ISSUE_35 = (
    "loss_type", "huber_c", "huber_schedule", "ip_noise_gamma", "multires_noise_iterations",
    "multires_noise_discount", "debiased_estimation", "zero_terminal_snr", "optimizer",
    "optimizer_args", "loraplus_lr_ratio", "masked_loss",
)  # fmt: skip
TOY = dict(lr=1e-3, resolution=64, batch_size=4, rank=2, steps=2)


@pytest.fixture
def ctx(tmp_path) -> h.Context:
    shutil.copytree(
        Path(__file__).parents[1] / "samples" / "style", tmp_path / "datasets" / "style"
    )
    return h.Context("toy", tmp_path / "adapters", tmp_path / "datasets", tmp_path / "outputs")


def test_the_new_options_are_under_more_settings_by_their_labels():
    assert set(ISSUE_35) <= set(MORE_SETTINGS)
    assert not set(MORE_SETTINGS) & set(train_setup.FORM_SETTINGS)
    assert all(OPTIONS[name].label for name in MORE_SETTINGS)


def test_the_page_shows_them_in_groups(tmp_path):
    import gradio as gr

    from sdlora.ui.app import build_app

    folders = [tmp_path / name for name in ("adapters", "datasets", "outputs")]
    app = build_app("toy", *folders, device="cpu")
    blocks = {b.elem_id: b for b in app.blocks.values() if getattr(b, "elem_id", None)}
    for name in ISSUE_35:
        control = blocks["train-" + name.replace("_", "-")]
        assert control.label == OPTIONS[name].label
    assert isinstance(blocks["train-loss-type"], gr.Dropdown)
    assert blocks["train-loss-type"].value == "l2" and blocks["train-huber-c"].value == 0.1
    assert isinstance(blocks["train-masked-loss"], gr.Checkbox)
    headings = [b.value for b in app.blocks.values() if isinstance(b, gr.Markdown)]
    assert "**Optimisation**" in headings and "**Images and captions**" in headings


def test_changed_values_reach_the_trainer_and_defaults_do_not(ctx):
    defaults = Form(**TOY).values()
    form = Form.of(defaults)  # every More-settings control at its default: nothing added
    run = train_setup.checked_run(ctx, "toy", "style", form)
    assert not set(MORE_SETTINGS) & set(run.settings)
    more = dict(form.more, loss_type="huber", huber_c=0.2, loraplus_lr_ratio=16.0)
    more.update(optimizer_args="weight_decay=0.1", multires_noise_iterations=6.0)
    run = train_setup.checked_run(ctx, "toy", "style", Form(**TOY, more=more))
    assert {k: run.settings[k] for k in MORE_SETTINGS if k in run.settings} == {
        "loss_type": "huber", "huber_c": 0.2, "loraplus_lr_ratio": 16.0,
        "optimizer_args": ["weight_decay=0.1"], "multires_noise_iterations": 6,
    }  # fmt: skip
    # a run's settings come back into the same form (a page that finds the run going)
    _, shown = train_setup.form_of(run.settings, ctx)
    assert shown.values()[: len(defaults) - len(MORE_SETTINGS)][-2:] == [False, False]
    assert Form.of(shown.values()).more["huber_c"] == 0.2
    assert Form.of(shown.values()).more["optimizer_args"] == "weight_decay=0.1"
    # the trainer's refusals come in the form's words
    with pytest.raises(SdloraError, match="Huber c is the threshold of Loss huber or smooth_l1"):
        train_setup.checked_run(ctx, "toy", "style", Form(**TOY, more={"huber_c": 0.3}))
