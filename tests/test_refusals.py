"""Issue 29's tracebacks and small cases, each now one line: a pickle in a diffusers-folder base
(refused, never run, never "retry with weights_only=False"), deeply nested JSON in an adapter's
metadata, `distill --samples` past its bound, devices and pipes given as input files,
`<lora:…>` tags in the CLI's prompts, and a built-in base's single-file export loaded back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_adapter_file
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdlora.bases.base import load_base
from sdlora.cli import main
from sdlora.errors import SdloraError
from sdlora.io.metadata import MAX_CHARS, MAX_DEPTH, parse_json

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line(capsys, argv: list[str]) -> str:
    """Run `sdlora ARGV` expecting exit 2 and one `sdlora: …` line (after any progress bars)."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "weights_only" not in err, err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("sdlora: "), err
    return last


class Payload:
    """Unpickling this makes the folder `marker`: proof that a pickle's code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


# ---------------------------------------------------------------- pickles


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """The tiny base as a diffusers folder (safetensors weights)."""
    from sdlora.tools.export import export_diffusers

    folder = tmp_path_factory.mktemp("bases") / "tiny"
    export_diffusers(load_base("tiny"), folder, dtype="fp32")
    return folder


@pytest.mark.parametrize(
    "part, weights",
    [
        ("text_encoder", "pytorch_model.bin"),  # transformers: UnpicklingError came through
        ("unet", "diffusion_pytorch_model.bin"),  # diffusers: retold as an OSError
    ],
)
def test_pickle_in_a_folder_base_is_one_line_and_never_runs(
    tiny_folder, tmp_path, capsys, part, weights
):
    import shutil

    folder = tmp_path / "base"
    shutil.copytree(tiny_folder, folder)
    for old in (folder / part).glob("*.safetensors"):
        old.unlink()
    marker = tmp_path / "ran"
    torch.save({"weights": Payload(marker)}, folder / part / weights)
    line = one_line(
        capsys,
        ["generate", "--base", str(folder), "--prompt", "x", "--out", str(tmp_path / "a.png")],
    )
    assert line == (
        f"sdlora: {folder}: cannot load this model folder ({part}/{weights}: a pickle that asks "
        "for posix.mkdir, not only tensors: refused unread, nothing in it ran; use a "
        ".safetensors copy)"
    )
    assert not marker.exists()


def test_pickle_refusals_never_pass_on_pytorchs_advice(tmp_path, capsys):
    """A .ckpt base holding code, and one that is no pickle at all: no `weights_only=False`."""
    marker = tmp_path / "ran"
    code = tmp_path / "code.ckpt"
    torch.save({"state_dict": {"x": Payload(marker)}}, code)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"garbage, not a pickle")
    argv = ["extract", "--base", "tiny", "--rank", "2", "--out", str(tmp_path / "x.safetensors")]
    line = one_line(capsys, [*argv, "--tuned", str(code)])
    assert line == (
        f"sdlora: {code}: not a readable checkpoint (a pickle that asks for posix.mkdir, not "
        "only tensors: refused unread, nothing in it ran; use a .safetensors copy)"
    )
    line = one_line(capsys, [*argv, "--tuned", str(garbage)])
    assert line == (
        f"sdlora: {garbage}: not a readable checkpoint (not a pickle of plain tensors: refused "
        "unread, nothing in it ran; use a .safetensors copy)"
    )
    assert not marker.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "code.ckpt",
        "garbage.ckpt",
    ]


# ---------------------------------------------------------------- metadata JSON


def test_metadata_json_is_read_within_bounds():
    deep = "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
    with pytest.raises(SdloraError, match=f"^f: its x metadata nests more than {MAX_DEPTH} "):
        parse_json(deep, "f: its x metadata")
    ok = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert parse_json(ok, "x") == parse_json(ok, "x") and json.dumps(parse_json(ok, "x"))
    # brackets inside strings (escaped quotes too) are text, not nesting
    text = json.dumps({"caption": "[[[[" * 50, "q": 'say "]]]" {{{{'})
    assert parse_json(text, "x")["caption"] == "[[[[" * 50
    with pytest.raises(SdloraError, match="characters long"):
        parse_json('"' + "a" * MAX_CHARS + '"', "x")
    with pytest.raises(SdloraError, match="^x is not JSON$"):
        parse_json("{not json", "x")


@pytest.fixture(scope="module")
def deep_files(tmp_path_factory) -> dict[str, Path]:
    """A tanh adapter whose metadata field KEY is 100,000 levels of nested arrays, per KEY."""
    folder = tmp_path_factory.mktemp("deep")
    source, _ = make_adapter_file(
        lambda: load_base("tiny"), folder / "tanh.safetensors", nonlinearity="tanh"
    )
    tensors = load_file(source)
    with safe_open(source, "pt") as f:
        metadata = f.metadata()
    deep = "[" * 100_000 + "]" * 100_000
    files = {}
    for key in ("sdlora_training", "sdlora_trigger_words", "ss_tag_frequency"):
        files[key] = folder / f"{key}.safetensors"
        save_file(tensors, str(files[key]), metadata=dict(metadata, **{key: deep}))
    return files


@pytest.mark.parametrize("key", ["sdlora_training", "sdlora_trigger_words", "ss_tag_frequency"])
def test_deeply_nested_metadata_in_inspect_and_distill(deep_files, tmp_path, capsys, key):
    path = deep_files[key]
    for extra in ([], ["--json"]):
        assert main(["inspect", str(path), *extra]) == 0
        assert "Traceback" not in capsys.readouterr().err
    out = tmp_path / "d.safetensors"
    line = one_line(
        capsys, ["distill", str(path), "--base", "tiny", "--rank", "2", "--out", str(out)]
    )
    assert line.startswith(f"sdlora: {path.name}: records no training prompts")
    assert not out.exists()


def test_deeply_nested_peft_metadata_is_one_line(tmp_path, capsys):
    path = tmp_path / "peft.safetensors"
    deep = "{" + '"a":[' * 50_000 + "]" * 50_000 + "}"
    save_file(
        {"unet.x.lora_A.weight": torch.zeros(2, 4), "unet.x.lora_B.weight": torch.zeros(4, 2)},
        str(path),
        metadata={"lora_adapter_metadata": deep},
    )
    line = one_line(capsys, ["inspect", str(path)])
    assert line == (
        f"sdlora: {path.name}: its lora_adapter_metadata header nests more than {MAX_DEPTH} levels "
        "deep; the file is damaged or not an adapter"
    )


# ---------------------------------------------------------------- distill --samples


def test_distill_samples_has_an_upper_bound_stated_in_help(deep_files, tmp_path, capsys):
    from sdlora.tools.distill import MAX_SAMPLES

    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    assert f"1 to {MAX_SAMPLES}" in " ".join(capsys.readouterr().out.split())
    out = tmp_path / "d.safetensors"
    argv = ["distill", str(deep_files["sdlora_training"]), "--base", "tiny", "--rank", "2"]
    line = one_line(capsys, [*argv, "--out", str(out), "--samples", "1000000000"])
    assert line == f"sdlora: --samples must be at most {MAX_SAMPLES} (got 1000000000)"
    assert not out.exists()


# ---------------------------------------------------------------- devices and pipes


@pytest.fixture
def fifo(tmp_path):
    """A named pipe. A writer opens and closes it over and over, so that code which opens it to
    read gets an empty file at once instead of waiting forever (the old code then failed
    instead of hanging)."""
    import threading

    path = tmp_path / "pipe.safetensors"
    os.mkfifo(path)
    stop = threading.Event()

    def writer():
        while not stop.is_set():
            with open(path, "wb"):
                pass

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    yield path
    stop.set()
    os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # frees a writer waiting for a reader
    thread.join(5)


def test_devices_and_pipes_are_named_as_what_they_are(fifo, tmp_path, capsys):
    out = str(tmp_path / "out.safetensors")
    for path, what in ((Path("/dev/null"), "a character device"), (fifo, "a named pipe (FIFO)")):
        adapter = f"sdlora: {path} is {what}, not a file; give a file"
        base = f"sdlora: base '{path}' is {what}; give a model folder or file"
        cases = [
            (["inspect", str(path)], adapter),
            (
                [
                    "generate",
                    "--lora",
                    str(path),
                    "--prompt",
                    "x",
                    "--out",
                    str(tmp_path / "a.png"),
                ],
                adapter,
            ),
            (["convert", str(path), "--to", "kohya", "--out", out], adapter),
            (["merge", str(path), str(path), "--out", out], adapter),
            (["distill", str(path), "--base", "tiny", "--rank", "2", "--out", out], adapter),
            (
                [
                    "generate",
                    "--base",
                    str(path),
                    "--prompt",
                    "x",
                    "--out",
                    str(tmp_path / "a.png"),
                ],
                base,
            ),
            (
                ["extract", "--base", "tiny", "--tuned", str(path), "--rank", "2", "--out", out],
                base,
            ),
        ]
        for argv, wanted in cases:
            assert one_line(capsys, argv) == wanted, argv
        with pytest.raises(SdloraError) as err:
            from sdlora.cli.distill import read_prompts

            read_prompts(str(path))
        assert err.value.setting == "prompts_file"
        assert err.value.message == f"{path} is {what}, not a file; give a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.safetensors"]


def test_an_empty_base_is_named(tmp_path, capsys):
    line = one_line(
        capsys, ["generate", "--base", "", "--prompt", "x", "--out", str(tmp_path / "a.png")]
    )
    assert line.startswith("sdlora: --base is empty; give one of toy, tiny")


# ---------------------------------------------------------------- a built-in base's single file


def test_toy_single_file_export_loads_back_without_config(tmp_path, capsys):
    """README: `sdlora export --base BASE --out PATH --format single-file`, and a single file
    needs `--config` "unless it is a built-in base exported". The toy's weights are fp16 in the
    package, so the fp16 file holds them exactly."""
    from sdlora.bases.recommend import recommended

    out = tmp_path / "toy.safetensors"
    assert main(["export", "--base", "toy", "--out", str(out), "--format", "single-file"]) == 0
    png = tmp_path / "a.png"
    argv = ["generate", "--base", str(out), "--prompt", "a red circle", "--steps", "2"]
    assert main([*argv, "--out", str(png), "--device", "cpu"]) == 0, capsys.readouterr().err
    loaded, toy = load_base(str(out)), load_base("toy")
    for part in ("unet", "vae", "text_encoder"):
        theirs = getattr(toy, part).state_dict()
        for key, value in getattr(loaded, part).state_dict().items():
            assert torch.equal(value, theirs[key]), (part, key)
    assert recommended(loaded).size == 64
    assert loaded.tokenizer("a red circle").input_ids == toy.tokenizer("a red circle").input_ids


# ---------------------------------------------------------------- <lora:…> tags in the CLI


def test_lora_tags_in_the_cli_prompt_join_the_mix(tmp_path, monkeypatch, capsys):
    """A tag never reaches the text encoder: `a cat <lora:ink:0.5>` draws what `a cat` with
    --lora ink:0.5 draws, whether the tag adds the file or sets a --lora's strength."""
    import numpy as np
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    make_adapter_file(lambda: load_base("tiny"), tmp_path / "ink.safetensors", seed=3)
    argv = ["generate", "--base", "tiny", "--steps", "2", "--device", "cpu"]

    def draw(name: str, *more: str) -> np.ndarray:
        assert main([*argv, *more, "--out", name]) == 0, capsys.readouterr().err
        image = Image.open(tmp_path / name)
        return np.asarray(image, dtype=np.int16), json.loads(image.text["sdlora"])

    plain, record = draw("plain.png", "--prompt", "a cat", "--lora", "ink.safetensors:0.5")
    added, added_record = draw("added.png", "--prompt", "a cat <lora:ink:0.5>")
    moved, _ = draw("moved.png", "--prompt", "a cat <lora:ink:0.5>", "--lora", "ink.safetensors")
    base, _ = draw("base.png", "--prompt", "a cat")
    assert np.array_equal(added, plain) and np.array_equal(moved, plain)
    assert np.abs(plain - base).max() > 0  # the adapter changes the image: the test can fail
    assert added_record["prompt"] == record["prompt"] == "a cat"
    assert added_record["adapters"] == record["adapters"] == {"ink": 0.5}
    line = one_line(capsys, [*argv, "--prompt", "a cat <lora:nope:0.5>", "--out", "x.png"])
    assert line == (
        "sdlora: --prompt has <lora:nope:0.5>, but no --lora is named 'nope' and there is no "
        "file nope.safetensors; add --lora FILE@nope or remove the tag"
    )
    line = one_line(
        capsys, [*argv, "--prompt", "a cat", "--negative-prompt", "<lora:ink>", "--out", "x.png"]
    )
    assert line == (
        "sdlora: --negative-prompt holds a <lora:…> tag; adapters join the mix in --prompt or "
        "with --lora"
    )
    assert not (tmp_path / "x.png").exists()


def test_a_checkpoint_holding_code_is_refused_without_pytorchs_advice(tmp_path):
    from sdlora.train import checkpoint

    folder = tmp_path / "step-1"
    folder.mkdir()
    (folder / checkpoint.INFO).write_text("{}")
    marker = tmp_path / "ran"
    torch.save({"optimizer": Payload(marker)}, folder / checkpoint.STATE)
    with pytest.raises(SdloraError) as err:
        checkpoint.load(folder)
    assert str(err.value) == (
        f"{folder}: checkpoint cannot be read (a pickle that asks for posix.mkdir, not only "
        "tensors: refused unread, nothing in it ran; resume from another checkpoint)"
    )
    assert not marker.exists()
