"""The Inspect tab: what `sdlora inspect` says about an adapter of the adapters folder."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from sdlora.errors import SdloraError
from sdlora.ui import handlers as h
from sdlora.ui.common import JOB, on, status_line


@dataclass
class InspectTab:
    adapter_dd: gr.Dropdown
    inspect_btn: gr.Button
    status: gr.HTML
    out: gr.Code


def layout(ctx: h.Context) -> InspectTab:
    with gr.Row(equal_height=True):
        adapter_dd = gr.Dropdown(
            h.list_adapters(ctx), label="Adapter", scale=4, elem_id="inspect-pick"
        )
        inspect_btn = gr.Button("Inspect", scale=1, elem_id="inspect")
    status = status_line("inspect-status")
    out = gr.Code(label="sdlora inspect", language=None, elem_id="inspect-out")
    return InspectTab(adapter_dd, inspect_btn, status, out)


def wire(ctx: h.Context, tab: InspectTab, base_dd: gr.Dropdown) -> None:
    """Coverage is checked against the base picked in the Mix tab."""

    def on_inspect(name: str, base: str) -> tuple:
        if not name:
            raise SdloraError("pick an adapter first")
        return h.inspect_adapter(ctx, name, base), f"Inspected **{name}** on base {base}."

    on(tab.inspect_btn.click, on_inspect, [tab.adapter_dd, base_dd], [tab.out], tab.status, **JOB)
