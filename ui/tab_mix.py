"""The Mix tab: pick a base and adapters, set each adapter's strength, generate.

The adapter rows are fixed components (MAX_ADAPTERS of them) shown or hidden to match the
visitor's mix; `render` fills them in, and the Compare tab's adapter choices with them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr
from sdlora.ui import handlers as h
from sdlora.ui.common import FREE, JOB, guard, reporter, sync_mix
from sdlora.ui.state import MAX_ADAPTERS, Session

from sdlora.errors import SdloraError
from sdlora.generate import SCHEDULERS
from sdlora.recommend import guidance_and_steps

NO_SECOND = "(none)"  # the Compare tab's "no Y adapter" choice


@dataclass
class Slot:
    """One adapter row: on box, strength slider, remove button, summary, trigger words."""

    box: gr.Group
    on: gr.Checkbox
    strength: gr.Slider
    remove: gr.Button
    meta: gr.Markdown
    words: gr.Dataset


@dataclass
class MixTab:
    base_dd: gr.Dropdown
    adapter_dd: gr.Dropdown
    refresh_btn: gr.Button
    add_btn: gr.Button
    upload_btn: gr.UploadButton
    slots: list[Slot]
    prompt: gr.Textbox
    negative: gr.Textbox
    steps: gr.Slider
    guidance: gr.Slider
    seed: gr.Number
    dice: gr.Button
    scheduler: gr.Dropdown
    width: gr.Number
    height: gr.Number
    num_images: gr.Slider
    generate_btn: gr.Button
    gallery: gr.Gallery
    status: gr.Markdown

    @property
    def mix_values(self) -> list:
        """The on boxes then the strength sliders (what `sync_mix` reads)."""
        return [s.on for s in self.slots] + [s.strength for s in self.slots]

    @property
    def settings(self) -> list:
        """The generation settings, in `handlers.make_settings` order (without num_images)."""
        return [
            self.prompt,
            self.negative,
            self.steps,
            self.guidance,
            self.seed,
            self.width,
            self.height,
            self.scheduler,
        ]


def layout(ctx: h.Context, base: str) -> MixTab:
    """The tab's components, in page order. Steps and guidance start at the base's values."""
    guidance_start, steps_start = guidance_and_steps(base)
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
            slots = [slot_row(i) for i in range(MAX_ADAPTERS)]
        with gr.Column(scale=3, min_width=420):
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
            negative = gr.Textbox(label="Negative prompt", elem_id="negative")
            with gr.Row():
                steps = gr.Slider(1, 150, value=steps_start, step=1, label="Steps", elem_id="steps")
                guidance = gr.Slider(
                    0, 20, value=guidance_start, step=0.5, label="Guidance", elem_id="guidance"
                )
            with gr.Row(equal_height=True):
                seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
                dice = gr.Button("Random seed", size="sm")
                scheduler = gr.Dropdown(list(SCHEDULERS), value="pndm", label="Scheduler")
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
            status = gr.Markdown(elem_id="mix-status")
    return MixTab(
        base_dd,
        adapter_dd,
        refresh_btn,
        add_btn,
        upload_btn,
        slots,
        prompt,
        negative,
        steps,
        guidance,
        seed,
        dice,
        scheduler,
        width,
        height,
        num_images,
        generate_btn,
        gallery,
        status,
    )


def slot_row(i: int) -> Slot:
    """Adapter row `i`, hidden until the mix has that many adapters."""
    with gr.Group(visible=False, elem_id=f"slot-{i}") as box:
        with gr.Row(equal_height=True):
            on = gr.Checkbox(True, label="on", scale=0, min_width=70, elem_id=f"on-{i}")
            strength = gr.Slider(
                0,
                1,
                value=1.0,
                step=0.01,
                label="strength",
                scale=5,
                elem_id=f"strength-{i}",
            )
            remove = gr.Button("Remove", size="sm", scale=0, min_width=80, elem_id=f"remove-{i}")
        meta = gr.Markdown(elem_id=f"meta-{i}")
        words = gr.Dataset(
            components=["textbox"],
            samples=[],
            label="Trigger words (click to add to the prompt)",
            type="values",
            visible=False,
        )
    return Slot(box, on, strength, remove, meta, words)


def render(ctx: h.Context, session: Session) -> list:
    """Updates for the adapter rows, then the Compare tab's X and Y choices, for this mix."""
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
    out += [
        gr.Dropdown(choices=names, value=names[0] if names else None),
        gr.Dropdown(choices=[NO_SECOND, *names], value=NO_SECOND),
    ]
    return out


def wire(
    ctx: h.Context,
    tab: MixTab,
    session: gr.State,
    compare_choices: list[gr.Dropdown],
    inspect_dd: gr.Dropdown,
) -> None:
    """The tab's events. `compare_choices`: the Compare tab's X and Y adapter dropdowns."""
    rows = [part for s in tab.slots for part in (s.box, s.on, s.strength, s.meta, s.words)]
    mix_outputs = [*rows, *compare_choices]
    synced = [session, tab.base_dd, *tab.mix_values]

    @guard
    def on_add(session: Session, base: str, name: str, *values) -> list:
        session = sync_mix(session, base, values)
        h.add_adapter(ctx, session, name)
        return [session, *render(ctx, session), f"Added **{name}**."]

    @guard
    def on_upload(upload: str) -> tuple:
        name = h.upload_adapter(ctx, upload)
        names = h.list_adapters(ctx)
        note = f"Uploaded **{name}**; press Add to mix."
        return gr.Dropdown(choices=names, value=name), gr.Dropdown(choices=names), note

    def on_remove(index: int) -> Callable:
        @guard
        def remove(session: Session, base: str, *values) -> list:
            session = sync_mix(session, base, values)
            session.remove(index)
            return [session, *render(ctx, session)]

        return remove

    def on_slot_change(session: Session, base: str, *values) -> Session:
        return sync_mix(session, base, values)

    def on_word(sample: list, text: str) -> str:
        word = sample[0] if sample else ""
        return f"{text.rstrip()}, {word}" if text.strip() else word

    def on_base(session: Session, base: str) -> Session:
        session.base = base
        return session

    def on_pick_base(base: str) -> tuple:
        """The visitor picked another base: steps and guidance move to its values."""
        guidance, steps = guidance_and_steps(base)
        return gr.Slider(value=steps), gr.Slider(value=guidance)

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
        session = sync_mix(session, base, values)
        settings = h.make_settings(
            prompt, negative, steps, guidance, seed, width, height, scheduler, num_images
        )
        started = time.perf_counter()
        files = h.run_generate(ctx, base, session.strengths(), settings, reporter(progress))
        mix = ", ".join(f"{n} {s:g}" for n, s in settings.adapters.items()) or "no adapters"
        saved = h.paths.relative(ctx.outputs, files[0].parent)
        note = (
            f"{len(files)} image(s) in {time.perf_counter() - started:.1f} s · seed "
            f"{settings.seed} · {mix} · saved to `{saved}/`"
        )
        return [str(f) for f in files], note

    tab.base_dd.change(on_base, [session, tab.base_dd], session, **FREE)
    tab.base_dd.input(on_pick_base, tab.base_dd, [tab.steps, tab.guidance], **FREE)
    tab.add_btn.click(
        on_add,
        [session, tab.base_dd, tab.adapter_dd, *tab.mix_values],
        [session, *mix_outputs, tab.status],
        **JOB,
    )
    tab.upload_btn.upload(
        on_upload,
        tab.upload_btn,
        [tab.adapter_dd, inspect_dd, tab.status],
        api_name="upload_adapter",
        concurrency_limit=None,
    )
    for i, slot in enumerate(tab.slots):
        slot.remove.click(on_remove(i), synced, [session, *mix_outputs], **FREE)
        slot.on.change(on_slot_change, synced, session, **FREE)
        slot.strength.change(on_slot_change, synced, session, **FREE)
        slot.words.click(on_word, [slot.words, tab.prompt], tab.prompt, **FREE)
    tab.dice.click(h.random_seed, None, tab.seed, **FREE)
    tab.generate_btn.click(
        on_generate,
        [session, tab.base_dd, *tab.settings, tab.num_images, *tab.mix_values],
        [tab.gallery, tab.status],
        **JOB,
    )
