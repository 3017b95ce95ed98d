"""Path safety: every file the UI reads or writes resolves inside one of the folders it was given.

Names come from the browser or the API, so they are treated as hostile: no absolute paths, no
`..`, no symlink that leads out of the folder (checked on the resolved path), no hidden names.
"""

from __future__ import annotations

import re
import string
from pathlib import Path, PurePosixPath

from sdlora.errors import SdloraError

ADAPTER_SUFFIX = ".safetensors"
# A name the UI writes: letters, digits, '.', '_', '-', ' ' and '+', not starting with '.' or ' '
# nor ending with '.', at most 128 characters.
SAFE_CHARS = frozenset(string.ascii_letters + string.digits + "._+- ")
MAX_PART = 255  # bytes in one file or folder name (Linux, macOS and Windows file systems)
MAX_PATH = 1024  # characters in a name with its folders: deeper is not a folder anyone keeps
SHOWN_CHARS = 80  # characters of a name quoted in a message


def inside(root: str | Path, name: str, what: str = "path") -> Path:
    """`root/name` resolved, refused unless it stays inside `root` (symlinks followed)."""
    if not isinstance(name, str) or not name.strip():
        raise SdloraError(f"{what}: no name given")
    if "\x00" in name or "\\" in name:
        raise SdloraError(f"{what} {shown(name)}: use plain names with '/' between folders")
    if len(name) > MAX_PATH or any(len(part.encode()) > MAX_PART for part in name.split("/")):
        raise SdloraError(
            f"{what} {shown(name)}: too long; a name has at most {MAX_PART} bytes between "
            f"slashes and {MAX_PATH} characters in all"
        )
    rel = PurePosixPath(name)
    if rel.is_absolute() or name.startswith("~") or re.match(r"^[A-Za-z]:", name):
        raise SdloraError(
            f"{what} {shown(name)}: absolute paths are not allowed; give a name inside the folder"
        )
    if any(part in ("..", ".") for part in name.split("/")):
        raise SdloraError(f"{what} {shown(name)}: '..' and '.' are not allowed in names")
    base = Path(root).resolve()
    try:
        path = (base / rel).resolve()
    except OSError as err:  # a link loop, a name the file system refuses
        raise SdloraError(f"{what} {shown(name)}: cannot be looked up ({err.strerror})") from None
    if not path.is_relative_to(base) or path == base:
        raise SdloraError(
            f"{what} {shown(name)}: leads outside its folder; nothing was read or written"
        )
    return path


def shown(name: str) -> str:
    """`name` quoted for a message, cut short (saying how long it was) when it is long."""
    if len(name) <= SHOWN_CHARS:
        return repr(name)
    return f"{name[: SHOWN_CHARS - 20]!r}… ({len(name)} characters)"


def clean_name(name: str, what: str = "name") -> str:
    """A single file name the UI may create (no folders, no hidden files); else an error."""
    name = (name or "").strip()
    if not (
        0 < len(name) <= 128
        and set(name) <= SAFE_CHARS
        and name[0] not in ". "
        and not name.endswith(".")
    ):
        raise SdloraError(
            f"{what} {shown(name)}: use letters, digits, '-', '_', '.' and spaces only "
            "(no folders, at most 128 characters)"
        )
    return name


def adapter_file(root: str | Path, name: str) -> Path:
    """The adapter file called `name` (with or without `.safetensors`) inside `root`."""
    if not name.endswith(ADAPTER_SUFFIX):
        name += ADAPTER_SUFFIX
    path = inside(root, name, "adapter")
    if not path.is_file():
        raise SdloraError(
            f"adapter {shown(name)}: no such file in the adapters folder; press refresh"
        )
    return path


def list_adapters(root: str | Path) -> list[str]:
    """Adapter names (relative paths without `.safetensors`) found in `root`, sorted."""
    base = Path(root).resolve()
    if not base.is_dir():
        return []
    names = []
    for path in sorted(base.rglob("*" + ADAPTER_SUFFIX)):
        rel = path.relative_to(base).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue  # hidden, or a temporary file being written
        try:
            if inside(base, rel).is_file():
                names.append(rel[: -len(ADAPTER_SUFFIX)])
        except SdloraError:
            continue  # a symlink that leads out
    return names


def list_folders(root: str | Path) -> list[str]:
    """Names of the non-hidden subfolders of `root` that stay inside it, sorted."""
    base = Path(root).resolve()
    if not base.is_dir():
        return []
    names = []
    for path in sorted(base.iterdir()):
        if path.name.startswith("."):
            continue
        try:
            if inside(base, path.name).is_dir():
                names.append(path.name)
        except SdloraError:
            continue
    return names


def relative(root: str | Path, path: str | Path) -> str:
    """`path` as a '/'-separated name relative to `root`."""
    return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
