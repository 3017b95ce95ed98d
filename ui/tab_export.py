"""The Export tab: the visitor's mix written as a checkpoint (diffusers folder or single file)
or as one merged LoRA, into `exports/` of the outputs folder.

Before writing it shows what will be written (mix, format, estimated size), and an empty mix
(a full copy of the base, gigabytes on a real model) is written only after a second press.
A diffusers folder is offered as one zip. Nonlinear adapters can be distilled to plain LoRAs
of a chosen rank (`sdlora.tools.distill`) so that the mix can be exported at all. A merged
LoRA is the exact sum by default, or a TIES / DARE / magnitude-pruned / SVD merge
(`sdlora.tools.merge.merge_adapters`) whose reconstruction error the status line reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from sdlora.bases.generate import label_of
from sdlora.errors import SdloraError
from sdlora.ui import exporting as ex
from sdlora.ui import handlers as h
from sdlora.ui.common import FREE, JOB, failed, on, queued, reporter, status_line, sync_mix
from sdlora.ui.controls import SettingNumber
from sdlora.ui.state import Session
from sdlora.ui.tab_mix import MixTab

LABELS = {
    "rank": "Distilled rank",
    "method": "Merge method",
    "density": "Density",
    "merge_rank": "Merged rank",
    "seed": "Merge seed",
}  # how errors about this tab's settings name them


@dataclass
class ExportTab:
    fmt: gr.Radio
    dtype: gr.Radio
    name: gr.Textbox
    overwrite: gr.Checkbox
    distill: gr.Checkbox
    rank: gr.Number
    method: gr.Dropdown
    density: gr.Number
    merge_rank: gr.Number
    seed: gr.Number
    plan: gr.Markdown
    export_btn: gr.Button
    confirm_row: gr.Row
    confirm_btn: gr.Button
    cancel_btn: gr.Button
    status: gr.HTML
    files: gr.File
    merge_row: gr.Row

    @property
    def form(self) -> list:
        return [
            self.fmt,
            self.dtype,
            self.name,
            self.overwrite,
            self.distill,
            self.rank,
            self.method,
            self.density,
            self.merge_rank,
            self.seed,
        ]


def merge_visibility(fmt: str, method: str) -> tuple:
    """Which merge settings apply: the row for a LoRA export, Density for the pruning methods,
    Merged rank for every method but the exact sum, Merge seed for DARE."""
    return (
        gr.Row(visible=fmt == "lora"),
        gr.Number(visible=method in ex.DENSITY_METHODS),
        gr.Number(visible=method != "sum"),
        gr.Number(visible=method in ("dare", "dare-ties")),
    )


def merge_settings(fmt: str, method: str, density, merge_rank, seed) -> dict:
    """`run_export`'s merge arguments from the boxes: only those that apply to `method` (the
    others are hidden), so "sum" stays the exact merge; nothing for a checkpoint export."""
    if fmt != "lora":
        return {}
    method = method or "sum"
    return {
        "method": method,
        "density": density if method in ex.DENSITY_METHODS else None,
        "rank": ex.merge_rank(merge_rank) if method != "sum" else None,
        "seed": ex.merge_seed(seed) if method in ("dare", "dare-ties") else 0,
    }


def layout() -> ExportTab:
    gr.Markdown(
        "Write your current mix (Mix tab: base, adapters that are on, strengths, blocks) into "
        "`exports/` of the outputs folder."
    )
    fmt = gr.Radio(
        [
            ("diffusers folder", "diffusers"),
            ("single file (A1111 / ComfyUI checkpoint)", "single-file"),
            ("one merged LoRA (exact sum, or TIES / DARE / SVD below)", "lora"),
        ],
        value="diffusers",
        label="Format",
        elem_id="export-format",
    )
    with gr.Row():
        dtype = gr.Radio(["fp16", "bf16", "fp32"], value="fp16", label="dtype (checkpoints)")
        name = gr.Textbox(label="Name", placeholder="mix-<date>-<time>", elem_id="export-name")
        overwrite = gr.Checkbox(False, label="Overwrite", elem_id="export-overwrite")
    with gr.Row(equal_height=True):
        distill = gr.Checkbox(
            False,
            label="Distill nonlinear adapters to a plain LoRA first (needed to export them)",
            elem_id="export-distill",
            scale=3,
        )
        rank = SettingNumber(  # typed values reach `ex.distill_rank`, which says what is wrong
            8,
            minimum=1,
            maximum=ex.MAX_DISTILL_RANK,
            label=LABELS["rank"],
            scale=1,
            elem_id="export-rank",
        )
    with gr.Row(visible=False, equal_height=True, elem_id="export-merge") as merge_row:
        method = gr.Dropdown(
            list(ex.MERGE_METHODS),
            value="sum",
            label=LABELS["method"],
            info="sum: exact (ranks concatenated); ties, dare, dare-ties, magnitude-prune, svd: "
            "per-layer ΔW merges factored to Merged rank",
            elem_id="export-method",
            scale=2,
        )
        density = SettingNumber(  # typed values reach the library's `check_density`
            0.5,
            label=LABELS["density"],
            info="fraction of each ΔW kept, in (0, 1]",
            visible=False,
            elem_id="export-density",
        )
        merge_rank = SettingNumber(
            None,
            label=LABELS["merge_rank"],
            info="empty: the largest input rank",
            visible=False,
            elem_id="export-merge-rank",
        )
        seed = SettingNumber(
            0, precision=0, label=LABELS["seed"], visible=False, elem_id="export-seed"
        )
    plan = gr.Markdown(elem_id="export-plan")
    export_btn = gr.Button("Export", variant="primary", elem_id="export")
    with gr.Row(visible=False, elem_id="export-confirm") as confirm_row:
        confirm_btn = gr.Button("Export the base alone", variant="stop", elem_id="export-base")
        cancel_btn = gr.Button("Cancel", elem_id="export-cancel")
    status = status_line("export-status")
    files = gr.File(label="Download", file_count="multiple", elem_id="export-files")
    return ExportTab(
        fmt,
        dtype,
        name,
        overwrite,
        distill,
        rank,
        method,
        density,
        merge_rank,
        seed,
        plan,
        export_btn,
        confirm_row,
        confirm_btn,
        cancel_btn,
        status,
        files,
        merge_row,
    )


def wire(ctx: h.Context, tab: ExportTab, session: gr.State, mix: MixTab, tab_item: gr.Tab) -> None:
    """Export the Mix tab's base and mix; an exported diffusers folder joins the base choices."""

    def on_plan(session: Session, base: str, fmt: str, dtype: str) -> str:
        try:
            return ex.export_plan(ctx, base, session.strengths(), fmt, dtype, session.blocks())
        except SdloraError as err:
            return f"⚠ {err}"

    def export(
        base_alone_ok: bool,
        session: Session,
        base: str,
        fmt: str,
        dtype: str,
        name: str,
        overwrite: bool,
        distill: bool,
        rank: int,
        method: str,
        density: float | None,
        merge_rank: float | None,
        seed: float | None,
        prompt: str,
        progress: gr.Progress,
        values: tuple,
    ) -> list:
        session = sync_mix(session, base, values)
        notes: list[str] = []
        try:
            out = ex.run_export(
                ctx,
                base,
                session.strengths(),
                fmt,
                dtype,
                name,
                overwrite,
                reporter(progress),
                blocks=session.blocks(),
                base_alone_ok=base_alone_ok,
                distill_rank=ex.distill_rank(rank) if distill else 0,
                prompts=[prompt] if (prompt or "").strip() else None,
                notes=notes,
                **merge_settings(fmt, method, density, merge_rank, seed),
            )
        except ex.BaseAlone as err:
            return [gr.skip(), gr.skip(), gr.Row(visible=True), failed(err)]
        files = [ex.zip_folder(out, reporter(progress))] if out.is_dir() else [out]
        mix_text = (
            ", ".join(f"{n} {s:g}" for n, s in session.strengths().items()) or "the base alone"
        )
        note = f"Wrote {h.paths.relative(ctx.outputs, out)} ({mix_text})."
        if out.is_dir():
            note += f" Download: {files[0].name}."
        note += "".join(f" {line}." for line in notes)
        return [
            [str(f) for f in files],
            gr.Dropdown(choices=h.base_choices(ctx)),
            gr.Row(visible=False),
            note,
        ]

    def handler(base_alone_ok: bool):
        """Export's event handler; Confirm's says the base alone may be written."""

        def run(
            session,
            base,
            fmt,
            dtype,
            name,
            overwrite,
            distill,
            rank,
            method,
            density,
            merge_rank,
            seed,
            prompt,
            progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio injects it)
            *values,
        ) -> list:
            settings = (fmt, dtype, name, overwrite, distill, rank)
            settings += (method, density, merge_rank, seed, prompt)
            return export(base_alone_ok, session, base, *settings, progress, values)

        return run

    def before_job() -> str:
        return queued(ctx.engine)

    inputs = [session, mix.base_dd, *tab.form, mix.prompt, *mix.mix_values]
    outputs = [tab.files, mix.base_dd, tab.confirm_row]
    for button, on_click in ((tab.export_btn, handler(False)), (tab.confirm_btn, handler(True))):
        on(
            button.click(before_job, None, tab.status, **FREE).then,
            on_click,
            inputs,
            outputs,
            tab.status,
            lambda setting: LABELS.get(setting) or label_of(setting),
            **JOB,
        )
    tab.cancel_btn.click(
        lambda: (gr.Row(visible=False), "Nothing was written."),
        None,
        [tab.confirm_row, tab.status],
        **FREE,
    )
    plan_inputs = [session, mix.base_dd, tab.fmt, tab.dtype]
    tab_item.select(on_plan, plan_inputs, tab.plan, **FREE)
    for control in (tab.fmt, tab.dtype):
        control.change(on_plan, plan_inputs, tab.plan, **FREE)
    shown = [tab.merge_row, tab.density, tab.merge_rank, tab.seed]
    for control in (tab.fmt, tab.method):
        control.change(merge_visibility, [tab.fmt, tab.method], shown, **FREE)
