"""Every command in README.md runs as written, in order, on the built-in bases.

The README's shell blocks (```sh) are walked line by line in one fresh folder holding a copy of
`samples/`, so a command may use what an earlier one wrote. Each `sdlora ...` command goes
through `sdlora.cli.main`, the function the installed `sdlora` script calls, in this process
(the imports are paid once) with the folder as the working directory, and must return 0.
Skipped, each with its reason: `pip install` lines (the network), commands naming a Hub model
(`--base owner/name` where no such folder exists), a GPU (`--device cuda`) or a long-running
server (`sdlora ui`). Any other command is an error here, so the README cannot grow a command
this walk neither runs nor skips. The Python API block (`from sdlora import ...`) runs last,
in the same folder.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from sdlora.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\s*\n(.*?)^```\s*$", re.M | re.S)
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # owner/name, as `load_base` tells a Hub id apart
MODEL_FLAGS = ("--base", "--config", "--base-config", "--tuned", "--tuned-config", "--model")


def blocks(language: str) -> list[str]:
    """The bodies of the README's fenced blocks of this language, in order."""
    return [body for lang, body in FENCE.findall(README.read_text()) if lang == language]


def shell_lines() -> list[list[list[str]]]:
    """Each command line of the README's ```sh blocks as its commands' argv (`a && b` gives two),
    continuation lines joined and comments dropped."""
    lines = []
    for body in blocks("sh"):
        for line in body.replace("\\\n", " ").splitlines():
            words, commands = shlex.split(line, comments=True), []
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:cut])
                words = words[cut + 1 :]
            if commands:
                lines.append(commands)
    return lines


LINES = shell_lines()


def skip_reason(argv: list[str], folder: Path) -> str | None:
    """Why this command is not run here, or None when it must run."""
    if argv[:2] == ["pip", "install"]:
        return "installs packages from the network"
    if argv[0] != "sdlora":
        pytest.fail(f"README command {shlex.join(argv)!r}: this test neither runs nor skips it")
    if argv[1:2] == ["ui"]:
        return "starts a long-running server"
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag in MODEL_FLAGS and HUB_ID.match(value) and not (folder / value).parent.is_dir():
            return f"downloads the Hub model {value}"
        if flag == "--device" and value.startswith("cuda"):
            return "needs a GPU"
    return None


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A fresh folder with a copy of samples/, shared by the README's commands in order."""
    path = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "samples", path / "samples")
    return path


@pytest.fixture
def inside(folder, monkeypatch) -> Path:
    monkeypatch.chdir(folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing run here may reach the network
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):  # what `main` sets, undone after
        monkeypatch.setenv(name, "error")
    return folder


def test_readme_has_commands():
    """The walk finds the README's examples (a changed fence would otherwise skip them all)."""
    commands = [argv for line in LINES for argv in line]
    run = [argv for argv in commands if argv[0] == "sdlora" and argv[1] != "ui"]
    assert len(run) >= 15, [shlex.join(argv) for argv in commands]
    assert ["pip", "install", "torch==2.13.0", "-e", ".[test]"] in commands


@pytest.mark.parametrize(
    "line", LINES, ids=[f"{i:02d}-{' '.join(line[0][:2])}" for i, line in enumerate(LINES)]
)
def test_command_line(line: list[list[str]], inside: Path):
    """The line's commands, as the README writes them, each exit 0. A line is skipped whole
    when one of its commands must be (`pip install ... && python -m pytest`: the suite itself)."""
    for argv in line:
        reason = skip_reason(argv, inside)
        if reason:
            pytest.skip(reason)
    for argv in line:
        try:
            code = main(argv[1:])
        except SystemExit as exit:  # argparse refusing the command line
            code = exit.code
        assert code == 0, f"`{shlex.join(argv)}` exited {code}"


def test_python_api(inside: Path):
    """The README's Python API example runs as written, on the files the commands made."""
    (code,) = [body for body in blocks("python") if body.startswith("from sdlora import")]
    exec(compile(code, "README.md (Python API)", "exec"), {"__name__": "readme"})
    assert (inside / "mix-api.png").is_file()
    assert (inside / "merged-api.safetensors").is_file()
