"""The Export tab: the visitor's mix written as a checkpoint (diffusers folder or single file)
or as one merged LoRA, into `exports/` of the outputs folder."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
from sdlora.ui import handlers as h
from sdlora.ui.common import JOB, guard, reporter, sync_mix
from sdlora.ui.state import Session
from sdlora.ui.tab_mix import MixTab


@dataclass
class ExportTab:
    fmt: gr.Radio
    dtype: gr.Radio
    name: gr.Textbox
    overwrite: gr.Checkbox
    export_btn: gr.Button
    files: gr.File
    status: gr.Markdown


def layout() -> ExportTab:
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
        dtype = gr.Radio(["fp16", "bf16", "fp32"], value="fp16", label="dtype (checkpoints)")
        name = gr.Textbox(label="Name", placeholder="mix-<date>-<time>", elem_id="export-name")
        overwrite = gr.Checkbox(False, label="Overwrite")
    export_btn = gr.Button("Export", variant="primary", elem_id="export")
    files = gr.File(label="Download", file_count="multiple", elem_id="export-files")
    status = gr.Markdown(elem_id="export-status")
    return ExportTab(fmt, dtype, name, overwrite, export_btn, files, status)


def wire(ctx: h.Context, tab: ExportTab, session: gr.State, mix: MixTab) -> None:
    """Export the Mix tab's base and mix; an exported diffusers folder joins the base choices."""

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
        session = sync_mix(session, base, values)
        out = h.run_export(
            ctx, base, session.strengths(), fmt, dtype, name, overwrite, reporter(progress)
        )
        files = sorted(p for p in out.rglob("*") if p.is_file()) if out.is_dir() else [out]
        mix = ", ".join(f"{n} {s:g}" for n, s in session.strengths().items()) or "the base alone"
        return (
            [str(f) for f in files],
            f"Wrote `{h.paths.relative(ctx.outputs, out)}` ({mix}) in the outputs folder.",
            gr.Dropdown(choices=h.base_choices(ctx)),
        )

    tab.export_btn.click(
        on_export,
        [session, mix.base_dd, tab.fmt, tab.dtype, tab.name, tab.overwrite, *mix.mix_values],
        [tab.files, tab.status, mix.base_dd],
        **JOB,
    )
