"""LoRA cards: the adapters a visitor can add, as a grid of cards (A1111's "Lora" tab).

Each card shows a preview (the newest sample image the trainer saved beside the adapter, in
its run's `samples/` folder, else the adapter's initials), its name, family and trigger words.
A click adds it to the mix (`tab_mix.wire`); a search box filters by name, family or word; an
adapter made for another family than the chosen base is dimmed, with the reason on the card.
Previews are small inline images (data: URLs), so no folder but the outputs is ever served.
"""

from __future__ import annotations

import base64
import functools
import html
import io
from pathlib import Path

from PIL import Image

from sdlora.errors import SdloraError
from sdlora.ui import handlers as h

PREVIEW = 96  # px: the longest side of a card's preview
# Clicks on a card reach the server as a 'click' event with the card's adapter name.
CARDS_JS = """
element.addEventListener("click", (event) => {
  const card = event.target.closest(".sd-card");
  if (card && !card.classList.contains("sd-off")) trigger("click", {name: card.dataset.name});
});
element.addEventListener("keydown", (event) => {
  const card = event.target.closest(".sd-card");
  if (card && (event.key === "Enter" || event.key === " ")) { event.preventDefault(); card.click(); }
});
"""
CSS = """
.sd-cards {display: flex; flex-wrap: wrap; gap: 8px; max-height: 300px; overflow-y: auto;}
.sd-card {width: 118px; border: 1px solid var(--border-color-primary); border-radius: 6px;
  padding: 4px; cursor: pointer; background: var(--block-background-fill); text-align: left;
  font: inherit; color: var(--body-text-color);}
.sd-card:hover, .sd-card:focus {border-color: var(--color-accent);}
.sd-card img, .sd-card .sd-initials {width: 108px; height: 108px; object-fit: contain;
  image-rendering: pixelated; display: flex; align-items: center; justify-content: center;
  background: var(--background-fill-secondary); font-size: 2em; border-radius: 4px;}
.sd-card b {display: block; overflow-wrap: anywhere; font-size: 0.9em;}
.sd-card small {display: block; font-size: 0.8em; color: var(--body-text-color);}
.sd-card.sd-off {opacity: 0.55; cursor: not-allowed;}
"""


def sample_of(adapter: Path) -> Path | None:
    """The newest image in the `samples/` folder beside an adapter (the trainer writes them)."""
    folder = adapter.parent / "samples"
    if not folder.is_dir() or folder.is_symlink():
        return None
    found = [p for p in folder.glob("*.png") if p.is_file() and not p.is_symlink()]
    return max(found, key=lambda p: p.stat().st_mtime_ns, default=None)


@functools.lru_cache(maxsize=256)
def _thumbnail(path: str, mtime_ns: int) -> str:
    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((PREVIEW, PREVIEW), Image.Resampling.NEAREST)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def preview(adapter: Path) -> str | None:
    """A data: URL of the adapter's newest sample image, or None."""
    sample = sample_of(adapter)
    if sample is None:
        return None
    try:
        return _thumbnail(str(sample), sample.stat().st_mtime_ns)
    except OSError:
        return None


def card(ctx: h.Context, name: str, base_family: str | None, in_mix: bool) -> tuple[str, str]:
    """(the card's HTML, the text the search box matches) for adapter `name`."""
    try:
        path = h.adapter_path(ctx, name)
        info = h.adapter_info(ctx, name)
        family, words = info.get("architecture") or "unknown", info.get("trigger_words") or []
    except SdloraError as err:
        return "", name + str(err)
    off = base_family is not None and family != base_family
    reason = f"made for {family}; the base is {base_family}" if off else ""
    state = "in the mix" if in_mix else reason or "click to add"
    image = preview(path)
    shown = (
        f'<img src="{image}" alt="">'
        if image
        else f'<span class="sd-initials" aria-hidden="true">{html.escape(name.split("/")[-1][:2])}</span>'
    )
    label = f"Add {name} to the mix" if not off else f"{name}: {reason}"
    dim = ' aria-disabled="true"' if off else ""
    body = (
        f'<button type="button" class="sd-card{" sd-off" if off else ""}" '
        f'data-name="{html.escape(name)}" aria-label="{html.escape(label)}" '
        f'title="{html.escape(state)}"{dim}>{shown}<b>{html.escape(name)}</b>'
        f"<small>{html.escape(family)}</small>"
        + (f"<small>{html.escape(', '.join(words))}</small>" if words else "")
        + (f"<small>⚠ {html.escape(reason)}</small>" if off else "")
        + "</button>"
    )
    return body, " ".join([name, family, *words]).lower()


def cards_html(ctx: h.Context, base: str, names_in_mix: list[str], search: str = "") -> str:
    """The grid of cards, filtered by `search` (all its words must match)."""
    names = h.list_adapters(ctx)
    if not names:
        return f'<p class="sd-empty">{html.escape(h.adapters_hint(ctx, names) or "")}</p>'
    family = h.base_family(ctx, base)
    words = (search or "").lower().split()
    shown = []
    for name in names:
        body, text = card(ctx, name, family, name in names_in_mix)
        if body and all(w in text for w in words):
            shown.append(body)
    if not shown:
        return f'<p class="sd-empty">No adapter matches {html.escape(search)!r}.</p>'
    return f'<div class="sd-cards">{"".join(shown)}</div>'
