"""The Mix tab's generation-setting controls: bounded by the library's limits (the slider's track,
the number box's spinner), and a typed value outside them is refused beside the Generate button
by the library's check (`handlers.make_settings`) instead of by Gradio's toast.

Gradio writes a typing stub (`controls.pyi`) beside every module that defines a component
subclass; it is kept in the repository so that importing this module writes nothing.
"""

from __future__ import annotations

import gradio as gr

from gradio.events import Dependency

class SettingSlider(gr.Slider):
    """A gr.Slider whose typed values reach the handler even when out of range."""

    is_template = True  # drawn by the frontend as a plain slider

    def preprocess(self, payload: float) -> float:
        return within_64_bits(gr.Number.round_to_precision(payload, self.precision))
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class SettingNumber(gr.Number):
    """A gr.Number whose typed values reach the handler even when out of range."""

    is_template = True  # drawn by the frontend as a plain number box

    def preprocess(self, payload: float | None) -> float | int | None:
        if payload is None:
            return None
        return within_64_bits(self.round_to_precision(payload, self.precision))
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component