"""File-system failures (issues 12 and 18): one line naming the path and the cause, exit 2,
nothing half-written, no temporaries left; what we write is readable as the umask says.

Tests may run as root, where a read-only folder (chmod 555) still takes files: `read_only`
then makes the low-level writes into it fail with EACCES as the kernel would for anyone else.
A full disk is a safetensors write failing with `os error 28`, as safetensors reports ENOSPC.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import logging
import os
import stat
from pathlib import Path

import pytest
import safetensors.torch
from conftest import make_adapter_file
from PIL import Image, ImageDraw
from safetensors import SafetensorError

from sdlora.bases.base import load_base
from sdlora.cli import main
from sdlora.io import files
from sdlora.io.formats import load_adapter
from sdlora.train import checkpoint
from sdlora.train import models as models_module

GENERATE = ["generate", "--base", "tiny", "--prompt", "x", "--steps", "1", "--device", "cpu"]
EXPORT = {
    "diffusers": ["export", "--base", "tiny", "--dtype", "fp32"],
    "single-file": ["export", "--base", "tiny", "--dtype", "fp32", "--format", "single-file"],
}
SUFFIX = {"diffusers": "", "single-file": ".safetensors"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Four 64 px pictures of shapes with .txt captions."""
    folder = tmp_path_factory.mktemp("shapes")
    for i, color in enumerate([(220, 30, 30), (30, 180, 60), (40, 60, 220), (230, 210, 40)]):
        img = Image.new("RGB", (64, 64), (245, 240, 230))
        ImageDraw.Draw(img).ellipse((8 + 4 * i, 12, 44 + 4 * i, 52), fill=color)
        img.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"shape {i}", encoding="utf-8")
    return folder


@pytest.fixture(autouse=True)
def fresh_log_handler():
    """`sdlora train` adds a stderr handler once; let each test's capsys see its lines."""
    log = logging.getLogger("sdlora")
    handlers = log.handlers[:]
    log.handlers.clear()
    yield
    log.handlers[:] = handlers


def train_args(data: Path, output: Path, *extra: str) -> list[str]:
    return [
        "train",
        str(data),
        "--output",
        str(output),
        "--base",
        "tiny",
        "--resolution",
        "64",
        "--batch-size",
        "2",
        "--steps",
        "4",
        "--lr",
        "1e-2",
        "--save-every",
        "0",
        "--workers",
        "0",
        "--seed",
        "7",
        "--no-tensorboard",
        *extra,
    ]


def one_line_error(argv: list[str], capsys) -> str:
    """Run the `sdlora` command expecting exit 2; return its last stderr line, `sdlora: ...`."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("sdlora: "), err
    return last


def leftovers(folder: Path) -> list[str]:
    """Hidden entries (temporaries) anywhere under `folder`."""
    return [str(p) for p in folder.rglob(".*")]


# ---------------------------------------------------------------- simulated failures


def deny_writes(folder: Path, monkeypatch) -> None:
    """Creating, replacing or writing anything inside `folder` fails with EACCES."""
    folder = folder.resolve()

    def inside(path) -> bool:
        if isinstance(path, int):
            return False
        return folder in Path(os.fsdecode(path)).resolve().parents

    def refuse(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    real_open, real_mkdir = os.open, os.mkdir
    real_replace, real_rename, real_builtin_open = os.replace, os.rename, builtins.open
    tmpfile = getattr(os, "O_TMPFILE", 0)

    def fake_os_open(path, flags, *args, **kwargs):
        unnamed = tmpfile and flags & tmpfile == tmpfile
        if unnamed and Path(os.fsdecode(path)).resolve() == folder:
            refuse(path)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if inside(path) and not os.path.isdir(path):
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    def fake_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and inside(file):
            refuse(file)
        return real_builtin_open(file, mode, *args, **kwargs)

    def fake_move(real):
        def move(src, dst, *args, **kwargs):
            if inside(src) or inside(dst):
                refuse(dst)
            return real(src, dst, *args, **kwargs)

        return move

    def fake_save_file(save):
        def save_file(tensors, filename, *args, **kwargs):
            if inside(filename):
                raise SafetensorError(
                    "Error while serializing: I/O error: Permission denied (os error 13)"
                )
            return save(tensors, filename, *args, **kwargs)

        return save_file

    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    monkeypatch.setattr(os, "replace", fake_move(real_replace))
    monkeypatch.setattr(os, "rename", fake_move(real_rename))
    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(safetensors.torch, "save_file", fake_save_file(safetensors.torch.save_file))
    monkeypatch.setattr(files, "save_file", fake_save_file(files.save_file))


@pytest.fixture
def read_only(tmp_path, monkeypatch) -> Path:
    """An existing folder nothing can be written into (really, or simulated for root)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    probe = folder / "probe"
    try:
        probe.write_bytes(b"")
    except PermissionError:
        pass  # the kernel refuses: a real read-only folder
    else:
        probe.unlink()  # root writes anyway: make the writes fail as they would for a user
        deny_writes(folder, monkeypatch)
    yield folder
    monkeypatch.undo()
    folder.chmod(0o755)


class FullDisk:
    """safetensors writes fail as on a full disk (after `allowed` writes that still fit)."""

    def __init__(self, monkeypatch, allowed: int = 0):
        self.allowed, self.full = allowed, True
        for owner in (safetensors.torch, files):
            monkeypatch.setattr(owner, "save_file", self.wrap(owner.save_file))

    def wrap(self, save):
        def save_file(tensors, filename, *args, **kwargs):
            if self.full and self.allowed == 0:
                Path(filename).write_bytes(b"\0" * 100)  # what fitted before the disk filled up
                raise SafetensorError(
                    "Error while serializing: I/O error: No space left on device (os error 28)"
                )
            self.allowed -= 1
            return save(tensors, filename, *args, **kwargs)

        return save_file


# ---------------------------------------------------------------- read-only folders


def test_generate_into_a_read_only_folder(read_only, capsys):
    out = read_only / "a.png"
    line = one_line_error([*GENERATE, "--out", str(out)], capsys)
    assert f"cannot write {out}: permission denied" in line
    assert os.listdir(read_only) == []


@pytest.mark.parametrize("fmt", ["diffusers", "single-file"])
def test_export_into_a_read_only_folder(read_only, capsys, fmt):
    out = read_only / f"model{SUFFIX[fmt]}"
    line = one_line_error([*EXPORT[fmt], "--out", str(out)], capsys)
    assert f"cannot write {out}: permission denied" in line
    assert os.listdir(read_only) == []


def test_train_into_a_read_only_folder(images, read_only, capsys):
    line = one_line_error(train_args(images, read_only), capsys)
    assert f"cannot write {read_only}: permission denied" in line
    line = one_line_error(train_args(images, read_only / "run"), capsys)
    assert f"cannot write {read_only / 'run'}: permission denied" in line
    assert os.listdir(read_only) == []


# ---------------------------------------------------------------- a full disk


@pytest.mark.parametrize("fmt", ["diffusers", "single-file"])
def test_export_onto_a_full_disk(tmp_path, monkeypatch, capsys, fmt):
    FullDisk(monkeypatch)
    out = tmp_path / f"model{SUFFIX[fmt]}"
    line = one_line_error([*EXPORT[fmt], "--out", str(out)], capsys)
    assert f"cannot write {out}: no space left on the device; free some space" in line
    assert os.listdir(tmp_path) == []


def test_full_disk_at_a_checkpoint_keeps_the_last_one_and_resumes(
    images, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    args = train_args(images, out, "--save-every", "2")
    disk = FullDisk(monkeypatch, allowed=1)  # the step-2 checkpoint fits, step 4 does not
    line = one_line_error(args, capsys)
    last = out / "checkpoints" / "step-000002"
    assert f"cannot write checkpoint {out / 'checkpoints' / 'step-000004'}: no space left" in line
    assert f"The last checkpoint, {last}, is intact" in line and "--resume" in line
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000002"]
    assert leftovers(out) == [] and not (out / f"{images.name}.safetensors").exists()
    info, state = checkpoint.load(last)
    assert info["step"] == 2 and state["step"] == 2

    disk.full = False  # space was freed
    assert main([*args, "--resume"]) == 0
    adapter = load_adapter(out / f"{images.name}.safetensors")
    assert json.loads(adapter.metadata["sdlora_training"])["steps_done"] == 4


def test_full_disk_at_the_final_adapter_names_the_checkpoint(images, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = train_args(images, out, "--save-every", "2")
    disk = FullDisk(monkeypatch, allowed=2)  # both checkpoints fit, the adapter does not
    line = one_line_error(args, capsys)
    adapter = out / f"{images.name}.safetensors"
    assert f"cannot write {adapter}: no space left on the device" in line
    assert f"The last checkpoint is {out / 'checkpoints' / 'step-000004'}" in line
    assert leftovers(out) == [] and not adapter.exists()
    disk.full = False
    assert main([*args, "--resume"]) == 0 and adapter.is_file()


def test_any_other_io_failure_is_one_line_too(tmp_path, monkeypatch, capsys):
    """A last resort in the command: an OSError nothing explained still prints one line."""

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "somewhere"))

    monkeypatch.setattr("sdlora.bases.generate.generate", full)
    line = one_line_error([*GENERATE, "--out", str(tmp_path / "a.png")], capsys)
    assert line == f"sdlora: {tmp_path / 'somewhere'}: no space left on the device"


# ---------------------------------------------------------------- files where folders go


def test_a_file_in_the_path_is_named(images, tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    wanted = f"{blocker} is a file, not a folder"
    assert wanted in one_line_error([*GENERATE, "--out", str(blocker / "a.png")], capsys)
    for fmt in EXPORT:
        out = blocker / "sub" / f"model{SUFFIX[fmt]}"
        assert wanted in one_line_error([*EXPORT[fmt], "--out", str(out)], capsys)
    assert wanted in one_line_error(train_args(images, blocker / "run"), capsys)
    assert os.listdir(tmp_path) == ["notes.txt"] and blocker.read_text() == "mine"


def test_overwrite_never_swaps_a_file_for_a_folder(tmp_path, capsys):
    folder_png, folder_st = tmp_path / "a.png", tmp_path / "m.safetensors"
    for folder in (folder_png, folder_st):
        folder.mkdir()
        (folder / "keep.txt").write_text("mine")
    line = one_line_error([*GENERATE, "--out", str(folder_png), "--overwrite"], capsys)
    assert f"{folder_png} is a folder" in line
    line = one_line_error([*EXPORT["single-file"], "--out", str(folder_st), "--overwrite"], capsys)
    assert f"{folder_st} is a folder" in line
    plain = tmp_path / "model"
    plain.write_text("mine")
    line = one_line_error([*EXPORT["diffusers"], "--out", str(plain), "--overwrite"], capsys)
    assert f"{plain} is a file" in line
    assert plain.read_text() == "mine" and leftovers(tmp_path) == []
    assert all((f / "keep.txt").read_text() == "mine" for f in (folder_png, folder_st))


def test_config_that_is_a_folder(tmp_path, capsys):
    line = one_line_error(["train", "--config", str(tmp_path)], capsys)
    assert f"{tmp_path} is a folder; --config takes a TOML file" in line


# ---------------------------------------------------------------- modes (issue 12)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(root: Path) -> set[tuple[str, str]]:
    """{(kind, octal mode)} of `root` and everything under it."""
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    return {("dir" if p.is_dir() else "file", oct(stat.S_IMODE(p.stat().st_mode))) for p in paths}


def test_written_files_follow_the_umask(images, tmp_path, umask_022):
    file, folder = ("file", "0o644"), ("dir", "0o755")
    lora, _ = make_adapter_file(lambda: load_base("tiny"), tmp_path / "ink.safetensors")
    assert modes(lora) == {file}
    single, diffusers, png = tmp_path / "m.safetensors", tmp_path / "m", tmp_path / "a.png"
    assert main([*EXPORT["single-file"], "--lora", str(lora), "--out", str(single)]) == 0
    assert main([*EXPORT["diffusers"], "--lora", str(lora), "--out", str(diffusers)]) == 0
    assert main([*GENERATE, "--lora", str(lora), "--out", str(png)]) == 0
    assert modes(single) == {file} and modes(png) == {file}
    assert modes(diffusers) == {file, folder}

    out = tmp_path / "run"
    assert main(train_args(images, out, "--steps", "2", "--save-every", "2")) == 0
    assert modes(out / f"{images.name}.safetensors") == {file}
    assert modes(out / "checkpoints") == {file, folder}

    os.umask(0o027)
    files.save_adapter(load_adapter(lora), lora, overwrite=True)
    assert modes(lora) == {("file", "0o640")}


# ---------------------------------------------------------------- issue 18


def test_diffusers_overwrite_keeps_a_folder_that_is_not_a_model(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = one_line_error([*EXPORT["diffusers"], "--out", str(out), "--overwrite"], capsys)
    assert line == (
        f"sdlora: {out} holds 1 file that is not part of a diffusers model (notes.txt); "
        "choose another --out or empty it"
    )
    assert os.listdir(out) == ["notes.txt"] and leftovers(tmp_path) == []
    (out / "notes.txt").unlink()  # an empty folder may be filled
    assert main([*EXPORT["diffusers"], "--out", str(out), "--overwrite"]) == 0
    assert (out / "model_index.json").is_file()
    assert main([*EXPORT["diffusers"], "--out", str(out), "--overwrite"]) == 0  # a model: yes


def test_stale_temporaries_of_a_killed_save_are_cleaned(tmp_path):
    lora, _ = make_adapter_file(lambda: load_base("tiny"), tmp_path / "ink.safetensors")
    stale = [tmp_path / ".ink.safetensors.k3_x9q0a.tmp", tmp_path / ".ink.safetensors.abcdefgh.tmp"]
    others = [
        ".ink.safetensors.abc.tmp",  # not tempfile's 8 random characters
        ".ink.safetensors.abcdefgh.tmp.keep",
        ".other.safetensors.abcdefgh.tmp",  # another target's
        "ink.safetensors.abcdefgh.tmp",
        "notes.tmp",
    ]
    for path in [*stale, *(tmp_path / name for name in others)]:
        path.write_bytes(b"")  # a kill -9 during the save leaves it empty
    files.save_adapter(load_adapter(lora), lora, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == sorted([*others, "ink.safetensors"])


def test_a_training_run_cleans_stale_temporaries_before_the_model_loads(
    images, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / f".{images.name}.safetensors.a1b2c3d4.tmp"
    stale.write_bytes(b"")
    (out / "notes.tmp").write_bytes(b"")

    class Loaded(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(models_module, "load_base", refuse)
    with pytest.raises(Loaded):
        main(train_args(images, out))
    assert os.listdir(out) == ["notes.tmp"]


# ---------------------------------------------------------------- one output check (issue 28)

# every command that writes a file, with an --out of its kind (".png", ".safetensors", a folder)
WRITERS = {
    "generate": (["generate", "--prompt", "x", "--device", "cpu"], ".png"),
    "export": (EXPORT["single-file"], ".safetensors"),
    "export-diffusers": (EXPORT["diffusers"], ""),
    "convert": (["convert", "a.safetensors", "--to", "kohya"], ".safetensors"),
    "merge": (["merge", "a.safetensors", "b.safetensors"], ".safetensors"),
    "extract": (["extract", "--base", "tiny", "--tuned", "tiny", "--rank", "2"], ".safetensors"),
    "distill": (["distill", "a.safetensors", "--base", "tiny", "--rank", "2"], ".safetensors"),
}


@pytest.fixture
def no_work(monkeypatch):
    """Loading a base or an adapter fails the test: the output check comes before any work."""

    import sdlora.lora.blend
    import sdlora.tools.inspect  # noqa: F401 (modules that bind the real functions at import)

    def work(*args, **kwargs):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr("sdlora.bases.base.load_base", work)
    monkeypatch.setattr("sdlora.io.formats.load_adapter", work)


@pytest.mark.parametrize("command", WRITERS)
def test_every_command_checks_its_output_one_way(command, tmp_path, capsys, no_work):
    args, suffix = WRITERS[command]
    run = lambda out, *more: one_line_error([*args, "--out", str(out), *more], capsys)  # noqa: E731
    missing = tmp_path / "nowhere" / f"x{suffix}"
    assert run(missing) == (
        f"sdlora: --out {missing}: the folder {missing.parent} does not exist; create it first"
    )
    taken = tmp_path / f"taken{suffix}"
    taken.mkdir() if not suffix else taken.write_bytes(b"mine")
    assert run(taken) == (
        f"sdlora: --out {taken} already exists; choose another name or pass --overwrite"
    )
    if suffix:
        folder = tmp_path / f"folder{suffix}"
        folder.mkdir()
        assert run(folder, "--overwrite") == f"sdlora: --out {folder} is a folder; give a file name"
        wrong = tmp_path / "x.txt"
        assert run(wrong) == f"sdlora: --out {wrong} must end in {suffix}; change the name"
    else:
        plain = tmp_path / "plain"
        plain.write_bytes(b"mine")
        assert run(plain, "--overwrite") == (
            f"sdlora: --out {plain} is a file, not a folder; choose another name or move the "
            "file away"
        )
    fifo = tmp_path / f"pipe{suffix}"
    os.mkfifo(fifo)
    assert (
        run(fifo, "--overwrite")
        == f"sdlora: --out {fifo} is a named pipe (FIFO); choose another name"
    )
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["taken" + suffix, "pipe" + suffix, f"folder{suffix}" if suffix else "plain"]
    )
    assert taken.is_dir() or taken.read_bytes() == b"mine"


@pytest.mark.parametrize("command", WRITERS)
def test_every_command_refuses_an_unwritable_output_before_work(
    command, read_only, capsys, no_work
):
    args, suffix = WRITERS[command]
    out = read_only / f"x{suffix}"
    line = one_line_error([*args, "--out", str(out)], capsys)
    assert line.startswith(f"sdlora: cannot write {out}: permission denied; choose a folder")
    assert os.listdir(read_only) == []


def test_generate_checks_every_image_it_will_write(tmp_path, capsys, no_work):
    """--num-images 3 writes a-0.png, a-1.png, a-2.png: an existing a-1.png is not replaced."""
    (tmp_path / "a-1.png").write_bytes(b"mine")
    out = tmp_path / "a.png"
    line = one_line_error(
        ["generate", "--prompt", "x", "--num-images", "3", "--out", str(out)], capsys
    )
    assert line == (
        f"sdlora: --out {tmp_path / 'a-1.png'} already exists; choose another name or pass "
        "--overwrite"
    )
    assert os.listdir(tmp_path) == ["a-1.png"]
