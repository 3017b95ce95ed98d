"""What every tab of the web UI shares: the concurrency rules and turning errors into messages."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable

import gradio as gr
from sdlora.ui.state import MAX_ADAPTERS, Session

from sdlora.errors import SdloraError

logger = logging.getLogger(__name__)
GPU = "gpu"  # concurrency group of every job that runs the models: one at a time
FREE = dict(concurrency_limit=None, api_visibility="private")  # quick state-only events
JOB = dict(concurrency_id=GPU, api_visibility="private")  # a button that runs the models


def guard(fn: Callable) -> Callable:
    """Show SdloraError (and anything unexpected) as a message in the page, not a traceback."""

    def translate(err: Exception) -> gr.Error:
        if isinstance(err, gr.Error):
            return err
        if isinstance(err, SdloraError):
            return gr.Error(str(err), print_exception=False)
        logger.exception("unexpected error in %s", fn.__name__)
        return gr.Error(f"{type(err).__name__}: {err}", print_exception=False)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def wrapper_gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as err:
                raise translate(err) from None

        return wrapper_gen

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            raise translate(err) from None

    return wrapper


def reporter(progress: gr.Progress) -> Callable[[float, str], None]:
    """The handlers' `progress(fraction, text)` callable, shown by Gradio's progress bar."""
    return lambda fraction, text: progress(fraction, desc=text)


def sync_mix(session: Session, base: str, values: tuple) -> Session:
    """Copy the on boxes and strength sliders (values = ons then strengths) into the session."""
    ons, strengths = values[:MAX_ADAPTERS], values[MAX_ADAPTERS:]
    session.base = base or session.base
    for i, item in enumerate(session.mix):
        item.enabled = bool(ons[i])
        item.strength = float(strengths[i])
    return session
