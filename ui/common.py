"""What every tab of the web UI shares: the concurrency rules and where messages go.

Messages sit next to the button that caused them, in a status line (`status_line`), and stay
until that button (or another on the same line) is pressed again. Wire a button with `on()`:

    def on_save(name: str) -> tuple:
        path = h.save_something(ctx, name)          # may raise SdloraError
        return gr.Dropdown(choices=...), done(f"Saved **{name}**.")

    on(tab.save_btn.click, on_save, [tab.name], [tab.choices], tab.status, **FREE)

The handler returns one value per output, then the status text (`done(...)`; a plain string is
shown as a confirmation too); generators yield the same. When it raises, the status line shows
the reason (`failed`) and every other output is left as it was (`gr.skip()`), so a mistake never
puts Gradio's error overlay on components elsewhere on the page. An error about one setting
(`SdloraError(..., setting="width")`) names it by the label of its control. `guard` is for API
endpoints, where `gradio_client` should receive the error itself.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
from collections.abc import Callable

import gradio as gr

from sdlora.bases.generate import label_of
from sdlora.errors import SdloraError
from sdlora.ui.state import MAX_ADAPTERS, Session

logger = logging.getLogger(__name__)
GPU = "gpu"  # concurrency group of every job that runs the models: one at a time
FREE = dict(concurrency_limit=None, api_visibility="private")  # quick state-only events
JOB = dict(concurrency_id=GPU, api_visibility="private")  # a button that runs the models
CSS = """
.sd-status {min-height: 1.6em; font-size: 0.95em; padding: 0 !important;}
.sd-status > .html-container {padding: 2px 6px !important;}
.sd-status .sd-ok {color: var(--body-text-color);}
.sd-status .sd-error {color: var(--error-text-color, #b91c1c); font-weight: 600;}
.sd-status .sd-wait {color: var(--body-text-color-subdued);}
#result-column {position: sticky; top: 8px; align-self: flex-start;}  /* stays in view */
.gradio-container {overflow: clip !important;}  /* 'hidden' would make sticky a no-op */
.sd-result img {image-rendering: pixelated; max-width: 100%; height: auto; display: block;}
.sd-result figure {margin: 0 0.6em 0.6em 0; display: inline-block; vertical-align: top;}
.sd-result figcaption {font-size: 0.85em; color: var(--body-text-color-subdued);}
.sd-result img {cursor: zoom-in;}
/* History: a caption would cover its thumbnail; it shows on hover or keyboard focus */
#history .thumbnail-item .caption-label {display: none;}
#history .thumbnail-item:hover .caption-label,
#history .thumbnail-item:focus-visible .caption-label {display: block;}
/* status notes: body text colour (AA contrast), not the subdued grey */
.sd-status .sd-wait {color: var(--body-text-color); font-style: italic;}
.sd-lightbox {position: fixed; inset: 0; z-index: 1000; background: rgba(0, 0, 0, 0.85);
  display: flex; flex-direction: column; align-items: center; justify-content: center;
  cursor: zoom-out;}
.sd-lightbox img {image-rendering: pixelated; max-width: none;}
.sd-lightbox p {color: #fff; margin-top: 8px;}
"""


# A1111's keys, page-wide: Ctrl+Enter (Cmd+Enter) presses the visible tab's Generate / Make
# grid, Esc its Interrupt (plain Enter in the prompt stays a new line).
KEYS_JS = """
() => {
  const press = (ids) => ids.some((id) => {
    const button = document.getElementById(id);
    if (!button || button.offsetParent === null) return false;
    button.click();
    return true;
  });
  const lightbox = () => document.querySelector(".sd-lightbox");
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      if (press(["generate", "compare"])) event.preventDefault();
    } else if (event.key === "Escape") {
      if (lightbox()) lightbox().remove();
      else press(["interrupt", "compare-interrupt"]);
    }
  });
  // the lightbox: a result or grid image, large, at the largest whole zoom the window allows
  document.addEventListener("click", (event) => {
    if (lightbox()) { lightbox().remove(); return; }
    const image = event.target.closest(".sd-result img");
    if (!image || !image.naturalWidth) return;
    const zoom = Math.max(1, Math.floor(Math.min(
      (window.innerWidth - 40) / image.naturalWidth,
      (window.innerHeight - 60) / image.naturalHeight)));
    const box = document.createElement("div");
    box.className = "sd-lightbox";
    box.setAttribute("role", "dialog");
    box.setAttribute("aria-label", "Image, large (click or Esc closes)");
    const large = document.createElement("img");
    large.src = image.src;
    large.alt = image.alt;
    large.style.width = image.naturalWidth * zoom + "px";
    large.style.height = image.naturalHeight * zoom + "px";
    const note = document.createElement("p");
    note.textContent = `${image.alt} · ${zoom}× · click or Esc closes`;
    box.append(large, note);
    document.body.append(box);
  });
}
"""


def into_view_js(result: str, status: str) -> str:
    """JS run after a job: scroll its result (or, when it failed, its status line) into view,
    as little as needed; at narrow widths the result sits under the controls."""
    return f"""
() => setTimeout(() => {{
  const failed = document.querySelector("#{status} .sd-error");
  const target = document.getElementById(failed ? "{status}" : "{result}");
  if (target) target.scrollIntoView({{block: "nearest"}});
}}, 60)
"""


def status_line(elem_id: str) -> gr.HTML:
    """The status line of one button (or one row of buttons): confirmations and errors."""
    return gr.HTML("", elem_id=elem_id, elem_classes="sd-status", padding=False)


def _inline(text: str) -> str:
    """Escape `text`, then render its **bold** and `code` spans (all the markup messages use)."""
    text = html.escape(text)
    for mark, tag in (("**", "b"), ("`", "code")):
        parts = text.split(mark)
        if len(parts) % 2 == 0:  # an unpaired mark stays as it is
            parts[-2:] = [parts[-2] + mark + parts[-1]]
        text = "".join(f"<{tag}>{part}</{tag}>" if i % 2 else part for i, part in enumerate(parts))
    return text


def done(text: str) -> str:
    """A confirmation for a status line."""
    return f'<span class="sd-ok">{_inline(text)}</span>'


def waiting(text: str) -> str:
    """A note that a job is waiting or running, for a status line."""
    return f'<span class="sd-wait">{_inline(text)}</span>'


def queued(engine) -> str:
    """What a model job shows at once when queued: what it waits for, if anything."""
    busy = engine.doing
    return waiting(
        f"Waiting for the model: it is busy {busy} (jobs that use it run one at a time)…"
        if busy
        else "Starting…"
    )


def failed(error: str | Exception, labels: Callable[[str], str] = label_of) -> str:
    """An error for a status line; an `SdloraError` names its setting by its label in the UI."""
    return f'<span class="sd-error">⚠ {_inline(message(error, labels))}</span>'


def message(err: str | Exception, labels: Callable[[str], str] = label_of, where: str = "") -> str:
    """What the page says about `err`: a user mistake in its own words, with the setting it is
    about named by `labels` (the generation settings' labels by default); anything unexpected
    is logged with its traceback and named by its type."""
    if isinstance(err, str):
        return err
    if isinstance(err, SdloraError):
        return err.worded(labels)
    if isinstance(err, gr.Error):
        return str(err.message)
    logger.exception("unexpected error in %s", where or "a handler")
    return f"{type(err).__name__}: {err}"


def on(
    trigger: Callable,
    fn: Callable,
    inputs: list | gr.components.Component | None,
    outputs: list,
    status: gr.HTML,
    labels: Callable[[str], str] = label_of,
    **kwargs,
):
    """Wire `fn` to `trigger` (e.g. `button.click`) with its messages going to `status`; an
    error about one setting names it by `labels(setting)`.

    Returns the event, for `.then(...)` or an Interrupt button's `cancels=`. Progress and queue
    position show on `status` only, so no other component is covered while the job runs.
    """
    n = len(outputs)

    def fail(err: Exception) -> tuple:
        return (*[gr.skip()] * n, failed(message(err, labels, fn.__name__)))

    def shaped(result):
        result = result if isinstance(result, tuple | list) and n else (result,)
        *values, note = result
        note = note if isinstance(note, str) and note.startswith("<span") else done(str(note))
        return (*values, note) if n else note

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def wrapper(*args, **kw):
            try:
                for result in fn(*args, **kw):
                    yield shaped(result)
            except Exception as err:
                yield fail(err) if n else fail(err)[-1]

    else:

        @functools.wraps(fn)
        def wrapper(*args, **kw):
            try:
                return shaped(fn(*args, **kw))
            except Exception as err:
                return fail(err) if n else fail(err)[-1]

    kwargs.setdefault("show_progress_on", [status])
    kwargs.setdefault("show_progress", "minimal")
    return trigger(wrapper, inputs, [*outputs, status], **kwargs)


def guard(fn: Callable) -> Callable:
    """For API endpoints: SdloraError (and anything unexpected) as gr.Error, not a traceback.
    An error about one setting names it as the API does: by its parameter name."""

    def translate(err: Exception) -> gr.Error:
        if isinstance(err, gr.Error):
            return err
        return gr.Error(message(err, str, fn.__name__), print_exception=False)

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
    """Copy the on boxes and strength sliders (values = ons then strengths) into the session.

    A strength outside the UI's range (0-1, or -1 to 2 with the extended range on) is
    refused, naming the adapter; nothing changes.
    """
    ons, strengths = values[:MAX_ADAPTERS], values[MAX_ADAPTERS:]
    low, high = session.strength_range
    for i, item in enumerate(session.mix):
        value = float(strengths[i])
        if not low <= value <= high:
            raise SdloraError(
                f"strength of {item.name} must be from {low:g} to {high:g} (got {value:g}); it "
                f"stays at {item.strength:g}"
            )
    session.base = base or session.base
    for i, item in enumerate(session.mix):
        item.enabled = bool(ons[i])
        item.strength = float(strengths[i])
    return session
