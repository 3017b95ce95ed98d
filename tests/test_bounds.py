"""Numbers that make no sense are refused with one line, before any work: issue 12 and 18."""

import pytest
from conftest import make_adapter_file

from sdlora.bases.base import load_base
from sdlora.cli import main
from sdlora.errors import SdloraError, flag
from sdlora.io.formats import load_adapter
from sdlora.lora.adapter import MAX_STRENGTH
from sdlora.lora.blend import Mixer
from sdlora.tools.merge import merge_adapters
from sdlora.train.config import TrainConfig


@pytest.fixture
def adapter_file(tmp_path):
    path, _ = make_adapter_file(lambda: load_base("tiny"), tmp_path / "ink.safetensors")
    return path


def one_line_error(capsys, args: list[str], message: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdlora: ") and message in err and "\n" not in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--guidance", "nan"], "--guidance must be a number from 0 to 100"),
        (["--guidance", "1e30"], "--guidance must be a number from 0 to 100"),
        (["--guidance", "-1"], "--guidance must be a number from 0 to 100"),
        (["--seed", str(2**64)], "--seed must be from 0 to 2**64"),
        (["--seed", "-1"], "--seed must be from 0 to 2**64"),
    ],
)
def test_generate_refuses_senseless_numbers(tmp_path, capsys, extra, message):
    out = tmp_path / "o.png"
    args = ["generate", "--base", "tiny", "--device", "cpu", "--prompt", "x", "--out", str(out)]
    one_line_error(capsys, [*args, *extra], message)
    assert not out.exists()


def test_generate_accepts_the_largest_seed(tmp_path):
    out = tmp_path / "o.png"
    args = ["generate", "--base", "tiny", "--device", "cpu", "--prompt", "x", "--steps", "1"]
    assert main([*args, "--seed", str(2**64 - 1), "--out", str(out)]) == 0
    assert out.exists()


@pytest.mark.parametrize("strength", ["1e30", "inf", "-101"])
def test_absurd_strengths_are_refused_in_generate_and_merge(
    tmp_path, capsys, adapter_file, strength
):
    out = tmp_path / "o.png"
    base = ["generate", "--base", "tiny", "--device", "cpu", "--prompt", "x", "--out", str(out)]
    one_line_error(capsys, [*base, "--lora", f"{adapter_file}:{strength}"], "must be a finite")
    assert not out.exists()
    merged = tmp_path / "m.safetensors"
    one_line_error(
        capsys, ["merge", f"{adapter_file}:{strength}", "--out", str(merged)], "must be a finite"
    )
    assert not merged.exists()


def test_mixer_bounds_strengths_and_keeps_the_old_one(adapter_file):
    pipe = load_base("tiny")
    mixer = Mixer(pipe)
    with pytest.raises(SdloraError, match="between -100 and 100"):
        mixer.add(adapter_file, strength=1e30)
    assert mixer.strengths() == {}
    name = mixer.add(adapter_file, strength=0.5)
    weights = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    with pytest.raises(SdloraError, match="finite"):
        mixer.set_strength(name, MAX_STRENGTH * 1.01)
    assert mixer.strengths() == {name: 0.5}
    for n, p in pipe.unet.named_parameters():
        assert p.equal(weights[n]), n
    mixer.set_strength(name, MAX_STRENGTH)  # the bound itself is allowed


def test_merge_api_refuses_non_finite(adapter_file):
    with pytest.raises(SdloraError, match="finite"):
        merge_adapters([(load_adapter(adapter_file), float("nan"))])


@pytest.mark.parametrize(
    "values, message",
    [
        ({"weight_decay": -1.0}, "--weight-decay must be from 0 to 1"),
        ({"weight_decay": float("nan")}, "--weight-decay must be from 0 to 1"),
        ({"lr": float("nan")}, "--lr must be positive"),
        ({"seed": 2**64}, "--seed must be from 0 to 2**64 - 1"),
        ({"name": "../../x"}, "must be a plain file name"),
        ({"name": "a/b"}, "must be a plain file name"),
        ({"name": ".."}, "must be a plain file name"),
    ],
)
def test_train_config_refuses(values, message):
    with pytest.raises(SdloraError) as err:
        TrainConfig(data_dir="data", output="out", **values).check()
    assert message in err.value.worded(flag), err.value.worded(flag)


def test_train_command_refuses_a_name_with_folders(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    args = ["train", str(tmp_path / "data"), "--output", str(tmp_path / "out"), "--base", "tiny"]
    one_line_error(capsys, [*args, "--name", "../../x"], "must be a plain file name")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "x.safetensors").exists()


def test_absurd_repeat_count_in_a_folder_name_is_refused(tmp_path, capsys):
    from PIL import Image

    from sdlora.train.data import discover

    folder = tmp_path / "data" / "99999999999999999999_style"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(folder / "a.png")
    with pytest.raises(SdloraError, match="asks for 99999999999999999999 repeats; use at most"):
        discover(
            TrainConfig(
                data_dir=str(tmp_path / "data"), output=str(tmp_path / "out"), resolution=64
            )
        )
    args = ["train", str(tmp_path / "data"), "--output", str(tmp_path / "out"), "--base", "tiny"]
    one_line_error(capsys, args, "99999999999999999999_style: the folder name asks for")
    assert not (tmp_path / "out" / "data.safetensors").exists()


def test_repeat_error_names_the_folder_that_asks_not_a_subfolder(tmp_path):
    from PIL import Image

    from sdlora.train.data import discover

    folder = tmp_path / "data" / "20000_style" / "close-ups"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(folder / "a.png")
    with pytest.raises(SdloraError) as err:
        discover(
            TrainConfig(
                data_dir=str(tmp_path / "data"), output=str(tmp_path / "out"), resolution=64
            )
        )
    assert str(err.value).startswith(f"{tmp_path / 'data' / '20000_style'}: the folder name asks")
