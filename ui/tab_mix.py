"""The Mix tab: prompt and settings, the adapters of the mix with their strengths, the result.

Left: prompt, Generate / Interrupt with their status line, settings, then the mix (base,
adapter rows with an expandable per-block panel each, the LoRA cards, the Conflicts panel of
`conflicts`). Right: the result, drawn at an integer zoom with crisp pixels, and the History
of earlier images (`mix_history`). The adapter rows are fixed components (MAX_ADAPTERS of them)
shown or hidden to match the visitor's mix; `render` fills them in, and the Compare tab's
adapter choices with them.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import gradio as gr
from PIL import Image

from sdlora.bases.generate import SETTINGS
from sdlora.bases.recommend import guidance_and_steps
from sdlora.errors import SdloraError
from sdlora.lora.blocks import parse_blocks
from sdlora.lora.prompt_tags import lora_windows
from sdlora.ui import conflicts
from sdlora.ui import handlers as h
from sdlora.ui.cards import CARDS_JS, cards_html
from sdlora.ui.common import (
    FREE,
    JOB,
    done,
    failed,
    into_view_js,
    on,
    queued,
    reporter,
    status_line,
    sync_mix,
    waiting,
)
from sdlora.ui.controls import SettingNumber, SettingSlider
from sdlora.ui.state import MAX_ADAPTERS, Session
from sdlora.ui.strength import Strength

NO_SECOND = "(none)"  # the Compare tab's "no Y adapter" choice
RESULT_WIDTH = 480  # px the result column gives images at 1280 px wide (integer zoom inside it)
RESULT_HEIGHT = 520  # px of it visible below the tabs at 800 px high
MIX_ROOM = (RESULT_WIDTH, RESULT_HEIGHT)
COMPARE_ROOM = (1200, 600)  # px the Compare tab gives its grid at 1280 px wide (full width)


@dataclass
class Slot:
    """One adapter row: on box, strength, remove button, summary, trigger words, block panel."""

    box: gr.Group
    on: gr.Checkbox
    strength: gr.Slider
    remove: gr.Button
    meta: gr.Markdown
    words: gr.Dataset
    te: gr.Slider
    in_: gr.Slider
    mid: gr.Slider
    out: gr.Slider
    custom: gr.Textbox

    @property
    def block_inputs(self) -> list:
        return [self.te, self.in_, self.mid, self.out, self.custom]


@dataclass
class MixTab:
    base_dd: gr.Dropdown
    adapter_dd: gr.Dropdown
    refresh_btn: gr.Button
    add_btn: gr.Button
    upload_btn: gr.UploadButton
    add_status: gr.HTML
    slots: list[Slot]
    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    steps: gr.Slider
    guidance: gr.Slider
    seed: gr.Textbox
    reuse_btn: gr.Button
    scheduler: gr.Dropdown
    width: gr.Number
    height: gr.Number
    num_images: gr.Slider
    generate_btn: gr.Button
    interrupt_btn: gr.Button
    status: gr.HTML
    result: gr.HTML
    extended: gr.Checkbox
    card_search: gr.Textbox
    cards: gr.HTML
    conflicts: conflicts.Panel

    @property
    def mix_values(self) -> list:
        """The on boxes then the strength sliders (what `sync_mix` reads)."""
        return [s.on for s in self.slots] + [s.strength for s in self.slots]

    @property
    def rows(self) -> list:
        """What `render` updates, slot by slot."""
        return [
            part
            for s in self.slots
            for part in (s.box, s.on, s.strength, s.meta, s.words, *s.block_inputs, s.remove)
        ]

    @property
    def settings(self) -> list:
        """The generation settings' controls, in the library's order (`SETTINGS`): what
        `handlers.make_settings` takes. Each control is the attribute named as its setting."""
        return [getattr(self, name) for name in SETTINGS]


def layout(ctx: h.Context, base: str, result_column: Callable[[], None]) -> MixTab:
    """The tab's components, in page order; `result_column()` adds what goes under the result.
    Steps and guidance start at the base's recommended values, the seed at -1 (random)."""
    guidance_start, steps_start = guidance_and_steps(base)
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=520):
            prompt = gr.Textbox(
                label=h.form_label("prompt"),
                lines=2,
                elem_id="prompt",
                placeholder="a red circle <lora:style:0.8>  (a <lora:name:strength> tag adds "
                "that adapter to the mix)",
            )
            negative = gr.Textbox(label=h.form_label("negative_prompt"), elem_id="negative")
            with gr.Row(equal_height=True):
                generate_btn = gr.Button("Generate", variant="primary", elem_id="generate", scale=3)
                interrupt_btn = gr.Button(
                    "Interrupt", variant="stop", elem_id="interrupt", scale=1, min_width=90
                )
            status = status_line("mix-status")
            with gr.Accordion("Settings", open=True, elem_id="settings"):
                with gr.Row():
                    steps = SettingSlider(
                        *h.form_bounds("steps"),
                        value=steps_start,
                        step=1,
                        label=h.form_label("steps"),
                        elem_id="steps",
                    )
                    guidance = SettingSlider(
                        *h.form_bounds("guidance"),
                        value=guidance_start,
                        step=0.5,
                        label=h.form_label("guidance"),
                        elem_id="guidance",
                    )
                with gr.Row(equal_height=True):
                    seed = gr.Textbox(  # text: exact at any length, never a JSON overflow
                        "-1",
                        label=h.form_label("seed"),
                        max_lines=1,
                        elem_id="seed",
                        min_width=120,
                    )
                    reuse_btn = gr.Button(
                        "Reuse last seed", size="sm", elem_id="reuse-seed", min_width=90
                    )
                    scheduler = gr.Dropdown(
                        list(SETTINGS["scheduler"].choices),
                        value="pndm",
                        label=h.form_label("scheduler"),
                        elem_id="scheduler",
                    )
                with gr.Row():
                    width = number("width", 0, min_width=90, elem_id="width")
                    height = number("height", 0, min_width=90, elem_id="height")
                    num_images = SettingSlider(
                        *h.form_bounds("num_images"),
                        value=1,
                        step=1,
                        label=h.form_label("num_images"),
                        elem_id="num-images",
                    )
            with gr.Row():
                base_dd = gr.Dropdown(
                    h.base_choices(ctx), value=base, label="Base model", elem_id="base", scale=2
                )
                adapter_dd = gr.Dropdown(
                    h.list_adapters(ctx),
                    value=None,
                    info=h.adapters_hint(ctx, h.list_adapters(ctx)),
                    label="Adapter file",
                    elem_id="adapter-pick",
                    scale=3,
                )
            with gr.Row():
                add_btn = gr.Button("Add to mix", elem_id="add-adapter", size="sm")
                upload_btn = gr.UploadButton(  # no file_types: its check would raise a toast
                    "Upload .safetensors",
                    file_count="single",
                    elem_id="upload",
                    size="sm",
                )
                refresh_btn = gr.Button("Refresh lists", size="sm", elem_id="refresh")
                extended = gr.Checkbox(
                    False,
                    label="Extended range (−1 to 2)",
                    elem_id="extended",
                    min_width=120,
                )
            add_status = status_line("add-status")
            slots = [slot_row(i) for i in range(MAX_ADAPTERS)]
            with gr.Accordion("LoRA cards: click one to add it", open=True, elem_id="cards-box"):
                card_search = gr.Textbox(
                    placeholder="Search by name, family or trigger word",
                    show_label=False,
                    max_lines=1,
                    elem_id="card-search",
                )
                cards = gr.HTML(
                    cards_html(ctx, base, []),
                    elem_id="cards",
                    js_on_load=CARDS_JS,
                    padding=False,
                )
            panel = conflicts.layout()
        with gr.Column(scale=4, min_width=400, elem_id="result-column"):
            result = gr.HTML(
                '<p class="sd-empty">Images appear here.</p>',
                elem_id="result",
                elem_classes="sd-result",
            )
            result_column()
    return MixTab(
        base_dd,
        adapter_dd,
        refresh_btn,
        add_btn,
        upload_btn,
        add_status,
        slots,
        prompt,
        negative,
        steps,
        guidance,
        seed,
        reuse_btn,
        scheduler,
        width,
        height,
        num_images,
        generate_btn,
        interrupt_btn,
        status,
        result,
        extended,
        card_search,
        cards,
        panel,
    )


def number(name: str, value: int, **kwargs) -> SettingNumber:
    """A whole-number box for generation setting `name`, with the library's label and bounds."""
    low, high = h.form_bounds(name)
    return SettingNumber(
        value, precision=0, minimum=low, maximum=high, label=h.form_label(name), **kwargs
    )


def slot_row(i: int) -> Slot:
    """Adapter row `i`, hidden until the mix has that many adapters."""
    with gr.Group(visible=False, elem_id=f"slot-{i}") as box:
        with gr.Row(equal_height=True):
            on_box = gr.Checkbox(True, label="on", scale=0, min_width=70, elem_id=f"on-{i}")
            strength = Strength(
                0, 1, value=1.0, step=0.01, label="strength", scale=5, elem_id=f"strength-{i}"
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
        with gr.Accordion("Per-block strengths", open=False, elem_id=f"blocks-{i}"):
            with gr.Row():
                te = gr.Slider(0, 1, 1, step=0.05, label="TE (text encoder)", elem_id=f"te-{i}")
                in_ = gr.Slider(0, 1, 1, step=0.05, label="IN", elem_id=f"in-{i}")
                mid = gr.Slider(0, 1, 1, step=0.05, label="MID", elem_id=f"mid-{i}")
                out = gr.Slider(0, 1, 1, step=0.05, label="OUT", elem_id=f"out-{i}")
            custom = gr.Textbox(
                label="or blocks as LoRA Block Weight writes them (overrides the sliders)",
                placeholder="IN04=0,OUT=0.5   or 17 / 26 comma-separated numbers",
                elem_id=f"custom-{i}",
            )
    return Slot(box, on_box, strength, remove, meta, words, te, in_, mid, out, custom)


def _group_values(spec: str) -> tuple[list[float], str]:
    """Slider values (TE, IN, MID, OUT) and custom text that show `spec` in the block panel."""
    try:
        blocks = parse_blocks(spec)
    except SdloraError:
        blocks = {}
    groups = {"BASE", "IN", "M00", "OUT"}
    if set(blocks) <= groups:
        return [blocks.get(k, 1.0) for k in ("BASE", "IN", "M00", "OUT")], ""
    return [1.0, 1.0, 1.0, 1.0], spec


def render(ctx: h.Context, session: Session) -> list:
    """Updates for the adapter rows, then the Compare tab's X and Y choices, for this mix."""
    out = []
    for i in range(MAX_ADAPTERS):
        if i >= len(session.mix):
            out += [gr.Group(visible=False), gr.Checkbox(), gr.skip()]
            out += [gr.Markdown(""), gr.Dataset(samples=[], visible=False)]
            out += [gr.Slider(value=1.0)] * 4 + [gr.Textbox(value=""), gr.skip()]
            continue
        item = session.mix[i]
        try:
            info = h.adapter_info(ctx, item.name)
            meta, trigger_words = h.summary(info), info["trigger_words"]
        except SdloraError as err:
            meta, trigger_words = f"⚠ {err}", []
        values, custom = _group_values(item.blocks)
        low, high = session.strength_range
        out += [
            gr.Group(visible=True),
            gr.Checkbox(value=item.enabled, label=f"Enable {item.name}"),
            gr.Slider(value=item.strength, label=item.name, minimum=low, maximum=high),
            gr.Markdown(meta),
            gr.Dataset(samples=[[w] for w in trigger_words], visible=bool(trigger_words)),
            *[gr.Slider(value=v) for v in values],
            gr.Textbox(value=custom),
            gr.Button(f"Remove {item.name.split('/')[-1][:24]}"),  # its accessible name too
        ]
    names = session.names()
    out += [
        gr.Dropdown(choices=names, value=names[0] if names else None),
        gr.Dropdown(choices=[NO_SECOND, *names], value=NO_SECOND),
    ]
    return out


def image_url(path: Path) -> str:
    """The URL Gradio serves a file of the outputs folder at (`gr.set_static_paths`)."""
    return "gradio_api/file=" + quote(str(path))


def zoom_for(size: tuple[int, int], count: int, room: tuple[int, int] = MIX_ROOM) -> int:
    """The largest integer zoom at which `count` images of `size` fit `room` (width, height:
    the Mix tab's result column, or the Compare tab's full width) (0: the image is larger
    than its space and is shown scaled down to fit)."""
    columns = 1 if count == 1 else 2 if count <= 4 else 3
    room_w = (room[0] - 12 * (columns - 1)) // columns
    rows = -(-count // columns)
    room_h = (room[1] - 28 * rows) // rows
    return max(0, min(room_w // size[0], room_h // size[1]))


def result_html(files: list[Path], captions: list[str], room: tuple[int, int] = MIX_ROOM) -> str:
    """The images at an integer zoom with crisp pixels (never cropped), each with its caption."""
    if not files:
        return '<p class="sd-empty">Images appear here.</p>'
    with Image.open(files[0]) as first:
        size = first.size
    zoom = zoom_for(size, len(files), room)
    figures = []
    for path, text in zip(files, captions, strict=True):
        if zoom:
            w, hgt = size[0] * zoom, size[1] * zoom
            dims = f'width="{w}" height="{hgt}" style="width:{w}px;height:{hgt}px"'
        else:
            dims = f'width="{size[0]}" height="{size[1]}"'
        figures.append(
            f'<figure><img src="{image_url(path)}" {dims} data-zoom="{zoom}" '
            f'alt="{html.escape(path.name)}"><figcaption>{html.escape(text)}</figcaption></figure>'
        )
    note = f"{size[0]}×{size[1]} px" + (f", shown at {zoom}×" if zoom else ", scaled to fit")
    return f'<div class="sd-images">{"".join(figures)}</div><p class="sd-size">{note}</p>'


def wire(
    ctx: h.Context,
    tab: MixTab,
    session: gr.State,
    compare_choices: list[gr.Dropdown],
    inspect_dd: gr.Dropdown,
    history: gr.Gallery,
    persist: Callable,
) -> None:
    """The tab's events. `compare_choices`: the Compare tab's X and Y adapter dropdowns;
    `history` gets the new images; `persist(event)` chains saving the page state."""
    mix_outputs = [*tab.rows, *compare_choices]
    synced = [session, tab.base_dd, *tab.mix_values]

    def on_add(session: Session, base: str, name: str, *values) -> list:
        session = sync_mix(session, base, values)
        h.add_adapter(ctx, session, name)
        return [session, *render(ctx, session), f"Added **{name}** to the mix."]

    def on_upload(upload: str) -> tuple:
        name = h.upload_adapter(ctx, upload)
        names = h.list_adapters(ctx)
        note = f"Uploaded **{name}**; press Add to mix."
        return gr.Dropdown(choices=names, value=name), gr.Dropdown(choices=names), note

    def on_remove(index: int) -> Callable:
        def remove(session: Session, base: str, *values) -> list:
            session = sync_mix(session, base, values)
            name = session.mix[index].name if index < len(session.mix) else ""
            session.remove(index)
            return [session, *render(ctx, session), f"Removed **{name}**."]

        return remove

    strengths = [s.strength for s in tab.slots]

    def on_slot_change(session: Session, base: str, *values) -> list:
        try:
            session = sync_mix(session, base, values)
        except SdloraError as err:  # put the sliders back where the mix is
            back = [item.strength for item in session.mix]
            back += [gr.skip()] * (MAX_ADAPTERS - len(back))
            session.putting_back = True
            return [session, *back, failed(err)]
        # the change that putting a slider back causes keeps the refusal on screen
        note = gr.skip() if session.putting_back else ""
        session.putting_back = False
        return [session, *[gr.skip()] * MAX_ADAPTERS, note]

    def on_blocks(index: int) -> Callable:
        def set_blocks(session: Session, te, in_, mid, out, custom) -> list:
            if index >= len(session.mix):
                return [session, ""]
            spec = h.set_blocks(session, index, h.blocks_spec(te, in_, mid, out, custom))
            name = session.mix[index].name
            return [session, f"**{name}** blocks: {spec or 'all 1'}"]

        return set_blocks

    def on_word(sample: list, text: str) -> str:
        word = sample[0] if sample else ""
        return f"{text.rstrip()}, {word}" if text.strip() else word

    def on_extended(session: Session, base: str, extended: bool, *values) -> list:
        """The strength range: -1 to 2, or back to 0-1 (strengths outside it are clamped)."""
        session = sync_mix(session, base, values)
        session.extended = bool(extended)
        low, high = session.strength_range
        moved = [i for i in session.mix if not low <= i.strength <= high]
        for item in moved:
            item.strength = min(max(item.strength, low), high)
        note = f"Strengths now from {low:g} to {high:g}."
        if moved:
            note += " Clamped: " + ", ".join(f"{i.name} to {i.strength:g}" for i in moved) + "."
        return [session, *render(ctx, session), note]

    def on_card(session: Session, base: str, evt: gr.EventData, *values) -> list:
        name = (evt._data or {}).get("name", "") if isinstance(evt._data, dict) else ""
        return on_add(session, base, name, *values)

    def on_cards(session: Session, base: str, search: str) -> str:
        return cards_html(ctx, base, session.names(), search)

    def on_base(session: Session, base: str) -> Session:
        session.base = base
        return session

    def on_pick_base(base: str) -> tuple:
        """The visitor picked another base: steps and guidance move to its values."""
        guidance, steps = guidance_and_steps(base)
        return gr.Slider(value=steps), gr.Slider(value=guidance)

    def before_job(session: Session) -> str:
        """Shown at once when a job is queued: what it waits for, if anything."""
        session.interrupted, session.running = False, True
        return queued(ctx.engine)

    def on_generate(
        session: Session,
        base: str,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio injects it)
        *values,
    ) -> list:
        """`values`: the generation settings (`SETTINGS` order), then the mix's on boxes and
        strengths."""
        try:
            return generate_now(session, base, progress, *values)
        finally:
            session.running = False

    def generate_now(session: Session, base: str, progress: gr.Progress, *values) -> list:
        form, mix = values[: len(SETTINGS)], values[len(SETTINGS) :]
        session = sync_mix(session, base, mix)
        clamped: list[str] = []
        windows = lora_windows(form[0])  # <lora:x:w:start=…>: this generation's windows
        prompt, tagged = h.add_from_prompt(ctx, session, form[0], clamped)
        settings = h.make_settings(prompt, *form[1:])
        started = time.perf_counter()
        try:
            files = h.run_generate(
                ctx,
                base,
                session.strengths(),
                settings,
                reporter(progress),
                session.blocks(),
                lambda: session.interrupted,
                windows=windows,
            )
        except h.Interrupted as err:
            if not err.partial:
                raise
            captions = [f"partial · seed {settings.seed + i}" for i in range(len(err.partial))]
            return [
                session,
                prompt,
                *[gr.skip()] * len(mix_outputs),
                result_html(err.partial, captions),
                gr.skip(),
                failed(err),
            ]
        session.last_seed = settings.seed
        mix = ", ".join(f"{n} {s:g}" for n, s in settings.adapters.items()) or "no adapters"
        captions = [
            f"seed {settings.seed + i} · {mix}" + (" · blocks" if settings.blocks else "")
            for i in range(len(files))
        ]
        saved = h.paths.relative(ctx.outputs, files[0].parent)
        note = (
            f"{len(files)} image(s) in {time.perf_counter() - started:.1f} s · seed "
            f"{settings.seed} · {mix} · saved in {saved}/"
        )
        if tagged:
            note += f" · from the prompt: {', '.join(tagged)}"
        note += "".join(f" · ⚠ {line}" for line in clamped)
        rows = render(ctx, session) if tagged else [gr.skip()] * (len(mix_outputs))
        return [
            session,
            prompt,
            *rows,
            result_html(files, captions),
            history_items(ctx),
            note,
        ]

    def on_interrupt(session: Session) -> str:
        if not session.running:
            return done("Nothing is running: Interrupt stops a generation of this page.")
        session.interrupted = True
        return waiting("Interrupting after the current step…")

    def on_reuse(session: Session) -> tuple:
        if session.last_seed is None:
            raise SdloraError("no image yet: generate once, then its seed can be reused")
        return str(session.last_seed), f"Seed set to {session.last_seed}, the last one used."

    persist(tab.base_dd.change(on_base, [session, tab.base_dd], session, **FREE))

    def on_base_check(session: Session, base: str) -> str:
        """A base picked by hand: the mix is checked against it at once (the base loads)."""
        unfit = h.check_mix_for_base(ctx, session, base) if session.mix else []
        if unfit:
            return failed(
                "; ".join(unfit) + ". Switch the base back, or remove or switch off those."
            )
        return f"Base **{base}**: the mix fits." if session.mix else ""

    on(
        tab.base_dd.input,
        on_base_check,
        [session, tab.base_dd],
        [],
        tab.add_status,
        **JOB,
    )
    tab.base_dd.input(on_pick_base, tab.base_dd, [tab.steps, tab.guidance], **FREE)
    persist(
        on(
            tab.extended.input,
            on_extended,
            [session, tab.base_dd, tab.extended, *tab.mix_values],
            [session, *mix_outputs],
            tab.add_status,
            **FREE,
        )
    )
    persist(
        on(
            tab.add_btn.click,
            on_add,
            [session, tab.base_dd, tab.adapter_dd, *tab.mix_values],
            [session, *mix_outputs],
            tab.add_status,
            **JOB,
        )
    )
    persist(
        on(
            tab.cards.click,
            on_card,
            [session, tab.base_dd, *tab.mix_values],
            [session, *mix_outputs],
            tab.add_status,
            **JOB,
        )
    )
    card_inputs = [session, tab.base_dd, tab.card_search]
    tab.card_search.change(on_cards, card_inputs, tab.cards, trigger_mode="always_last", **FREE)
    tab.base_dd.change(on_cards, card_inputs, tab.cards, **FREE)
    on(
        tab.upload_btn.upload,
        on_upload,
        tab.upload_btn,
        [tab.adapter_dd, inspect_dd],
        tab.add_status,
        **FREE,
    )
    for i, slot in enumerate(tab.slots):
        persist(
            on(
                slot.remove.click,
                on_remove(i),
                synced,
                [session, *mix_outputs],
                tab.add_status,
                **FREE,
            )
        )
        for control in (slot.on, slot.strength):
            persist(
                control.change(
                    on_slot_change, synced, [session, *strengths, tab.add_status], **FREE
                )
            )
        for control in slot.block_inputs:
            persist(
                on(
                    control.change if control is not slot.custom else control.submit,
                    on_blocks(i),
                    [session, *slot.block_inputs],
                    [session],
                    tab.add_status,
                    **FREE,
                )
            )
        slot.words.click(on_word, [slot.words, tab.prompt], tab.prompt, **FREE)
    on(tab.reuse_btn.click, on_reuse, session, [tab.seed], tab.status, **FREE)
    generating = on(
        tab.generate_btn.click(before_job, session, tab.status, **FREE).then,
        on_generate,
        [session, tab.base_dd, *tab.settings, *tab.mix_values],
        [session, tab.prompt, *mix_outputs, tab.result, history],
        tab.status,
        **JOB,
    )
    persist(generating)
    generating.then(None, js=into_view_js("result", "mix-status"))
    tab.interrupt_btn.click(on_interrupt, session, tab.status, **FREE)
    conflicts.wire(ctx, tab.conflicts, session, tab.base_dd, tab.mix_values)


def history_items(ctx: h.Context) -> list[tuple[str, str]]:
    """(image, caption) for the History gallery, newest first."""
    from sdlora.ui import history

    items = []
    for path in history.list_images(ctx.outputs):
        try:
            caption = history.caption(history.read_recipe(ctx.outputs, path.name))
        except SdloraError:
            caption = path.name
        items.append((str(path), caption))
    return items
