"""The Mix tab's right column under the result: History (earlier images; a click restores
their prompt, settings, seed and mix) and Saved mixes; plus keeping the page across reloads.

The page state (base, mix, prompt and settings) lives in the browser's storage
(`gr.BrowserState`): every change of the mix, of any setting (as it is typed) and every
Generate writes it, and loading the page reads it back. Images restore from their own PNG
record (`history.read_recipe`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from sdlora.bases.generate import SETTINGS
from sdlora.errors import SdloraError
from sdlora.io.writing import written_file
from sdlora.lora.prompt_tags import lora_tag
from sdlora.ui import handlers as h
from sdlora.ui import history
from sdlora.ui.common import FREE, on, status_line
from sdlora.ui.state import Session
from sdlora.ui.tab_mix import MixTab, history_items, render

STORAGE_KEY = "sdlora-mixer"
SECRET_FILE = ".ui-secret"  # in the outputs folder: the key browser storage is sealed with
OLD_KEYS = {"negative": "negative_prompt"}  # page records kept before the keys were the settings'


@dataclass
class HistoryPanel:
    gallery: gr.Gallery
    status: gr.HTML
    mix_name: gr.Textbox
    save_btn: gr.Button
    saved_dd: gr.Dropdown
    load_btn: gr.Button
    mixes_status: gr.HTML
    png_info: gr.UploadButton


def layout(ctx: h.Context) -> HistoryPanel:
    gallery = gr.Gallery(
        history_items(ctx),
        label="History: click an image to restore its prompt, settings, seed and mix",
        columns=6,
        height=230,
        allow_preview=False,
        fit_columns=False,
        object_fit="contain",
        elem_id="history",
        format="png",
    )
    png_info = gr.UploadButton(  # no file_types: its check would raise a toast
        "PNG Info: open an image to restore its settings (A1111's too)",
        file_count="single",
        size="sm",
        elem_id="png-info",
    )
    status = status_line("history-status")
    with gr.Accordion("Saved mixes", open=False, elem_id="saved-mixes"):
        with gr.Row(equal_height=True):
            mix_name = gr.Textbox(label="Name", elem_id="mix-name", scale=2)
            save_btn = gr.Button("Save mix", size="sm", elem_id="save-mix", scale=1)
        with gr.Row(equal_height=True):
            saved_dd = gr.Dropdown(
                history.list_mixes(ctx.outputs), label="Saved", elem_id="saved-pick", scale=2
            )
            load_btn = gr.Button("Load mix", size="sm", elem_id="load-mix", scale=1)
        mixes_status = status_line("mixes-status")
    return HistoryPanel(
        gallery, status, mix_name, save_btn, saved_dd, load_btn, mixes_status, png_info
    )


def storage_secret(ctx: h.Context) -> str:
    """The key Gradio seals browser storage with, kept in the outputs folder so that pages
    outlive a server restart (a fresh key each start would make every kept page unreadable)."""
    path = ctx.outputs / SECRET_FILE
    try:
        secret = path.read_text().strip()
    except OSError:
        secret = ""
    if len(secret) < 16:
        secret = secrets.token_urlsafe(24)
        with written_file(path) as tmp:
            tmp.write_text(secret)
    return secret


def page_record(session: Session, *settings) -> dict:
    """What the browser keeps: base, mix and the generation settings."""
    return {
        "base": session.base,
        "extended": session.extended,
        "mix": session.mix_record(),
        "settings": dict(zip(SETTINGS, settings, strict=True)),
    }


def _settings_updates(values: dict) -> list:
    """Updates for the Mix tab's settings from a {setting: value} dict (absent, or a value the
    form may not show again such as a refused seed kept in storage: unchanged)."""
    values = {OLD_KEYS.get(k, k): v for k, v in values.items()}
    values = {k: v for k, v in values.items() if k in SETTINGS and h.valid_form_value(k, v)}
    if "seed" in values:
        values["seed"] = "-1" if values["seed"] is None else str(values["seed"])  # text box
    return [gr.skip() if k not in values else values[k] for k in SETTINGS]


def wire(
    ctx: h.Context,
    tab: MixTab,
    panel: HistoryPanel,
    session: gr.State,
    stored: gr.BrowserState,
    compare_choices: list,
):
    """History, saved mixes, and the page kept in browser storage; returns `persist(event)`,
    which chains writing the page state after an event."""
    mix_outputs = [*tab.rows, *compare_choices]

    def save_page(session: Session, *settings) -> dict:
        return page_record(session, *settings)

    def persist(event) -> None:
        event.then(save_page, [session, *tab.settings], stored, **FREE)

    for control in tab.settings:  # typed text is kept too, not only what a Generate used
        control.change(
            save_page, [session, *tab.settings], stored, trigger_mode="always_last", **FREE
        )

    def restore_page(session: Session, record: dict | None) -> list:
        """Page load: the base, mix and settings this browser had (nothing if none kept)."""
        record = record if isinstance(record, dict) else {}
        choices = h.base_choices(ctx)
        if record.get("base") in choices:
            session.base = record["base"]
        session.extended = record.get("extended") is True
        if not session.mix:  # a mix made before this answer came (PNG Info, a card) is kept
            session.set_mix(record.get("mix") or [])
            session.mix = [i for i in session.mix if i.name in h.list_adapters(ctx)]
        values = record.get("settings") if isinstance(record.get("settings"), dict) else {}
        return [
            session,
            gr.Dropdown(value=session.base),
            gr.Checkbox(value=session.extended),
            *render(ctx, session),
            *_settings_updates(values),
            history_items(ctx),
        ]

    def on_pick(session: Session, evt: gr.SelectData) -> list:
        value = evt.value if isinstance(evt.value, dict) else {}
        image = value.get("image") or {}
        path = image.get("path") or image.get("orig_name") or ""
        name = path.rsplit("/", 1)[-1]
        recipe = history.read_recipe(ctx.outputs, name)
        adapters = recipe.get("adapters") or {}
        known = h.list_adapters(ctx)
        missing = [n for n in adapters if n not in known]
        if missing:
            raise SdloraError(
                f"{name} used {', '.join(missing)}, which the adapters folder no longer has"
            )
        return restore(session, recipe, name)

    def on_png_info(session: Session, upload: str) -> list:
        """An image from anywhere: its settings and those of its adapters found here."""
        path = Path(upload)
        try:
            recipe = history.recipe_of(path, h.paths.shown(path.name))
        finally:
            if path.resolve().is_relative_to(ctx.cache):
                path.unlink(missing_ok=True)
        known = h.list_adapters(ctx)
        adapters = recipe.get("adapters") or {}
        missing = [n for n in adapters if n not in known]
        recipe["adapters"] = {n: s for n, s in adapters.items() if n in known}
        *updates, note = restore(session, recipe, path.name)
        if missing:
            note += f" Not here, left out: {', '.join(missing)}."
        return [*updates, note]

    def restore(session: Session, recipe: dict, name: str) -> list:
        """The mix and settings of an image's recipe into the page."""
        adapters = recipe.get("adapters") or {}
        blocks = recipe.get("blocks") or {}
        session.set_mix(
            [{"name": n, "strength": s, "blocks": blocks.get(n, "")} for n, s in adapters.items()]
        )
        # an image's own settings; the number of images stays as the form has it
        values = {
            k: recipe.get(k, "" if s.kind == "text" else None)
            for k, s in SETTINGS.items()
            if k != "num_images"
        }
        values |= {"width": values["width"] or 0, "height": values["height"] or 0}
        # an adapter's window (start=/stop=) comes back as its tag in the prompt, where the
        # next Generate reads it again
        windows = {n: w for n, w in (recipe.get("schedules") or {}).items() if n in adapters}
        if windows and values.get("prompt") is not None:
            tags = " ".join(lora_tag(n, adapters[n], None, w) for n, w in windows.items())
            values["prompt"] = f"{values['prompt']} {tags}".strip()
        values = {k: v for k, v in values.items() if v is not None}
        note = f"Restored {name}: seed {values.get('seed', '?')}, {history.caption(recipe)}; press Generate to draw it again."
        return [session, *render(ctx, session), *_settings_updates(values), note]

    def on_save(session: Session, base: str, name: str) -> tuple:
        saved = history.save_mix(ctx.outputs, name, base, session.mix_record())
        return gr.Dropdown(
            choices=history.list_mixes(ctx.outputs), value=saved
        ), f"Saved mix **{saved}**."

    def on_load(session: Session, name: str) -> list:
        base, record = history.load_mix(ctx.outputs, name)
        known = h.list_adapters(ctx)
        missing = [
            r.get("name") for r in record if isinstance(r, dict) and r.get("name") not in known
        ]
        if missing:
            raise SdloraError(
                f"mix {name!r} uses {', '.join(map(str, missing))}, which the adapters folder no longer has"
            )
        session.set_mix(record)
        if base in h.base_choices(ctx):
            session.base = base
        return [
            session,
            gr.Dropdown(value=session.base),
            *render(ctx, session),
            f"Loaded mix **{name}**.",
        ]

    persist(
        on(
            panel.gallery.select,
            on_pick,
            session,
            [session, *mix_outputs, *tab.settings],
            panel.status,
            **FREE,
        )
    )
    persist(
        on(
            panel.png_info.upload,
            on_png_info,
            [session, panel.png_info],
            [session, *mix_outputs, *tab.settings],
            panel.status,
            **FREE,
        )
    )
    on(
        panel.save_btn.click,
        on_save,
        [session, tab.base_dd, panel.mix_name],
        [panel.saved_dd],
        panel.mixes_status,
        **FREE,
    )
    persist(
        on(
            panel.load_btn.click,
            on_load,
            [session, panel.saved_dd],
            [session, tab.base_dd, *mix_outputs],
            panel.mixes_status,
            **FREE,
        )
    )
    return persist, restore_page
