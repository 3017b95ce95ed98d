"""The Train tab: train a LoRA on a dataset folder in its own process, with live loss and samples.

The run is the server's (`jobs.JOBS`), not the page's: Start returns at once, the page then
watches the run with a timer, and a reloaded page or another browser finds the running one and
can watch and stop it. Runs take no place in the generation queue, so visitors keep
generating while one trains. The finished adapter is copied into the adapters folder, where the
Mix and Inspect tabs find it. Settings start at the base's values
(`sdlora.bases.recommend.training_start`). Mistakes are written into the tab's status line, in the
form's words, and leave the other components alone.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import gradio as gr

from sdlora.bases.recommend import training_start
from sdlora.errors import SdloraError
from sdlora.train.config import FIELDS, OPTIONS, kind_of
from sdlora.ui import handlers as h
from sdlora.ui import train_setup, train_view
from sdlora.ui.common import FREE
from sdlora.ui.jobs import JOBS, Busy
from sdlora.ui.train_setup import MORE_SETTINGS, Form, shown_value
from sdlora.ui.training import TrainJob

logger = logging.getLogger(__name__)
MIN_AXIS = 20  # the loss plot's x axis spans at least 0..20: whole-step ticks from the start
POLL_S = 1.0  # how often a watching page asks for news (each ask is a quick, queue-free event)
MAX_NOTES = 3  # the trainer's latest warnings shown under the status line


@dataclass(frozen=True)
class Watch:
    """Which run this page shows, and how much of it the page has already got."""

    job_id: str | None = None
    losses: int = -1  # losses already plotted (-1: the plot is not this run's yet)
    samples: int = -1  # sample grids already in the gallery
    finished: bool = False  # the end of the run has been shown
    note: str = ""  # an answer to this page's last Start, kept above the run's status


@dataclass
class TrainTab:
    dataset_dd: gr.Dropdown
    refresh_data: gr.Button
    preview_text: gr.Markdown
    preview: gr.Gallery
    caption_model: gr.Textbox
    caption_btn: gr.Button
    name: gr.Textbox
    trigger: gr.Textbox
    rank: gr.Number
    nonlinearity: gr.Dropdown
    steps: gr.Number
    lr: gr.Number
    resolution: gr.Number
    batch_size: gr.Number
    seed: gr.Number
    train_te: gr.Checkbox
    sample_every: gr.Number
    sample_prompt: gr.Textbox
    resume: gr.Checkbox
    overwrite: gr.Checkbox
    start_btn: gr.Button
    stop_btn: gr.Button
    attach_btn: gr.Button
    status: gr.Markdown
    loss_plot: gr.LinePlot
    samples: gr.HTML
    more: dict = field(default_factory=dict)  # MORE_SETTINGS -> its control

    @property
    def form(self) -> list:
        """The form's controls, in `train_setup.Form.values()` order."""
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
            *(self.more[name] for name in MORE_SETTINGS),
        ]


def control(setting: str, value=None, **kw) -> gr.components.Component:
    """The form's control for a trainer setting, labelled as its declaration says
    (train/config.py), a number's help and bounds written under it. The trainer's own check is
    the one judge of a value (a refusal is worded in the status line)."""
    spec = OPTIONS[setting]
    kind, _ = kind_of(FIELDS[setting])
    kw = {"label": spec.label, **kw}
    if kind == "bool":
        return gr.Checkbox(value, **kw)
    if spec.choices is not None:
        return gr.Dropdown(list(spec.choices), value=value, **kw)
    if kind in ("int", "float"):
        kw.setdefault("info", train_setup.field_note(setting, None))
        if kind == "int":  # no precision=0: it would round 2.5 to 2 silently; Start refuses it
            kw.setdefault("step", 1)
        return gr.Number(value, **kw)
    if spec.default_text is not None:
        kw.setdefault("placeholder", spec.default_text)
    return gr.Textbox(value or "", **kw)


def more_settings_controls() -> dict:
    """An accordion of every labelled setting the form has no place for (loss, noise,
    optimizer, masks, ...), by --help group, each at its default; MORE_SETTINGS -> control."""
    groups: dict[str, list[str]] = {}
    for name in MORE_SETTINGS:
        groups.setdefault(OPTIONS[name].group, []).append(name)
    controls = {}
    with gr.Accordion("More settings", open=False, elem_id="train-more"):
        for group, names in groups.items():
            gr.Markdown(f"**{group[:1].upper()}{group[1:]}**")
            for start in range(0, len(names), 4):
                with gr.Row():
                    for name in names[start : start + 4]:
                        elem_id = "train-" + name.replace("_", "-")
                        controls[name] = control(name, shown_value(name, None), elem_id=elem_id)
    return controls


def layout(ctx: h.Context, base: str) -> TrainTab:
    start = training_start(base)
    gr.Markdown(
        "Train a LoRA on a folder of images (captions in `.txt` files beside them). "
        "The run goes to `train/<name>/` in the outputs folder; the finished adapter "
        "appears in the Mix tab. It keeps running when you leave the page: come back to watch "
        "or stop it. Stop keeps the last checkpoint: tick Resume to go on."
    )
    with gr.Row():
        dataset_dd = gr.Dropdown(
            h.list_datasets(ctx), value=None, label="Dataset folder", scale=3, elem_id="dataset"
        )
        refresh_data = gr.Button("Refresh", size="sm", scale=1, min_width=80)
        name = control("name", elem_id="train-name")
        trigger = control("trigger", placeholder="optional")
    preview_text = gr.Markdown(elem_id="dataset-info")
    preview = gr.Gallery(
        label="Dataset",
        columns=8,
        height=240,
        object_fit="contain",
        format="png",
        visible=False,
        elem_id="dataset-preview",
    )
    with gr.Row():
        caption_model = gr.Textbox(
            label="Captioning model",
            placeholder="Salesforce/blip-image-captioning-large or a folder",
            info="writes IMAGE.txt for the images that have no caption (sdlora caption)",
            scale=3,
            elem_id="caption-model",
        )
        caption_btn = gr.Button("Caption missing images", scale=1, elem_id="caption-missing")
    with gr.Row():
        rank = control("rank", Form.rank)
        nonlinearity = control("nonlinearity", Form.nonlinearity)
        steps = control("steps", Form.steps, elem_id="train-steps")
        lr = control("lr", start.lr, elem_id="train-lr")
    with gr.Row():
        resolution = control("resolution", start.resolution, step=64, elem_id="resolution")
        batch_size = control("batch_size", start.batch_size, elem_id="batch-size")
        seed = control("seed", Form.seed)
        train_te = control("train_text_encoder", Form.train_text_encoder)
    with gr.Row():
        sample_every = control("sample_every", Form.sample_every, elem_id="sample-every")
        sample_prompt = control("sample_prompts")
        resume = control("resume", False, info="continue the last run of this name")
        overwrite = control("overwrite", False)
    more = more_settings_controls()
    with gr.Row():
        start_btn = gr.Button("Start training", variant="primary", elem_id="train-start")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="train-stop")
        attach_btn = gr.Button("Watch the running training", visible=False, elem_id="train-attach")
    status = gr.Markdown(elem_id="train-status")
    with gr.Row():
        loss_plot = gr.LinePlot(
            x="step",
            y="loss",
            color="curve",
            color_map={"loss": "#9ca3af", "smoothed": "#ea580c"},
            label="Loss: each step (grey), smoothed (orange)",
            height=320,
            x_axis_format="d",
            elem_id="loss-plot",
        )
        with gr.Column():
            gr.Markdown("Samples, newest first (at the base's recommended guidance and steps)")
            samples = gr.HTML("", elem_id="train-samples", max_height=560, padding=False)
    return TrainTab(
        dataset_dd,
        refresh_data,
        preview_text,
        preview,
        caption_model,
        caption_btn,
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
        attach_btn,
        status,
        loss_plot,
        samples,
        more,
    )


def show(job_id: str | None, watch: Watch, ctx: h.Context) -> tuple:
    """What changed on a page that watches run `job_id` and has already got `watch`:
    (watch, status, loss plot, samples, timer, attach button, Mix adapters, Inspect adapters)."""
    job: TrainJob | None = JOBS.get(job_id)
    if job is None:
        return (Watch(), gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=False), *[gr.skip()] * 3)
    if watch.job_id != job_id:
        watch = Watch(job_id)
    s = job.status()
    if s.error:
        s = replace(s, error=train_setup.ui_words(s.failure(), ctx))
    out_status = train_view.status_text(
        s,
        job.settings["name"],
        job.label,
        job.output,
        job.settings["save_every"],
        time.monotonic(),
        job.settings.get("sample_every", 0),
    )
    plot = gr.skip()
    if len(s.losses) != watch.losses:
        plot = gr.LinePlot(
            value=train_view.loss_frame(s.steps, s.losses), x_lim=[0, max(s.step, MIN_AXIS)]
        )
    found = job.samples()
    gallery = gr.skip()
    if len(found) != watch.samples:
        gallery = train_view.samples_html(found)
    lists = [gr.skip(), gr.skip()]
    done = not s.running
    if done:  # "Not started: a run is going" and the like are stale once the run is over
        watch = replace(watch, note="")
    if done and not watch.finished and s.adapter is not None:
        names = h.list_adapters(ctx)
        lists = [gr.Dropdown(choices=names), gr.Dropdown(choices=names)]
    notes = [train_setup.ui_words(w, ctx) for w in dict.fromkeys(s.warnings)]
    out_status = "\n\n".join([watch.note, out_status, *notes[-MAX_NOTES:]]).strip()
    watch = replace(watch, losses=len(s.losses), samples=len(found), finished=done)
    timer = gr.Timer(active=not done)
    return (watch, out_status, plot, gallery, timer, gr.Button(visible=False), *lists)


def number_note(setting: str, value) -> gr.Number:
    """The control of `setting` with its note for `value` (train_setup.field_note)."""
    return gr.Number(info=train_setup.field_note(setting, value))


def quietly(fn: Callable[..., tuple], n: int, status_at: int = 1) -> Callable[..., tuple]:
    """`fn`, but an unexpected error is logged and written into the status line (output
    `status_at` of `n`) instead of putting Gradio's error overlay on the tab's components."""

    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except Exception as err:
            logger.exception("unexpected error in %s", fn.__name__)
            out = [gr.skip()] * n
            out[status_at] = f"**Something went wrong:** {type(err).__name__}: {err}"
            return tuple(out)

    return wrapper


def wire(
    ctx: h.Context,
    tab: TrainTab,
    app: gr.Blocks,
    base_dd: gr.Dropdown,
    adapter_lists: list[gr.Dropdown],
) -> None:
    """Train on the Mix tab's base; `adapter_lists` (Mix, Inspect) get the new adapter."""
    watch_state = gr.State(Watch())
    timer = gr.Timer(POLL_S, active=False)
    view = [
        watch_state,
        tab.status,
        tab.loss_plot,
        tab.samples,
        timer,
        tab.attach_btn,
        *adapter_lists,
    ]
    unchanged = (gr.skip(),) * (len(view) - 2)

    def said(text: str, watch: Watch) -> tuple:
        """Only the status line changes (a mistake or a note); the page keeps what it shows.
        A page that watches a run keeps the note above the run's status until the next Start."""
        job = JOBS.get(watch.job_id)
        if job is not None and job.status().running:
            return show(watch.job_id, replace(watch, note=text), ctx)
        return (watch, text, *unchanged)

    def on_start(watch: Watch, base: str, dataset: str, *form) -> tuple:
        try:
            run = train_setup.checked_run(
                ctx, h.resolve_base(ctx, base), dataset, Form.of(list(form))
            )
            job_id = JOBS.start(
                lambda: TrainJob(
                    run.settings,
                    run.output,
                    install_to=ctx.adapters,
                    label=f"{dataset} ({run.images} images)",
                )
            )
        except Busy as err:
            if watch.job_id == err.job_id:  # this page shows that run already
                return said(f"**Not started:** {err}.", watch)
            note = f"**Not started:** {err}."
            return (watch, note, *unchanged[:3], gr.Button(visible=True), *unchanged[4:])
        except SdloraError as err:
            return said(f"**Not started:** {train_setup.ui_words(err, ctx)}", watch)
        return show(job_id, Watch(), ctx)

    def on_tick(watch: Watch) -> tuple:
        return show(watch.job_id, watch, ctx)

    keep_form = (gr.skip(),) * (1 + len(tab.form))

    def attach(job_id: str) -> tuple:
        """Show run `job_id`, with its settings in the form (ready for Resume after a Stop)."""
        dataset, form = train_setup.form_of(JOBS.get(job_id).settings, ctx)
        return (*show(job_id, Watch(), ctx), dataset, *form.values())

    def on_attach(watch: Watch) -> tuple:
        job_id = JOBS.running()
        if job_id is None:
            return (*said("No training is running now.", watch), *keep_form)
        return attach(job_id)

    def on_load(watch: Watch) -> tuple:
        """A page (re)loaded while a run is going shows that run."""
        job_id = JOBS.running()
        return attach(job_id) if job_id else (*said("", watch), *keep_form)

    def on_stop(watch: Watch) -> tuple:
        job_id = watch.job_id if watch.job_id and JOBS.get(watch.job_id) else JOBS.running()
        job = JOBS.get(job_id)
        if job is None or not job.status().running:
            return said("No training is running now.", watch)
        job.stop()
        return show(job_id, watch, ctx)

    def on_dataset(dataset: str, resolution: float) -> tuple:
        if not dataset:
            return "", gr.Gallery(visible=False)
        try:
            found = train_setup.preview(ctx, dataset, int(resolution or 0) or 512)
        except SdloraError as err:
            said = train_setup.ui_words(err, ctx)
            return f"**Cannot train on this folder:** {said}", gr.Gallery(value=[], visible=False)
        return found.summary(), gr.Gallery(value=found.thumbnails, visible=True)

    def on_caption(
        dataset: str,
        model: str,
        resolution: float,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio injects it)
    ) -> tuple:
        """Caption the images without one, then show the preview again with the new captions."""
        try:
            done = train_setup.caption_missing(
                ctx, dataset, model, progress=lambda b: progress.tqdm(b, desc="captioning")
            )
        except SdloraError as err:
            return f"**Not captioned:** {train_setup.ui_words(err, ctx)}", gr.skip()
        text, gallery = on_dataset(dataset, resolution)
        return f"{done}\n\n{text}", gallery

    def on_pick_base(base: str) -> tuple:
        """The visitor picked another base: resolution, batch size and rate move to its values."""
        start = training_start(base)
        return (
            gr.Number(value=start.resolution),
            gr.Number(value=start.batch_size),
            gr.Number(value=start.lr),
        )

    numbers = {
        "rank": tab.rank,
        "steps": tab.steps,
        "lr": tab.lr,
        "resolution": tab.resolution,
        "batch_size": tab.batch_size,
        "seed": tab.seed,
        "sample_every": tab.sample_every,
        **tab.more,
    }
    for setting, box in numbers.items():
        if isinstance(box, gr.Number):  # a value out of range is named beside its field at once
            box.change(functools.partial(number_note, setting), box, box, **FREE)

    tab.refresh_data.click(
        lambda: gr.Dropdown(choices=h.list_datasets(ctx)), None, tab.dataset_dd, **FREE
    )
    tab.dataset_dd.change(
        quietly(on_dataset, 2, 0),
        [tab.dataset_dd, tab.resolution],
        [tab.preview_text, tab.preview],
        **FREE,
    )
    tab.caption_btn.click(
        on_caption,
        [tab.dataset_dd, tab.caption_model, tab.resolution],
        [tab.preview_text, tab.preview],
    )
    tab.start_btn.click(
        quietly(on_start, len(view)),
        [watch_state, base_dd, tab.dataset_dd, *tab.form],
        view,
        **FREE,
    )
    timer.tick(quietly(on_tick, len(view)), watch_state, view, **FREE)
    with_form = [*view, tab.dataset_dd, *tab.form]
    tab.attach_btn.click(quietly(on_attach, len(with_form)), watch_state, with_form, **FREE)
    tab.stop_btn.click(quietly(on_stop, len(view)), watch_state, view, **FREE)
    app.load(quietly(on_load, len(with_form)), watch_state, with_form, **FREE)
    base_dd.input(on_pick_base, base_dd, [tab.resolution, tab.batch_size, tab.lr], **FREE)
