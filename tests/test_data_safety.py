"""Nothing lost, nothing silently dropped (issue 18): linked folders, odd metadata, long
captions, adapters that share a file name, absurd sizes and blank images."""

from __future__ import annotations

import pytest
import torch
from sdlora.train.config import TrainConfig

from sdlora.base import load_base
from sdlora.cli import main
from sdlora.errors import SdloraError
from sdlora.generate import GenerateSettings, generate


def one_line_error(capsys, args: list[str], message: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdlora: ") and message in err and "\n" not in err, err
    assert "Traceback" not in err


# ---------------------------------------------------------------- upper bounds, blank images

GENERATE = ["generate", "--base", "tiny", "--device", "cpu", "--prompt", "x", "--steps", "1"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-images", "100000"], "--num-images must be from 1 to 64 (got 100000)"),
        (["--num-images", "0"], "--num-images must be from 1 to 64 (got 0)"),
        (["--width", "100000"], "--width must be from 8 to 4096 pixels (got 100000)"),
        (["--height", "8192"], "--height must be from 8 to 4096 pixels (got 8192)"),
    ],
)
def test_generate_refuses_absurd_sizes_before_loading(
    tmp_path, capsys, monkeypatch, extra, message
):
    import sdlora.base

    def refuse(*args, **kwargs):
        raise AssertionError("the base was loaded before the numbers were checked")

    monkeypatch.setattr(sdlora.base, "load_base", refuse)
    out = tmp_path / "o.png"
    one_line_error(capsys, [*GENERATE, "--out", str(out), *extra], message)
    assert not out.exists()


def test_train_refuses_an_absurd_resolution_at_once():
    with pytest.raises(SdloraError, match=r"--resolution must be a multiple of 64 from 64 to 2048"):
        TrainConfig(data_dir="x", output="y", resolution=6400000).check()
    TrainConfig(data_dir="x", output="y", resolution=2048).check()


def _break_decoder(pipe, how: str) -> None:
    conv = pipe.vae.decoder.conv_out
    with torch.no_grad():
        if how == "nan":
            pipe.unet.conv_out.weight.fill_(float("nan"))
        else:  # every pixel -1e3 before the clamp to [-1, 1]: all black
            conv.weight.zero_()
            conv.bias.fill_(-1e3)


@pytest.mark.parametrize(
    "how, message",
    [("black", r"seed 5 came out blank \(all pixels 0\)"), ("nan", r"seed 5 came out broken")],
)
def test_a_blank_or_broken_image_is_an_error_not_a_file(
    tmp_path, capsys, monkeypatch, how, message
):
    pipe = load_base("tiny")
    _break_decoder(pipe, how)
    with pytest.raises(
        SdloraError, match=message + r".*check --guidance and the adapter strengths"
    ):
        generate(pipe, GenerateSettings(prompt="x", steps=1, seed=5))
    # the CLI says it in one line and writes nothing
    import sdlora.base

    real = sdlora.base.load_base

    def broken(*args, **kwargs):
        loaded = real(*args, **kwargs)
        _break_decoder(loaded, how)
        return loaded

    monkeypatch.setattr(sdlora.base, "load_base", broken)
    out = tmp_path / "o.png"
    one_line_error(capsys, [*GENERATE, "--seed", "5", "--out", str(out)], "came out")
    assert not out.exists()


def test_ordinary_images_pass_the_blank_check(tmp_path):
    pipe = load_base("tiny")
    images = generate(pipe, GenerateSettings(prompt="x", steps=2, num_images=2))
    assert [im.size for im in images] == [(64, 64)] * 2
    assert all(im.mode == "RGB" for im in images)
