"""The Mix tab's generation-setting controls: bounded by the library's limits (the slider's track,
the number box's spinner), and a typed value outside them is refused beside the Generate button
by the library's check (`handlers.make_settings`) instead of by Gradio's toast.

A typed whole number beyond 64 bits (1e30) goes on as a float: Gradio's JSON (orjson) refuses
such ints, and the page's event stream would die the moment the value is sent back (the page
state kept in browser storage sends every setting back).

Gradio writes a typing stub (`controls.pyi`) beside every module that defines a component
subclass; it is kept in the repository so that importing this module writes nothing.
"""

from __future__ import annotations

import gradio as gr

JSON_INTS = range(-(2**63), 2**64)  # the ints Gradio's JSON (orjson) can send


def within_64_bits(value: float | int) -> float | int:
    """`value`, as a float when it is an int that JSON cannot carry (the handler refuses it)."""
    return float(value) if isinstance(value, int) and value not in JSON_INTS else value


class SettingSlider(gr.Slider):
    """A gr.Slider whose typed values reach the handler even when out of range."""

    is_template = True  # drawn by the frontend as a plain slider

    def preprocess(self, payload: float) -> float:
        return within_64_bits(gr.Number.round_to_precision(payload, self.precision))


class SettingNumber(gr.Number):
    """A gr.Number whose typed values reach the handler even when out of range."""

    is_template = True  # drawn by the frontend as a plain number box

    def preprocess(self, payload: float | None) -> float | int | None:
        if payload is None:
            return None
        return within_64_bits(self.round_to_precision(payload, self.precision))
