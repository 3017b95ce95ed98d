"""The strength slider of an adapter row: 0 to 1, and an out-of-range typed value is refused
beside the button row (by `common.sync_mix`) instead of by Gradio's toast.

Gradio writes a typing stub (`strength.pyi`) beside every module that defines a component
subclass; it is kept in the repository so that importing this module writes nothing.
"""

from __future__ import annotations

import gradio as gr

from gradio.events import Dependency

class Strength(gr.Slider):
    """A gr.Slider whose typed values reach the handler even when out of range."""

    is_template = True  # drawn by the frontend as a plain slider

    def preprocess(self, payload: float) -> float:
        return float(payload)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component