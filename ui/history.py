"""Earlier images and saved mixes: what the Mix tab's History and "Saved mixes" read and write.

Every image the UI saves carries its recipe (`sdlora.bases.generate.png_info`): the full settings as
JSON in the `sdlora` text chunk and A1111's `parameters` text. Restoring reads the JSON, or the
`parameters` text for an image that has only that, so an image can be drawn again exactly.
Saved mixes are small JSON files in `mixes/` of the outputs folder. No Gradio here.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from sdlora.bases.generate import SETTINGS
from sdlora.errors import SdloraError
from sdlora.io.writing import written_file
from sdlora.lora.prompt_tags import parse_parameters
from sdlora.ui import paths

MAX_SHOWN = 60  # newest images listed in the History gallery
# what an image's record restores: its generation settings (one image each) and its mix
RECIPE_FIELDS = (
    *(n for n in SETTINGS if n != "num_images"),
    "adapters",
    "blocks",
    "schedules",
)


def list_images(outputs: Path, most: int = MAX_SHOWN) -> list[Path]:
    """The newest generated images in outputs/images/ (this session's and earlier ones)."""
    folder = outputs / "images"
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("*.png") if not p.name.startswith(".")]
    found.sort(key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
    return found[:most]


def caption(record: dict) -> str:
    """'seed 5 · style 0.8, detail 0.35' (or '· no adapters')."""
    mix = ", ".join(f"{n} {s:g}" for n, s in (record.get("adapters") or {}).items())
    return f"seed {record.get('seed', '?')} · {mix or 'no adapters'}"


def read_recipe(outputs: Path, name: str) -> dict:
    """The settings an image of outputs/images/ was drawn with (GenerateSettings field names)."""
    path = paths.inside(outputs / "images", name, "image")
    if not path.is_file():
        raise SdloraError(f"image {name!r}: no such file in the images folder")
    return recipe_of(path, repr(name))


def recipe_of(path: Path, shown: str) -> dict:
    """The settings an image file holds: its sdlora record, else A1111's `parameters` text
    (PNG Info); `shown` names the image in messages."""
    try:
        with Image.open(path) as image:
            text = dict(getattr(image, "text", {}) or {})
    except OSError:
        raise SdloraError(f"image {shown}: not a readable PNG") from None
    if "sdlora" in text:
        try:
            record = json.loads(text["sdlora"])
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            return {k: record[k] for k in RECIPE_FIELDS if k in record}
    if "parameters" in text:
        return parse_parameters(text["parameters"])
    raise SdloraError(f"image {shown}: holds no recipe (no sdlora or parameters text)")


def _mix_file(outputs: Path, name: str) -> Path:
    name = paths.clean_name(name, "mix name").removesuffix(".json")
    return paths.inside(outputs, f"mixes/{name}.json", "mix name")


def save_mix(outputs: Path, name: str, base: str, mix: list[dict]) -> str:
    """Write the mix (`Session.mix_record()`) under `name`, replacing one of that name."""
    if not mix:
        raise SdloraError("the mix is empty; add adapters before saving it")
    path = _mix_file(outputs, name)
    with written_file(path) as tmp:
        Path(tmp).write_text(json.dumps({"base": base, "mix": mix}, indent=1), encoding="utf-8")
    return path.stem


def list_mixes(outputs: Path) -> list[str]:
    """Names of the saved mixes."""
    folder = outputs / "mixes"
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def load_mix(outputs: Path, name: str) -> tuple[str, list[dict]]:
    """(base, mix record) of saved mix `name`."""
    if not name:
        raise SdloraError("pick a saved mix first")
    path = _mix_file(outputs, name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SdloraError(f"no saved mix named {name!r}; press refresh") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SdloraError(f"saved mix {name!r} is damaged; save it again") from None
    if not isinstance(data, dict) or not isinstance(data.get("mix"), list):
        raise SdloraError(f"saved mix {name!r} is damaged; save it again")
    return str(data.get("base") or ""), data["mix"]
