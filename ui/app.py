"""The mixer web UI: `build_app(...) -> gr.Blocks` with the tabs Mix, Compare, Export, Train, Inspect.

Layout and wiring only; what each button does lives in `handlers`. Per-visitor state is in
`gr.State` (their base and mix, their training job); the models are shared through one `Engine`
and every job that touches them runs in the "gpu" concurrency group, one at a time. User
mistakes arrive as `SdloraError`s and are shown as messages, never as tracebacks.

API endpoints for `gradio_client` (see README): `/generate`, `/export`, `/inspect`,
`/upload_adapter`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable
from pathlib import Path

import gradio as gr
import pandas as pd
from sdlora.ui import handlers as h
from sdlora.ui.api import add_api
from sdlora.ui.engine import Engine
from sdlora.ui.state import MAX_ADAPTERS, Session, TrainSlot, stop_training

from sdlora.errors import SdloraError
from sdlora.generate import SCHEDULERS
from sdlora.layer import NONLINEARITIES

logger = logging.getLogger(__name__)
GPU = "gpu"  # concurrency group of every job that runs the models: one at a time
FREE = dict(concurrency_limit=None, api_visibility="private")  # quick state-only events
NO_SECOND = "(none)"  # the Compare tab's "no Y adapter" choice


def guard(fn: Callable) -> Callable:
    """Show SdloraError (and anything unexpected) as a message in the page, not a traceback."""

    def translate(err: Exception) -> gr.Error:
        if isinstance(err, gr.Error):
            return err
        if isinstance(err, SdloraError):
            return gr.Error(str(err), print_exception=False)
        logger.exception("unexpected error in %s", fn.__name__)
        return gr.Error(f"{type(err).__name__}: {err}", print_exception=False)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def wrapper_gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as err:
                raise translate(err) from None

        return wrapper_gen

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            raise translate(err) from None

    return wrapper


def _progress(progress: gr.Progress) -> Callable[[float, str], None]:
    return lambda fraction, text: progress(fraction, desc=text)


def _sync(session: Session, base: str, values: tuple) -> Session:
    """Copy the on boxes and strength sliders (values = ons then strengths) into the session."""
    ons, strengths = values[:MAX_ADAPTERS], values[MAX_ADAPTERS:]
    session.base = base or session.base
    for i, item in enumerate(session.mix):
        item.enabled = bool(ons[i])
        item.strength = float(strengths[i])
    return session


def build_app(
    base: str = "toy",
    adapters_dir: str | Path = "adapters",
    datasets_dir: str | Path = "samples",
    outputs_dir: str | Path = "outputs",
    device: str | None = None,
    max_upload_mb: int = 2048,
) -> gr.Blocks:
    """The mixer UI over the given base and folders; nothing outside these folders is touched."""
    ctx = h.Context(
        base=base,
        adapters=Path(adapters_dir),
        datasets=Path(datasets_dir),
        outputs=Path(outputs_dir),
        engine=Engine(device),
        max_upload_bytes=max_upload_mb * 2**20,
    )
    # Results are served straight from the outputs folder (no copies into Gradio's cache).
    gr.set_static_paths([ctx.outputs])

    with gr.Blocks(title="sdlora mixer", analytics_enabled=False) as app:
        session = gr.State(Session(base=base))
        train_slot = gr.State(TrainSlot(), delete_callback=stop_training)
        gr.Markdown(
            "## sdlora mixer\nBlend LoRA adapters with exact strengths, generate, compare, "
            "export, train. "
            f"Adapters: `{ctx.adapters}` · datasets: `{ctx.datasets}` · outputs: `{ctx.outputs}`"
        )
        with gr.Tabs():
            # ------------------------------------------------------------ Mix
            with gr.Tab("Mix", id="mix"):
                with gr.Row():
                    with gr.Column(scale=2, min_width=380):
                        base_dd = gr.Dropdown(
                            h.base_choices(ctx), value=base, label="Base model", elem_id="base"
                        )
                        with gr.Row():
                            adapter_dd = gr.Dropdown(
                                h.list_adapters(ctx),
                                value=None,
                                label="Adapter file",
                                elem_id="adapter-pick",
                                scale=4,
                            )
                            refresh_btn = gr.Button("Refresh", size="sm", scale=1, min_width=80)
                        with gr.Row():
                            add_btn = gr.Button("Add to mix", elem_id="add-adapter")
                            upload_btn = gr.UploadButton(
                                "Upload .safetensors",
                                file_types=[".safetensors"],
                                file_count="single",
                                elem_id="upload",
                            )
                        slots = []
                        for i in range(MAX_ADAPTERS):
                            with gr.Group(visible=False, elem_id=f"slot-{i}") as box:
                                with gr.Row(equal_height=True):
                                    on = gr.Checkbox(
                                        True, label="on", scale=0, min_width=70, elem_id=f"on-{i}"
                                    )
                                    strength = gr.Slider(
                                        0,
                                        1,
                                        value=1.0,
                                        step=0.01,
                                        label="strength",
                                        scale=5,
                                        elem_id=f"strength-{i}",
                                    )
                                    remove = gr.Button(
                                        "Remove",
                                        size="sm",
                                        scale=0,
                                        min_width=80,
                                        elem_id=f"remove-{i}",
                                    )
                                meta = gr.Markdown(elem_id=f"meta-{i}")
                                words = gr.Dataset(
                                    components=["textbox"],
                                    samples=[],
                                    label="Trigger words (click to add to the prompt)",
                                    type="values",
                                    visible=False,
                                )
                            slots.append((box, on, strength, remove, meta, words))
                    with gr.Column(scale=3, min_width=420):
                        prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                        negative = gr.Textbox(label="Negative prompt", elem_id="negative")
                        with gr.Row():
                            steps = gr.Slider(
                                1, 150, value=25, step=1, label="Steps", elem_id="steps"
                            )
                            guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance")
                        with gr.Row(equal_height=True):
                            seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
                            dice = gr.Button("Random seed", size="sm")
                            scheduler = gr.Dropdown(
                                list(SCHEDULERS), value="pndm", label="Scheduler"
                            )
                        with gr.Row():
                            width = gr.Number(0, precision=0, label="Width (0 = native)")
                            height = gr.Number(0, precision=0, label="Height (0 = native)")
                            num_images = gr.Slider(1, 8, value=1, step=1, label="Images")
                        generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                        gallery = gr.Gallery(
                            label="Images",
                            columns=4,
                            height=420,
                            object_fit="contain",
                            elem_id="gallery",
                            format="png",
                        )
                        mix_status = gr.Markdown(elem_id="mix-status")

            # ------------------------------------------------------------ Compare
            with gr.Tab("Compare", id="compare"):
                gr.Markdown(
                    "Sweep one adapter of your mix over several strengths, or two on an X/Y grid. "
                    "The other adapters keep their strengths; prompt and settings come from Mix; "
                    "every cell uses the same seed."
                )
                with gr.Row():
                    x_dd = gr.Dropdown([], label="X adapter", elem_id="x-adapter")
                    x_vals = gr.Textbox("0, 0.25, 0.5, 0.75, 1", label="X strengths")
                with gr.Row():
                    y_dd = gr.Dropdown(
                        [NO_SECOND],
                        value=NO_SECOND,
                        label="Y adapter (optional)",
                        elem_id="y-adapter",
                    )
                    y_vals = gr.Textbox("0, 0.5, 1", label="Y strengths")
                compare_btn = gr.Button("Make grid", variant="primary", elem_id="compare")
                grid_img = gr.Image(label="Grid", type="filepath", format="png", elem_id="grid")
                compare_status = gr.Markdown()

            # ------------------------------------------------------------ Export
            with gr.Tab("Export", id="export"):
                gr.Markdown(
                    "Write your current mix (Mix tab: base, adapters that are on, strengths) into "
                    "`exports/` of the outputs folder."
                )
                fmt = gr.Radio(
                    [
                        ("diffusers folder", "diffusers"),
                        ("single file (A1111 / ComfyUI checkpoint)", "single-file"),
                        ("one merged LoRA (exact, ranks concatenated)", "lora"),
                    ],
                    value="diffusers",
                    label="Format",
                    elem_id="export-format",
                )
                with gr.Row():
                    dtype = gr.Radio(
                        ["fp16", "bf16", "fp32"], value="fp16", label="dtype (checkpoints)"
                    )
                    export_name = gr.Textbox(
                        label="Name", placeholder="mix-<date>-<time>", elem_id="export-name"
                    )
                    overwrite = gr.Checkbox(False, label="Overwrite")
                export_btn = gr.Button("Export", variant="primary", elem_id="export")
                export_files = gr.File(
                    label="Download", file_count="multiple", elem_id="export-files"
                )
                export_status = gr.Markdown(elem_id="export-status")

            # ------------------------------------------------------------ Train
            with gr.Tab("Train", id="train"):
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
                    train_name = gr.Textbox(
                        label="Adapter name (default: the folder's name)", elem_id="train-name"
                    )
                    trigger = gr.Textbox(label="Trigger word (optional)")
                with gr.Row():
                    rank = gr.Slider(1, 128, value=8, step=1, label="Rank")
                    nonlinearity = gr.Dropdown(
                        list(NONLINEARITIES), value="identity", label="Nonlinearity"
                    )
                    train_steps = gr.Number(200, precision=0, label="Steps", elem_id="train-steps")
                    lr = gr.Number(1e-4, label="Learning rate")
                with gr.Row():
                    resolution = gr.Number(
                        512, precision=0, step=64, label="Resolution", elem_id="resolution"
                    )
                    batch_size = gr.Slider(1, 16, value=1, step=1, label="Batch size")
                    train_seed = gr.Number(0, precision=0, label="Seed")
                    train_te = gr.Checkbox(False, label="Also train the text encoder")
                with gr.Row():
                    sample_every = gr.Number(
                        0,
                        precision=0,
                        label="Sample every N steps (0 = never)",
                        elem_id="sample-every",
                    )
                    sample_prompt = gr.Textbox(label="Sample prompt (default: a training caption)")
                    resume = gr.Checkbox(False, label="Resume the last run of this name")
                    train_overwrite = gr.Checkbox(False, label="Overwrite")
                with gr.Row():
                    start_btn = gr.Button(
                        "Start training", variant="primary", elem_id="train-start"
                    )
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="train-stop")
                train_status = gr.Markdown(elem_id="train-status")
                with gr.Row():
                    loss_plot = gr.LinePlot(x="step", y="loss", label="Loss", height=260)
                    sample_img = gr.Image(label="Latest samples", type="filepath", format="png")

            # ------------------------------------------------------------ Inspect
            with gr.Tab("Inspect", id="inspect"):
                with gr.Row():
                    inspect_dd = gr.Dropdown(
                        h.list_adapters(ctx), label="Adapter", scale=4, elem_id="inspect-pick"
                    )
                    inspect_btn = gr.Button("Inspect", scale=1, elem_id="inspect")
                inspect_out = gr.Code(label="sdlora inspect", language=None, elem_id="inspect-out")

        # ================================================================ wiring
        slot_parts = [
            part for box, on, s, _, meta, words in slots for part in (box, on, s, meta, words)
        ]
        ons = [slot[1] for slot in slots]
        strengths = [slot[2] for slot in slots]
        mix_outputs = [*slot_parts, x_dd, y_dd]

        def render(session: Session) -> list:
            """The adapter rows and the Compare choices for this session's mix."""
            out = []
            for i in range(MAX_ADAPTERS):
                if i >= len(session.mix):
                    out += [
                        gr.Group(visible=False),
                        gr.Checkbox(),
                        gr.Slider(),
                        gr.Markdown(""),
                        gr.Dataset(samples=[], visible=False),
                    ]
                    continue
                item = session.mix[i]
                try:
                    info = h.adapter_info(ctx, item.name)
                    meta, trigger_words = h.summary(info), info["trigger_words"]
                except SdloraError as err:
                    meta, trigger_words = f"⚠ {err}", []
                out += [
                    gr.Group(visible=True),
                    gr.Checkbox(value=item.enabled),
                    gr.Slider(value=item.strength, label=item.name),
                    gr.Markdown(meta),
                    gr.Dataset(samples=[[w] for w in trigger_words], visible=bool(trigger_words)),
                ]
            names = session.names()
            x_value = names[0] if names else None
            out += [
                gr.Dropdown(choices=names, value=x_value),
                gr.Dropdown(choices=[NO_SECOND, *names], value=NO_SECOND),
            ]
            return out

        @guard
        def on_refresh() -> tuple:
            names = h.list_adapters(ctx)
            return (
                gr.Dropdown(choices=names),
                gr.Dropdown(choices=names),
                gr.Dropdown(choices=h.base_choices(ctx)),
            )

        def on_load() -> tuple:
            """Lists as the folders are now: files added since the app started show up on load."""
            return (*on_refresh(), gr.Dropdown(choices=h.list_datasets(ctx)))

        @guard
        def on_add(session: Session, base: str, name: str, *values) -> list:
            session = _sync(session, base, values)
            h.add_adapter(ctx, session, name)
            return [session, *render(session), f"Added **{name}**."]

        @guard
        def on_upload(upload: str) -> tuple:
            name = h.upload_adapter(ctx, upload)
            names = h.list_adapters(ctx)
            note = f"Uploaded **{name}**; press Add to mix."
            return gr.Dropdown(choices=names, value=name), gr.Dropdown(choices=names), note

        def on_remove(index: int) -> Callable:
            @guard
            def remove(session: Session, base: str, *values) -> list:
                session = _sync(session, base, values)
                session.remove(index)
                return [session, *render(session)]

            return remove

        def on_slot_change(session: Session, base: str, *values) -> Session:
            return _sync(session, base, values)

        def on_word(sample: list, text: str) -> str:
            word = sample[0] if sample else ""
            return f"{text.rstrip()}, {word}" if text.strip() else word

        @guard
        def on_generate(
            session: Session,
            base: str,
            prompt: str,
            negative: str,
            steps: int,
            guidance: float,
            seed: int,
            width: int,
            height: int,
            scheduler: str,
            num_images: int,
            progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio injects it)
            *values,
        ) -> tuple:
            session = _sync(session, base, values)
            settings = h.make_settings(
                prompt, negative, steps, guidance, seed, width, height, scheduler, num_images
            )
            started = time.perf_counter()
            files = h.run_generate(ctx, base, session.strengths(), settings, _progress(progress))
            mix = ", ".join(f"{n} {s:g}" for n, s in settings.adapters.items()) or "no adapters"
            note = (
                f"{len(files)} image(s) in {time.perf_counter() - started:.1f} s · seed "
                f"{settings.seed} · {mix} · saved to `{h.paths.relative(ctx.outputs, files[0].parent)}/`"
            )
            return [str(f) for f in files], note

        @guard
        def on_compare(
            session: Session,
            base: str,
            prompt: str,
            negative: str,
            steps: int,
            guidance: float,
            seed: int,
            width: int,
            height: int,
            scheduler: str,
            x_name: str,
            x_text: str,
            y_name: str,
            y_text: str,
            progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio injects it)
            *values,
        ) -> tuple:
            session = _sync(session, base, values)
            settings = h.make_settings(
                prompt, negative, steps, guidance, seed, width, height, scheduler
            )
            y_name = "" if y_name in (None, NO_SECOND) else y_name
            path = h.run_compare(
                ctx,
                base,
                session.strengths(),
                settings,
                x_name,
                h.parse_strengths(x_text, "X strengths"),
                y_name,
                h.parse_strengths(y_text, "Y strengths") if y_name else None,
                _progress(progress),
            )
            return str(path), f"Saved `{h.paths.relative(ctx.outputs, path)}`"

        @guard
        def on_export(
            session: Session,
            base: str,
            fmt: str,
            dtype: str,
            name: str,
            overwrite: bool,
            progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio injects it)
            *values,
        ) -> tuple:
            session = _sync(session, base, values)
            out = h.run_export(
                ctx, base, session.strengths(), fmt, dtype, name, overwrite, _progress(progress)
            )
            files = sorted(p for p in out.rglob("*") if p.is_file()) if out.is_dir() else [out]
            mix = (
                ", ".join(f"{n} {s:g}" for n, s in session.strengths().items()) or "the base alone"
            )
            return (
                [str(f) for f in files],
                f"Wrote `{h.paths.relative(ctx.outputs, out)}` ({mix}) in the outputs folder.",
                gr.Dropdown(choices=h.base_choices(ctx)),
            )

        @guard
        def on_train(
            slot: TrainSlot,
            base: str,
            dataset: str,
            name: str,
            trigger: str,
            rank: int,
            nonlinearity: str,
            steps: int,
            lr: float,
            resolution: int,
            batch_size: int,
            seed: int,
            train_te: bool,
            sample_every: int,
            sample_prompt: str,
            resume: bool,
            overwrite: bool,
            progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio injects it)
        ):
            if slot.job is not None and slot.job.status().running:
                raise SdloraError("a training run of yours is already going; stop it first")
            slot.job = job = h.start_training(
                ctx,
                base,
                dataset,
                name,
                trigger,
                rank,
                nonlinearity,
                steps,
                lr,
                resolution,
                batch_size,
                train_te,
                sample_every,
                sample_prompt,
                seed,
                resume,
                overwrite,
            )
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
            yield (
                plot,
                str(sample) if sample else None,
                text,
                gr.Dropdown(choices=h.list_adapters(ctx)),
                gr.Dropdown(choices=h.list_adapters(ctx)),
            )

        def on_stop(slot: TrainSlot) -> str:
            slot.stop()
            return "Stopping…"

        @guard
        def on_inspect(name: str, base: str) -> str:
            if not name:
                raise SdloraError("pick an adapter first")
            return h.inspect_adapter(ctx, name, base)

        def on_base(session: Session, base: str) -> Session:
            session.base = base
            return session

        synced = [session, base_dd, *ons, *strengths]
        settings_inputs = [prompt, negative, steps, guidance, seed, width, height, scheduler]
        app.load(on_load, None, [adapter_dd, inspect_dd, base_dd, dataset_dd], **FREE)
        refresh_btn.click(on_refresh, None, [adapter_dd, inspect_dd, base_dd], **FREE)
        refresh_data.click(
            lambda: gr.Dropdown(choices=h.list_datasets(ctx)), None, dataset_dd, **FREE
        )
        base_dd.change(on_base, [session, base_dd], session, **FREE)
        add_btn.click(
            on_add,
            [session, base_dd, adapter_dd, *ons, *strengths],
            [session, *mix_outputs, mix_status],
            concurrency_id=GPU,
            api_visibility="private",
        )
        upload_btn.upload(
            on_upload,
            upload_btn,
            [adapter_dd, inspect_dd, mix_status],
            api_name="upload_adapter",
            concurrency_limit=None,
        )
        for i, (_, on, strength, remove, _, words) in enumerate(slots):
            remove.click(on_remove(i), synced, [session, *mix_outputs], **FREE)
            on.change(on_slot_change, synced, session, **FREE)
            strength.change(on_slot_change, synced, session, **FREE)
            words.click(on_word, [words, prompt], prompt, **FREE)
        dice.click(h.random_seed, None, seed, **FREE)
        generate_btn.click(
            on_generate,
            [session, base_dd, *settings_inputs, num_images, *ons, *strengths],
            [gallery, mix_status],
            concurrency_id=GPU,
            api_visibility="private",
        )
        compare_btn.click(
            on_compare,
            [session, base_dd, *settings_inputs, x_dd, x_vals, y_dd, y_vals, *ons, *strengths],
            [grid_img, compare_status],
            concurrency_id=GPU,
            api_visibility="private",
        )
        export_btn.click(
            on_export,
            [session, base_dd, fmt, dtype, export_name, overwrite, *ons, *strengths],
            [export_files, export_status, base_dd],
            concurrency_id=GPU,
            api_visibility="private",
        )
        start_btn.click(
            on_train,
            [
                train_slot,
                base_dd,
                dataset_dd,
                train_name,
                trigger,
                rank,
                nonlinearity,
                train_steps,
                lr,
                resolution,
                batch_size,
                train_seed,
                train_te,
                sample_every,
                sample_prompt,
                resume,
                train_overwrite,
            ],
            [loss_plot, sample_img, train_status, adapter_dd, inspect_dd],
            concurrency_id=GPU,
            api_visibility="private",
        )
        stop_btn.click(on_stop, train_slot, train_status, **FREE)
        inspect_btn.click(
            on_inspect,
            [inspect_dd, base_dd],
            inspect_out,
            concurrency_id=GPU,
            api_visibility="private",
        )
        add_api(ctx, guard, GPU)

    app.queue(default_concurrency_limit=1)
    return app


def launch(
    app: gr.Blocks,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    max_upload_mb: int = 2048,
    block: bool = True,
) -> None:
    """Serve the app: local only unless `host` says otherwise, a share link only if asked."""
    app.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=f"{max_upload_mb}mb",
        show_error=True,
        inbrowser=False,
        prevent_thread_lock=not block,
        quiet=not block,
    )
