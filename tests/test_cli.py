"""The `sdlora` command: outputs, one-line errors with exit code 2, --help everywhere."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_adapter_file, run_unet
from PIL import Image

from sdlora.bases.base import load_base
from sdlora.cli import build_parser, main, parse_lora


def test_parse_lora():
    assert parse_lora("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora("a.safetensors:0.25") == ("a.safetensors", 0.25)
    assert parse_lora("dir:x/a.safetensors") == ("dir:x/a.safetensors", 1.0)


def test_help_on_every_subcommand(capsys):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"generate", "export", "inspect", "train"} <= set(sub.choices)
    for name in sub.choices:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        assert "usage: sdlora " + name in capsys.readouterr().out


def test_generate_writes_png_with_recipe(tmp_path, capsys):
    lora, _ = make_adapter_file(lambda: load_base("tiny"), tmp_path / "ink.safetensors")
    out = tmp_path / "img.png"
    args = [
        "generate",
        "--base",
        "tiny",
        "--prompt",
        "a red circle",
        "--steps",
        "2",
        "--seed",
        "5",
        "--lora",
        f"{lora}:0.5",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    image = Image.open(out)
    assert image.size == (64, 64)
    record = json.loads(image.text["sdlora"])
    assert record["seed"] == 5 and record["adapters"] == {"ink": 0.5}
    assert "<lora:ink:0.5>" in image.text["parameters"]
    assert main(args) == 2  # exists: refused without --overwrite
    assert "already exists" in capsys.readouterr().err


def test_export_then_generate_from_export(tmp_path, inputs):
    lora, _ = make_adapter_file(lambda: load_base("tiny"), tmp_path / "ink.safetensors")
    single = tmp_path / "merged.safetensors"
    assert (
        main(
            [
                "export",
                "--base",
                "tiny",
                "--lora",
                f"{lora}:0.7",
                "--out",
                str(single),
                "--format",
                "single-file",
                "--dtype",
                "fp32",
            ]
        )
        == 0
    )
    folder = tmp_path / "merged"
    assert (
        main(
            [
                "export",
                "--base",
                "tiny",
                "--lora",
                f"{lora}:0.7",
                "--out",
                str(folder),
                "--dtype",
                "fp32",
            ]
        )
        == 0
    )
    torch.testing.assert_close(
        run_unet(load_base(str(single)), inputs),
        run_unet(load_base(str(folder)), inputs),
        atol=1e-5,
        rtol=0,
    )


def test_inspect_json(tmp_path, capsys):
    lora, _ = make_adapter_file(
        lambda: load_base("tiny"),
        tmp_path / "ink.safetensors",
        rank=4,
        alpha=2.0,
        nonlinearity="tanh",
    )
    assert main(["inspect", str(lora), "--json", "--base", "tiny"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["nonlinearity"] == "tanh" and info["ranks"] == [4]
    assert info["modules"] == {"unet": 56, "text_encoder": 8}
    assert info["coverage"]["matched"] == 64 and info["coverage"]["unmatched"] == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["generate", "--prompt", "x", "--lora", "missing.safetensors", "--out", "o.png"],
            "missing.safetensors: no such file",
        ),
        (
            ["generate", "--prompt", "x", "--base", "nowhere", "--out", "o.png"],
            "base 'nowhere': no such file or folder",
        ),
        (
            ["generate", "--prompt", "x", "--width", "60", "--out", "o.png"],
            "--width 60 must be a positive multiple of 8",
        ),
        (["export", "--out", "x", "--dtype", "fp8"], "unknown dtype 'fp8'"),
        (["inspect", "bad.safetensors"], "bad.safetensors: not a readable safetensors file"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage!")
    assert main([*args, *(["--device", "cpu"] if args[0] == "generate" else [])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdlora: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "o.png").exists()


def test_no_traceback_from_the_real_command(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sdlora.cli", "inspect", str(tmp_path / "none.safetensors")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"sdlora: {tmp_path / 'none.safetensors'}: no such file"


def test_generate_sweep_grid_holds_base_at_strength_zero(tmp_path):
    """--sweep 0,1: one labelled grid; its strength-0 cell is exactly the base image."""
    import json

    import numpy as np
    from PIL import Image

    lora, _ = make_adapter_file(lambda: load_base("tiny"), tmp_path / "ink.safetensors")
    common = ["generate", "--base", "tiny", "--prompt", "a red circle", "--steps", "2"]
    common += ["--seed", "3", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "base.png")]) == 0
    grid_path = tmp_path / "grid.png"
    assert main([*common, "--lora", str(lora), "--sweep", "0,1", "--out", str(grid_path)]) == 0
    base = np.asarray(Image.open(tmp_path / "base.png").convert("RGB"))
    grid_image = Image.open(grid_path)
    record = json.loads(grid_image.text["sdlora"])
    assert record["sweep"] == {"ink": [0.0, 1.0]}
    assert "Sweep: ink strength 0, 1" in grid_image.text["parameters"]
    grid = np.asarray(grid_image.convert("RGB"))
    h, w = base.shape[:2]
    assert grid.shape[1] >= 2 * w
    hits = [
        (y, x)
        for y in range(grid.shape[0] - h + 1)
        for x in range(grid.shape[1] - w + 1)
        if np.array_equal(grid[y : y + h, x : x + w], base)
    ]
    assert len(hits) == 1 and hits[0][1] < w  # the first column, and only there


def test_sweep_needs_a_lora_and_numbers(tmp_path, capsys):
    args = ["generate", "--base", "tiny", "--prompt", "x", "--out", str(tmp_path / "g.png")]
    assert main([*args, "--sweep", "0,1"]) == 2
    assert "--sweep varies the strength of the last --lora" in capsys.readouterr().err
    lora, _ = make_adapter_file(lambda: load_base("tiny"), tmp_path / "ink.safetensors")
    assert main([*args, "--lora", str(lora), "--sweep", "0,half"]) == 2
    assert "give strengths separated by commas" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


@pytest.fixture(scope="module")
def bad_adapters(tmp_path_factory):
    """One file per kind of bad adapter input, with the reason its error must give."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("bad")
    good, _ = make_adapter_file(lambda: load_base("tiny"), folder / "good.safetensors")
    tensors = load_file(good)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # 32×32
    up = tensors[f"{key}.lora_up.weight"].clone()
    up[0, 0] = float("nan")
    save_file({**tensors, f"{key}.lora_up.weight": up}, folder / "nan.safetensors")
    save_file(
        {f"{key}.lora_down.weight": torch.ones(2, 48), f"{key}.lora_up.weight": torch.ones(32, 2)},
        folder / "wide.safetensors",
    )
    deep = {
        f"{key}.lora_down.weight": torch.ones(40, 32),
        f"{key}.lora_up.weight": torch.ones(32, 40),
    }
    save_file(deep, folder / "deep.safetensors")
    nonlinear, _ = make_adapter_file(
        lambda: load_base("tiny"), folder / "curvy.safetensors", nonlinearity="tanh"
    )
    tensors, meta = load_file(nonlinear), {"sdlora_nonlinearity": "swish"}
    save_file(tensors, folder / "swish.safetensors", metadata=meta)
    (folder / "corrupt.safetensors").write_bytes(good.read_bytes()[:3000])
    (folder / "model.ckpt").write_bytes(b"\x80\x04K\x01.")
    return folder, {
        "corrupt.safetensors": "not a readable safetensors file",
        "model.ckpt": "pickle files are never loaded",
        "wide.safetensors": "does not fit this layer",
        "nan.safetensors": "NaN/Inf weights",
        "swish.safetensors": "unknown nonlinearity 'swish'",
        "deep.safetensors": "rank 40 is larger than the module's dims",
        "missing.safetensors": "no such file",
    }


@pytest.mark.parametrize("command", ["generate", "export-folder", "export-file"])
def test_bad_adapter_is_one_line_exit_2_nothing_written(bad_adapters, tmp_path, capsys, command):
    """Issue 2's bad inputs, through the real commands: `sdlora: <file>: <reason>`, exit 2."""
    folder, reasons = bad_adapters
    argv = {
        "generate": ["generate", "--prompt", "x", "--steps", "1", "--device", "cpu"],
        "export-folder": ["export", "--dtype", "fp32"],
        "export-file": ["export", "--dtype", "fp32", "--format", "single-file"],
    }[command]
    out = tmp_path / ("o.png" if command == "generate" else "o.safetensors")
    for name, reason in reasons.items():
        code = main([*argv, "--base", "tiny", "--lora", f"{folder / name}:0.8", "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert err.startswith("sdlora: ") and err.count("\n") == 1, err
        assert f"{name}: " in err and reason in err and "Traceback" not in err, err
        assert list(tmp_path.iterdir()) == [], name  # no output, no temp file
