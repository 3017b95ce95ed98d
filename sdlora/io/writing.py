"""Writing files and folders: whole or not at all, readable like the user's other files, and
every failure told in one line.

A file or folder is written under a hidden temporary name beside its target,
`.NAME.<random>.tmp`, and renamed onto the target when complete: a reader never sees half of
it, and a failed write leaves the old target as it was. The temporary is private while it is
written (mkstemp makes 0600, mkdtemp 0700); before the rename it gets the mode the umask gives
any new file (0666 & ~umask, folders 0777 & ~umask), so another user's ComfyUI or A1111 reads
it as it reads the user's other files. A write killed by a signal leaves its temporary behind;
the next write to the same target removes it (`clean_stale`), and nothing else.

I/O errors (OSError, and safetensors' errors that carry an `os error N`) become a `WriteError`:
"cannot write PATH: CAUSE; ADVICE".
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from safetensors import SafetensorError

from sdlora.errors import SdloraError

TEMP_SUFFIX = ".tmp"
RANDOM_PART = r"[a-z0-9_]{8}"  # tempfile's random names: 8 of a-z, 0-9 and _

_PERMISSION = ("permission denied", "choose a folder you may write to, or change its permissions")
_SPACE = "free some space or choose another disk"
# errno -> (cause, advice), in the user's words
CAUSES = {
    errno.EACCES: _PERMISSION,
    errno.EPERM: _PERMISSION,
    errno.EROFS: ("the file system is read-only", "choose a folder on a writable disk"),
    errno.ENOSPC: ("no space left on the device", _SPACE),
}
if hasattr(errno, "EDQUOT"):  # not on Windows
    CAUSES[errno.EDQUOT] = ("the disk quota is used up", _SPACE)
FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # a full disk or quota

_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) reports an I/O error
_umask_lock = threading.Lock()


class WriteError(SdloraError):
    """`path` could not be written: `cause` and `advice` in words; `code` the errno, if any."""

    def __init__(self, path: str | Path, cause: str, advice: str, code: int | None = None):
        self.path, self.cause, self.advice, self.code = Path(path), cause, advice, code
        super().__init__(f"cannot write {path}: {cause}; {advice}")


def error_number(err: BaseException) -> int | None:
    """The errno of an OSError or of a safetensors I/O error; None for anything else."""
    if isinstance(err, OSError):
        return err.errno
    if isinstance(err, SafetensorError):
        found = _OS_ERROR.search(str(err))
        return int(found.group(1)) if found else None
    return None


def write_error(err: BaseException, target: str | Path) -> WriteError | None:
    """The WriteError for `err`, met while writing `target`; None when `err` is no I/O error.

    A WriteError about another path (a temporary inside `target`) is retold about `target`.
    """
    target = Path(target)
    if isinstance(err, WriteError):
        return WriteError(target, err.cause, err.advice, err.code)
    code = error_number(err)
    if code is None and not isinstance(err, OSError):
        return None
    if code in CAUSES:
        return WriteError(target, *CAUSES[code], code)
    if code in (errno.ENOTDIR, errno.EEXIST):
        blocker = _file_in_the_way(target)
        if blocker is not None:
            what = "it" if blocker == target else str(blocker)
            return WriteError(
                target, f"{what} is a file, not a folder", "choose another path", code
            )
    if code == errno.EISDIR:
        advice = "choose another name or move the folder away"
        return WriteError(target, "it is a folder", advice, code)
    cause = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return WriteError(target, cause.splitlines()[0].lower(), "check the path and try again", code)


def explain(err: OSError) -> str:
    """One line for an OSError that no writer turned into a WriteError: the path and the cause."""
    cause = CAUSES[err.errno][0] if err.errno in CAUSES else (err.strerror or str(err)).lower()
    return f"{err.filename}: {cause}" if err.filename else cause


def _file_in_the_way(target: Path) -> Path | None:
    """The nearest of `target` and its parents that exists but is not a folder."""
    for path in (target, *target.parents):
        if path.exists() and not path.is_dir():
            return path
    return None


@contextmanager
def reported(target: str | Path) -> Iterator[None]:
    """Turn an I/O error in the block into a WriteError naming `target`."""
    try:
        yield
    except (OSError, SafetensorError) as err:
        problem = write_error(err, target)
        if problem is None:
            raise
        raise problem from err


def current_umask() -> int:
    """The process umask, read from /proc where Linux has it (changing nothing), else by setting
    a strict mask for an instant and restoring the old one."""
    with suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _umask_lock:
        old = os.umask(0o077)  # never looser than before, should another thread create a file now
        os.umask(old)
    return old


def set_public_mode(path: str | Path, folder: bool = False) -> None:
    """Give `path` the mode a new file (0666) or folder (0777) gets under the current umask; a
    folder's files and subfolders too (safetensors writes through private temporaries)."""
    mask = current_umask()
    os.chmod(path, (0o777 if folder else 0o666) & ~mask)
    if folder:
        for root, dirs, names in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in names:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)


def stale_temporaries(target: str | Path) -> list[Path]:
    """Temporaries of earlier writes to `target` beside it: `.NAME.<random>.tmp`, nothing else."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.{RANDOM_PART}{re.escape(TEMP_SUFFIX)}")
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    return [target.parent / name for name in sorted(names) if pattern.fullmatch(name)]


def clean_stale(target: str | Path) -> None:
    """Remove what killed writes to `target` left behind (see `stale_temporaries`)."""
    for path in stale_temporaries(target):
        with suppress(OSError):
            if path.is_symlink():  # we never make links: not ours
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


@contextmanager
def written_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target` to write; when the block ends well it gets the
    umask's mode and is renamed onto `target`. On any error it is removed and `target` is left
    as it was; I/O errors become a WriteError naming `target`."""
    target = Path(target)
    tmp = None
    try:
        with reported(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            clean_stale(target)
            fd, name = tempfile.mkstemp(
                prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent
            )
            os.close(fd)
            tmp = Path(name)
            yield tmp
            set_public_mode(tmp)
            os.replace(tmp, target)
    except BaseException:
        if tmp is not None:
            with suppress(OSError):
                tmp.unlink(missing_ok=True)
        raise


@contextmanager
def written_folder(target: str | Path) -> Iterator[Path]:
    """`written_file` for a folder: an old folder at `target` is moved aside, replaced, removed."""
    target = Path(target)
    tmp = None
    try:
        with reported(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            clean_stale(target)
            tmp = Path(
                tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
            )
            yield tmp
            set_public_mode(tmp, folder=True)
            _replace_folder(tmp, target)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_folder(tmp: Path, target: Path) -> None:
    """Rename the folder `tmp` onto `target`; an old folder there is moved aside first (under a
    temporary's name, so a kill in between leaves nothing `clean_stale` would not remove)."""
    if not target.is_dir() or target.is_symlink():
        os.replace(tmp, target)  # a file there: ENOTDIR, "it is a file, not a folder"
        return
    aside = target.with_name(f".{target.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    os.replace(target, aside)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)
