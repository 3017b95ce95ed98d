"""The Mix tab's Conflicts panel: the conflict report (`sdlora.tools.conflict`) of the mix's
switched-on adapters, as a table of pairs and a heat map written under outputs/conflicts/.

The adapters are compared as their files are (strength 1): cosine and overlap do not depend on a
positive strength, and the report is about where the adapters themselves push.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from sdlora.ui import handlers as h
from sdlora.ui.common import on, status_line, sync_mix
from sdlora.ui.state import Session

FOLDER = "conflicts"  # under the outputs folder: one heat map per press of the button
HEADERS = ["A", "B", "cosine", "overlap", "push against each other in"]
DIGITS = 4  # decimals the table shows
NEEDS_TWO = "The conflict report needs two or more adapters switched on in the mix (now {n})."
# its own queue: it reads files and does arithmetic, the models are not involved
QUEUE = dict(concurrency_id="conflicts", concurrency_limit=1, api_visibility="private")


@dataclass
class Comparison:
    """What the panel shows: the report (names for files), one row per pair, the heat map."""

    report: dict | None  # None: fewer than two adapters
    rows: list[list]  # HEADERS, one row per pair
    heatmap: Path | None  # the PNG inside the outputs folder
    note: str  # the status line's text


def compare_mix(ctx: h.Context, strengths: dict[str, float]) -> Comparison:
    """The conflict report of the adapters named in `strengths` (the mix's switched-on ones),
    resolved as the mix resolves them (`handlers.mix_files`); the heat map is written under
    outputs/conflicts/. Nonlinear, DoRA or mixed-family adapters: the library's one-line refusal."""
    from sdlora.io.formats import load_adapter
    from sdlora.tools.conflict import check_comparable, compare, write_heatmap

    files = h.mix_files(ctx, strengths)
    if len(files) < 2:
        return Comparison(None, [], None, NEEDS_TWO.format(n=len(files)))
    adapters = []
    for name, (path, _) in files.items():
        adapter = load_adapter(path)
        adapter.source = name  # messages and the report name it as the page does, not its path
        adapters.append(adapter)
    check_comparable(adapters)
    report = compare(adapters)
    rows = [
        [
            pair["a"],
            pair["b"],
            round(pair["overall"]["cosine"], DIGITS),
            round(pair["overall"]["overlap"], DIGITS),
            ", ".join(pair["conflicts"]) or "none",
        ]
        for pair in report["pairs"]
    ]
    heatmap = write_heatmap(report, h._free(ctx.outputs / FOLDER / f"{h._stamp()}.png"))
    legend = ", ".join(f"{i} = {name}" for i, name in enumerate(files, 1))
    note = (
        f"{len(report['pairs'])} pair(s) compared; heat map rows: {legend} "
        f"(blue +1, white 0, red −1; framed: pushing against each other) · saved as "
        f"{h.paths.relative(ctx.outputs, heatmap)}"
    )
    return Comparison(report, rows, heatmap, note)


def per_block(report: dict | None) -> str:
    """The report's per-block tables (`format_report`) as a Markdown code block."""
    from sdlora.tools.conflict import format_report

    return f"```text\n{format_report(report)}\n```" if report else ""


@dataclass
class Panel:
    button: gr.Button
    status: gr.HTML
    table: gr.Dataframe
    heatmap: gr.Image
    blocks: gr.Markdown


def layout() -> Panel:
    """The panel: button, its status line, the pairs' table, the heat map, per-block details."""
    with gr.Accordion("Conflicts", open=False, elem_id="conflicts-box"):
        button = gr.Button("Compare the mix's adapters", size="sm", elem_id="compare-conflicts")
        status = status_line("conflicts-status")
        table = gr.Dataframe(
            headers=HEADERS,
            datatype=["str", "str", "number", "number", "str"],
            interactive=False,
            label="Each pair over all blocks: ΔW cosine similarity and relative overlap",
            elem_id="conflicts-table",
        )
        heatmap = gr.Image(
            type="filepath",
            interactive=False,
            label="Cosine per block (rows: pairs; columns: blocks, then all)",
            elem_id="conflicts-heatmap",
        )
        with gr.Accordion("Per block", open=False):
            blocks = gr.Markdown(elem_id="conflicts-blocks")
    return Panel(button, status, table, heatmap, blocks)


def wire(ctx: h.Context, panel: Panel, session: gr.State, base_dd, mix_values: list) -> None:
    """The button: read the mix from the page (on boxes and strengths), compare, show."""

    def on_compare(session: Session, base: str, *values) -> tuple:
        session = sync_mix(session, base, values)
        result = compare_mix(ctx, session.strengths())
        image = str(result.heatmap) if result.heatmap else None
        table = gr.Dataframe(value=result.rows, headers=HEADERS)
        return table, image, per_block(result.report), result.note

    on(
        panel.button.click,
        on_compare,
        [session, base_dd, *mix_values],
        [panel.table, panel.heatmap, panel.blocks],
        panel.status,
        **QUEUE,
    )
