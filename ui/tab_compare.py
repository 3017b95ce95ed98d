"""The Compare tab: one adapter of the mix over several strengths, or two on an X/Y grid."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from sdlora.bases.generate import SETTINGS
from sdlora.ui import handlers as h
from sdlora.ui.common import (
    FREE,
    JOB,
    into_view_js,
    on,
    queued,
    reporter,
    status_line,
    sync_mix,
    waiting,
)
from sdlora.ui.state import Session
from sdlora.ui.tab_mix import COMPARE_ROOM, NO_SECOND, MixTab, result_html


@dataclass
class CompareTab:
    x_dd: gr.Dropdown
    x_vals: gr.Textbox
    y_dd: gr.Dropdown
    y_vals: gr.Textbox
    compare_btn: gr.Button
    interrupt_btn: gr.Button
    status: gr.HTML
    grid: gr.HTML


def layout() -> CompareTab:
    gr.Markdown(
        "Sweep one adapter of your mix over several strengths (0 to 1), or two on an X/Y grid. "
        "The other adapters keep their strengths; prompt and settings come from Mix; "
        "every cell uses the same seed."
    )
    with gr.Row():
        x_dd = gr.Dropdown([], label="X adapter", elem_id="x-adapter")
        x_vals = gr.Textbox("0, 0.25, 0.5, 0.75, 1", label="X strengths", elem_id="x-values")
    with gr.Row():
        y_dd = gr.Dropdown(
            [NO_SECOND], value=NO_SECOND, label="Y adapter (optional)", elem_id="y-adapter"
        )
        y_vals = gr.Textbox("0, 0.5, 1", label="Y strengths", elem_id="y-values")
    with gr.Row(equal_height=True):
        compare_btn = gr.Button("Make grid", variant="primary", elem_id="compare", scale=3)
        interrupt_btn = gr.Button("Interrupt", variant="stop", elem_id="compare-interrupt", scale=1)
    status = status_line("compare-status")
    grid = gr.HTML("", elem_id="grid", elem_classes="sd-result")
    return CompareTab(x_dd, x_vals, y_dd, y_vals, compare_btn, interrupt_btn, status, grid)


def wire(ctx: h.Context, tab: CompareTab, session: gr.State, mix: MixTab) -> None:
    """The grid uses the Mix tab's base, mix and generation settings."""

    def on_compare(
        session: Session,
        base: str,
        x_name: str,
        x_text: str,
        y_name: str,
        y_text: str,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio injects it)
        *values,
    ) -> tuple:
        """`values`: the Mix tab's generation settings (`SETTINGS` order), then its mix."""
        form, mix_values = values[: len(SETTINGS)], values[len(SETTINGS) :]
        session = sync_mix(session, base, mix_values)
        settings = h.make_settings(*form)
        y_name = "" if y_name in (None, NO_SECOND) else y_name
        x_values = h.parse_strengths(x_text, "X strengths", *session.strength_range)
        y_values = (
            h.parse_strengths(y_text, "Y strengths", *session.strength_range) if y_name else None
        )
        path = h.run_compare(
            ctx,
            base,
            session.strengths(),
            settings,
            x_name,
            x_values,
            y_name,
            y_values,
            reporter(progress),
            session.blocks(),
            lambda: session.interrupted,
        )
        session.last_seed = settings.seed
        caption = (
            f"seed {settings.seed} · {x_name} × {y_name}"
            if y_name
            else f"seed {settings.seed} · {x_name}"
        )
        return (
            result_html([path], [caption], COMPARE_ROOM),
            f"Saved {h.paths.relative(ctx.outputs, path)} (seed {settings.seed}).",
        )

    def before_job(session: Session) -> str:
        session.interrupted = False
        return queued(ctx.engine)

    def on_interrupt(session: Session) -> str:
        session.interrupted = True
        return waiting("Interrupting after the current image…")

    gridding = on(
        tab.compare_btn.click(before_job, session, tab.status, **FREE).then,
        on_compare,
        [
            session,
            mix.base_dd,
            tab.x_dd,
            tab.x_vals,
            tab.y_dd,
            tab.y_vals,
            *mix.settings,
            *mix.mix_values,
        ],
        [tab.grid],
        tab.status,
        **JOB,
    )
    gridding.then(None, js=into_view_js("grid", "compare-status"))
    tab.interrupt_btn.click(on_interrupt, session, tab.status, **FREE)
