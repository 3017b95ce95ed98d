"""Extraction: a LoRA from (base + merged LoRA) − base recovers that LoRA's outputs."""

import pytest
from conftest import make_adapter_file, run_text, run_unet
from test_formats import close

from sdlora.bases.base import load_base
from sdlora.cli import main
from sdlora.io.formats import load_adapter
from sdlora.lora.blend import Mixer
from sdlora.tools.export import export_diffusers
from sdlora.tools.extract import extract_adapter


@pytest.fixture
def tuned(tmp_path):
    """A tiny base with a rank-4 adapter (alpha 8) merged in, exported as a diffusers folder."""
    path, live = make_adapter_file(
        lambda: load_base("tiny"), tmp_path / "a.safetensors", alpha=8.0, seed=5
    )
    pipe = load_base("tiny")
    Mixer(pipe).add(path, strength=0.9)
    folder = export_diffusers(pipe, tmp_path / "tuned", "fp32")
    return folder, pipe, path


def test_extract_recovers_the_lora(tuned, inputs, tmp_path):
    folder, blended, source = tuned
    adapter, report = extract_adapter(load_base("tiny"), load_base(str(folder)), rank=4)
    assert report.overall < 1e-5 and adapter.ranks() == [4]
    assert set(adapter.modules) == set(load_adapter(source).modules)
    pipe = load_base("tiny")
    Mixer(pipe).add(adapter)
    close(run_unet(pipe, inputs), run_unet(blended, inputs))
    close(run_text(pipe, inputs), run_text(blended, inputs))
    low, low_report = extract_adapter(load_base("tiny"), load_base(str(folder)), rank=2)
    assert 0.05 < low_report.overall < 1 and low.ranks() == [2]


def test_cli(tuned, tmp_path, capsys):
    folder, _, _ = tuned
    out = tmp_path / "x.safetensors"
    assert (
        main(
            ["extract", "--base", "tiny", "--tuned", str(folder), "--rank", "4", "--out", str(out)]
        )
        == 0
    )
    assert "rank 4: overall relative error" in capsys.readouterr().out
    assert load_adapter(out).metadata["sdlora_extract_rank"] == "4"
    assert (
        main(
            [
                "extract",
                "--base",
                "tiny",
                "--tuned",
                "tiny",
                "--rank",
                "4",
                "--out",
                str(tmp_path / "y.safetensors"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "nothing to extract" in err and err.count("\n") == 1
