"""The Compare tab: one adapter of the mix over several strengths, or two on an X/Y grid."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
from sdlora.ui import handlers as h
from sdlora.ui.common import JOB, guard, reporter, sync_mix
from sdlora.ui.state import Session
from sdlora.ui.tab_mix import NO_SECOND, MixTab


@dataclass
class CompareTab:
    x_dd: gr.Dropdown
    x_vals: gr.Textbox
    y_dd: gr.Dropdown
    y_vals: gr.Textbox
    compare_btn: gr.Button
    grid_img: gr.Image
    status: gr.Markdown


def layout() -> CompareTab:
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
            [NO_SECOND], value=NO_SECOND, label="Y adapter (optional)", elem_id="y-adapter"
        )
        y_vals = gr.Textbox("0, 0.5, 1", label="Y strengths")
    compare_btn = gr.Button("Make grid", variant="primary", elem_id="compare")
    grid_img = gr.Image(label="Grid", type="filepath", format="png", elem_id="grid")
    status = gr.Markdown()
    return CompareTab(x_dd, x_vals, y_dd, y_vals, compare_btn, grid_img, status)


def wire(ctx: h.Context, tab: CompareTab, session: gr.State, mix: MixTab) -> None:
    """The grid uses the Mix tab's base, mix and generation settings."""

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
        session = sync_mix(session, base, values)
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
            reporter(progress),
        )
        return str(path), f"Saved `{h.paths.relative(ctx.outputs, path)}`"

    tab.compare_btn.click(
        on_compare,
        [
            session,
            mix.base_dd,
            *mix.settings,
            tab.x_dd,
            tab.x_vals,
            tab.y_dd,
            tab.y_vals,
            *mix.mix_values,
        ],
        [tab.grid_img, tab.status],
        **JOB,
    )
