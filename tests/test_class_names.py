"""No class of the trainer or the web UI takes the name of a library class: a reader (and an
import) meeting `Adapter` must find one thing."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def classes(folder: str) -> dict[str, list[str]]:
    """Class name -> the files of `folder` (recursively) that define it at module level."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef):
                found.setdefault(node.name, []).append(str(path.relative_to(ROOT)))
    return found


def test_no_trainer_or_ui_class_shadows_a_library_class():
    library = classes("sdlora")
    assert library, "no library classes found"
    shadowing = {
        name: files + library[name]
        for folder in ("train", "ui")
        for name, files in classes(folder).items()
        if name in library
    }
    assert shadowing == {}


def test_no_two_library_classes_share_a_name():
    assert {name: files for name, files in classes("sdlora").items() if len(files) > 1} == {}
