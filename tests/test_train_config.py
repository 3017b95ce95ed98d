"""Trainer settings: TOML config, command-line overrides, checks before any model is loaded."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from sdlora.errors import SdloraError
from sdlora.errors import flag as flag_of
from sdlora.train.command import config_from_args, register
from sdlora.train.config import TrainConfig, load_config

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def parse(argv):
    parser = argparse.ArgumentParser(prog="sdlora")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["train", *argv])


def test_toml_then_flags_override_paths_from_the_file_folder(tmp_path):
    toml = tmp_path / "cfg" / "run.toml"
    toml.parent.mkdir()
    toml.write_text(
        'data_dir = "images"\noutput = "out"\nrank = 16\nlr = 3e-4\n'
        'sample-prompts = ["a", "b"]\nalpha = 8\nflip = true\n'
    )
    config = config_from_args(parse(["--config", str(toml), "--rank", "4", "--no-flip"]))
    assert config.rank == 4 and config.lr == 3e-4 and config.alpha == 8.0 and not config.flip
    assert config.sample_prompts == ["a", "b"]
    assert Path(config.data_dir) == toml.parent / "images"
    assert Path(config.output) == toml.parent / "out"
    # a flag not given leaves the file's value; a path given on the command line stays as given
    config = config_from_args(parse(["--config", str(toml), "other", "-o", "x"]))
    assert config.rank == 16 and config.data_dir == "other" and config.output == "x"


def test_defaults_come_from_the_dataclass_when_nothing_is_given():
    config = config_from_args(parse(["data", "--output", "out"]))
    assert config == TrainConfig(data_dir="data", output="out")


def test_resume_flag_with_and_without_a_path():
    assert config_from_args(parse(["d", "-o", "o", "--resume"])).resume == "latest"
    assert config_from_args(parse(["d", "-o", "o", "--resume", "o/x"])).resume == "o/x"
    assert config_from_args(
        parse(["d", "-o", "o", "--sample-prompt", "p", "--sample-prompt", "q"])
    ).sample_prompts == ["p", "q"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("rnak = 4\n", r"unknown setting 'rnak'; did you mean 'rank'"),
        ('rank = "four"\n', r"rank must be int"),
        ("steps = 1.5\n", r"steps must be int"),
        ("rank = [\n", r"not a valid UTF-8 TOML"),
    ],
)
def test_bad_toml_names_the_file_and_the_key(tmp_path, text, message):
    toml = tmp_path / "bad.toml"
    toml.write_text(text)
    with pytest.raises(SdloraError, match=message) as err:
        load_config(toml)
    assert "bad.toml" in str(err.value)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(resolution=100), "--resolution must be a multiple of 64"),
        (dict(batch_size=0), "--batch-size must be from 1 to"),
        (dict(steps=10, epochs=2), "not both"),
        (dict(nonlinearity="swish"), "--nonlinearity must be one of: identity, relu"),
        (dict(resume="latest", overwrite=True), "pick one"),
        (dict(lr_scheduler="warmup"), "--lr-scheduler must be one of"),
        (dict(output=""), "no output folder"),
        (dict(activation_budget=1.5), "--activation-budget must be from 0 to 1"),
        (dict(activation_budget=float("nan")), "--activation-budget must be from 0 to 1"),
    ],
)
def test_settings_that_cannot_work_are_refused(kw, message):
    values = dict(data_dir="d", output="o") | kw
    with pytest.raises(SdloraError) as err:
        TrainConfig(**values).check()
    assert re.search(message, err.value.worded(flag_of)), err.value.worded(flag_of)


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        parse(["--help"])
    text = capsys.readouterr().out
    for flag in (
        "--base",
        "--rank",
        "--alpha",
        "--nonlinearity",
        "--targets",
        "--train-text-encoder",
        "--steps",
        "--epochs",
        "--batch-size",
        "--grad-accum",
        "--resolution",
        "--lr",
        "--text-encoder-lr",
        "--lr-scheduler",
        "--warmup-steps",
        "--mixed-precision",
        "--compile",
        "--activation-budget",
        "--seed",
        "--save-every",
        "--keep-last",
        "--sample-every",
        "--sample-prompt",
        "--resume",
        "--overwrite",
        "--config",
        "--trigger",
        "--caption",
    ):
        assert flag in text


def test_sample_configs_load():
    for toml in sorted(SAMPLES.glob("train_*.toml")):
        config = load_config(toml).check()
        assert Path(config.data_dir).is_dir(), toml


def test_the_pivotal_sample_config_parses_and_checks():
    config = load_config(SAMPLES / "style-pivotal.toml").check()
    assert config.base == "toy" and config.targets == "locon" and config.keep_best
    assert config.new_tokens == ["sks:2"] and config.init_token == "style"
    assert config.embedding_only_steps == 50 and config.embedding_lr == 5e-3
    assert config.reg_generate == 12 and config.class_prompt == "a shape"
    assert Path(config.reg_data) == SAMPLES.parent / "runs" / "style-pivotal-class"
    assert Path(config.data_dir) == SAMPLES / "style" and config.validation_split == 0.17
    assert not config.caches_text  # the word changes the text encoder's output every step


def test_lr_warmup_ratio_is_a_share_of_the_steps(tmp_path, caplog):
    """--lr-warmup-ratio 0.5 of 4 steps warms up as --warmup-steps 2 does; not with it."""
    import logging

    from sdlora.train.loop import train

    args = parse(["d", "-o", "o", "--lr-warmup-ratio", "0.5"])
    assert config_from_args(args).lr_warmup_ratio == 0.5
    with pytest.raises(SdloraError) as err:
        TrainConfig(data_dir="d", output="o", lr_warmup_ratio=0.5, warmup_steps=2).check()
    assert err.value.worded(flag_of) == (
        "--lr-warmup-ratio and --warmup-steps cannot both be given: give one"
    )
    with pytest.raises(SdloraError, match="must be from 0 to 1"):
        TrainConfig(data_dir="d", output="o", lr_warmup_ratio=1.5).check()

    def lrs(name: str, **warmup) -> list[float]:
        caplog.clear()
        config = TrainConfig(
            data_dir=str(SAMPLES / "style"),
            output=str(tmp_path / name),
            base="tiny",
            resolution=64,
            batch_size=4,
            steps=4,
            lr=1e-3,
            lr_scheduler="constant_with_warmup",
            save_every=0,
            log_every=1,
            tensorboard=False,
            workers=0,
            **warmup,
        )
        with caplog.at_level(logging.DEBUG, logger="sdlora"):
            train(config)
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
        return [float(line.rsplit("lr ", 1)[1]) for line in lines]

    ratio = lrs("ratio", lr_warmup_ratio=0.5)
    assert len(ratio) == 4 and ratio == lrs("steps", warmup_steps=2)
    assert ratio[0] < ratio[-1] == pytest.approx(1e-3)  # it warmed up
    assert lrs("none") == pytest.approx([1e-3] * 4)
