"""The Train tab: train a LoRA on a dataset folder in its own process, with live loss and samples.

The finished adapter is copied into the adapters folder, where the Mix and Inspect tabs find it.
Settings start at the base's values (`sdlora.recommend.training_start`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import gradio as gr
import pandas as pd
from sdlora.ui import handlers as h
from sdlora.ui.common import FREE, JOB, guard
from sdlora.ui.state import TrainSlot

from sdlora.errors import SdloraError
from sdlora.layer import NONLINEARITIES
from sdlora.recommend import training_start


@dataclass
class TrainTab:
    dataset_dd: gr.Dropdown
    refresh_data: gr.Button
    name: gr.Textbox
    trigger: gr.Textbox
    rank: gr.Slider
    nonlinearity: gr.Dropdown
    steps: gr.Number
    lr: gr.Number
    resolution: gr.Number
    batch_size: gr.Slider
    seed: gr.Number
    train_te: gr.Checkbox
    sample_every: gr.Number
    sample_prompt: gr.Textbox
    resume: gr.Checkbox
    overwrite: gr.Checkbox
    start_btn: gr.Button
    stop_btn: gr.Button
    status: gr.Markdown
    loss_plot: gr.LinePlot
    sample_img: gr.Image

    @property
    def settings(self) -> list:
        """The form, in `handlers.start_training` order after base and dataset."""
        return [
            self.name,
            self.trigger,
            self.rank,
            self.nonlinearity,
            self.steps,
            self.lr,
            self.resolution,
            self.batch_size,
            self.train_te,
            self.sample_every,
            self.sample_prompt,
            self.seed,
            self.resume,
            self.overwrite,
        ]


def layout(ctx: h.Context, base: str) -> TrainTab:
    start = training_start(base)
    gr.Markdown(
        "Train a LoRA on a folder of images (captions in `.txt` files beside them). "
        "The run goes to `train/<name>/` in the outputs folder; the finished adapter "
        "appears in the Mix tab. Stop keeps the last checkpoint: tick resume to go on."
    )
    with gr.Row():
        dataset_dd = gr.Dropdown(
            h.list_datasets(ctx), label="Dataset folder", scale=3, elem_id="dataset"
        )
        refresh_data = gr.Button("Refresh", size="sm", scale=1, min_width=80)
        name = gr.Textbox(label="Adapter name (default: the folder's name)", elem_id="train-name")
        trigger = gr.Textbox(label="Trigger word (optional)")
    with gr.Row():
        rank = gr.Slider(1, 128, value=8, step=1, label="Rank")
        nonlinearity = gr.Dropdown(list(NONLINEARITIES), value="identity", label="Nonlinearity")
        steps = gr.Number(200, precision=0, label="Steps", elem_id="train-steps")
        lr = gr.Number(start.lr, label="Learning rate", elem_id="train-lr")
    with gr.Row():
        resolution = gr.Number(
            start.resolution, precision=0, step=64, label="Resolution", elem_id="resolution"
        )
        batch_size = gr.Slider(
            1, 16, value=start.batch_size, step=1, label="Batch size", elem_id="batch-size"
        )
        seed = gr.Number(0, precision=0, label="Seed")
        train_te = gr.Checkbox(False, label="Also train the text encoder")
    with gr.Row():
        sample_every = gr.Number(
            0, precision=0, label="Sample every N steps (0 = never)", elem_id="sample-every"
        )
        sample_prompt = gr.Textbox(label="Sample prompt (default: a training caption)")
        resume = gr.Checkbox(False, label="Resume the last run of this name")
        overwrite = gr.Checkbox(False, label="Overwrite")
    with gr.Row():
        start_btn = gr.Button("Start training", variant="primary", elem_id="train-start")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="train-stop")
    status = gr.Markdown(elem_id="train-status")
    with gr.Row():
        loss_plot = gr.LinePlot(x="step", y="loss", label="Loss", height=260)
        sample_img = gr.Image(label="Latest samples", type="filepath", format="png")
    return TrainTab(
        dataset_dd,
        refresh_data,
        name,
        trigger,
        rank,
        nonlinearity,
        steps,
        lr,
        resolution,
        batch_size,
        seed,
        train_te,
        sample_every,
        sample_prompt,
        resume,
        overwrite,
        start_btn,
        stop_btn,
        status,
        loss_plot,
        sample_img,
    )


def wire(
    ctx: h.Context,
    tab: TrainTab,
    train_slot: gr.State,
    base_dd: gr.Dropdown,
    adapter_lists: list[gr.Dropdown],
) -> None:
    """Train on the Mix tab's base; `adapter_lists` (Mix, Inspect) get the new adapter."""

    @guard
    def on_train(
        slot: TrainSlot,
        base: str,
        dataset: str,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio injects it)
        *settings,
    ):
        if slot.job is not None and slot.job.status().running:
            raise SdloraError("a training run of yours is already going; stop it first")
        slot.job = job = h.start_training(ctx, base, dataset, *settings)
        progress(0.0, desc="starting")
        while True:
            status = job.status()
            progress((status.step, status.total), desc="training", unit="steps")
            plot = pd.DataFrame({"step": status.steps, "loss": status.losses})
            sample = job.latest_sample()
            if not status.running:
                break
            last = status.messages[-1] if status.messages else "loading the base"
            text = f"step {status.step} of {status.total} · {last}"
            yield plot, str(sample) if sample else None, text, gr.Dropdown(), gr.Dropdown()
            time.sleep(1.0)
        if status.error:
            raise SdloraError(status.error)
        if status.stopped:
            text = f"Stopped at step {status.step}; tick resume and start to go on."
        else:
            text = f"Done: **{status.adapter.stem}** is in the adapters folder (Mix tab)."
        names = h.list_adapters(ctx)
        yield (
            plot,
            str(sample) if sample else None,
            text,
            gr.Dropdown(choices=names),
            gr.Dropdown(choices=names),
        )

    def on_stop(slot: TrainSlot) -> str:
        slot.stop()
        return "Stopping…"

    def on_pick_base(base: str) -> tuple:
        """The visitor picked another base: resolution, batch size and rate move to its values."""
        start = training_start(base)
        return (
            gr.Number(value=start.resolution),
            gr.Slider(value=start.batch_size),
            gr.Number(value=start.lr),
        )

    tab.refresh_data.click(
        lambda: gr.Dropdown(choices=h.list_datasets(ctx)), None, tab.dataset_dd, **FREE
    )
    tab.start_btn.click(
        on_train,
        [train_slot, base_dd, tab.dataset_dd, *tab.settings],
        [tab.loss_plot, tab.sample_img, tab.status, *adapter_lists],
        **JOB,
    )
    tab.stop_btn.click(on_stop, train_slot, tab.status, **FREE)
    base_dd.input(on_pick_base, base_dd, [tab.resolution, tab.batch_size, tab.lr], **FREE)
