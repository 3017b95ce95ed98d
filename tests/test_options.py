"""Training options, each declared once (train/config.py): bounds, names and words that the
command line, TOML files, the Python API and the web UI all get from that one declaration."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdlora.cli import main
from sdlora.errors import SdloraError, flag
from sdlora.train.config import (
    FIELDS,
    OPTIONS,
    RESUME_MUST_MATCH,
    RUN_ONLY,
    TrainConfig,
    kind_of,
    load_config,
)
from sdlora.ui import handlers as h
from sdlora.ui import train_setup

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
NUMBERS = [name for name, f in FIELDS.items() if kind_of(f)[0] in ("int", "float")]


def one_line_error(capsys, args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdlora: ") and "\n" not in err and "Traceback" not in err, err
    return err


def train_args(tmp_path: Path, *extra: str) -> list[str]:
    """A `sdlora train` command whose data folder does not exist: only a check can stop it."""
    return ["train", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"), *extra]


def too_big(name: str) -> float | int:
    spec = OPTIONS[name]
    top = spec.max if spec.max is not None else spec.below
    return top + 1 if kind_of(FIELDS[name])[0] == "int" else float(top) * 2 + 1


def test_every_number_has_an_upper_bound_that_help_states(capsys):
    assert NUMBERS and all(
        OPTIONS[n].max is not None or OPTIONS[n].below is not None for n in NUMBERS
    )
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--steps N optimizer steps (from 1 to 1000000; default: 1000 unless --epochs)" in text
    assert "--lr LR learning rate (positive, at most 1; default: 0.0001)" in text
    assert "(from 0 to 100; default: the base's recommended value" in text  # --sample-guidance


@pytest.mark.parametrize("name", NUMBERS)
def test_a_number_past_its_bound_is_refused_the_same_everywhere(name, tmp_path, capsys):
    value = too_big(name)
    spec = OPTIONS[name]
    # Python API
    with pytest.raises(SdloraError) as caught:
        TrainConfig(data_dir="d", output="o", **{name: value}).check()
    assert caught.value.setting == name and spec.bounds() in caught.value.message
    # TOML
    toml = tmp_path / "run.toml"
    toml.write_text(f'data_dir = "d"\noutput = "o"\n{name} = {value!r}\n')
    with pytest.raises(SdloraError) as from_file:
        load_config(toml).check()
    assert from_file.value.message == caught.value.message
    # command line: one line naming the flag, before any work
    err = one_line_error(capsys, train_args(tmp_path, flag(name), str(value)))
    assert err == f"sdlora: {flag(name)} {caught.value.message}"
    assert not (tmp_path / "out").exists()
    # web UI: the form's label (or the setting's name in words)
    ctx = h.Context("toy", tmp_path / "a", tmp_path / "d", tmp_path / "o")
    said = train_setup.ui_words(caught.value, ctx)
    assert said == f"{train_setup.label_of(name)} {caught.value.message}" and "--" not in said


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "1e30"], "--steps must be a whole number from 1 to 1000000 (got '1e30')"),
        (["--steps", "10" * 15], "--steps must be from 1 to 1000000"),
        (["--epochs", "1e12"], "--epochs must be a whole number from 1 to 100000"),
        (["--grad-accum", "1000000000"], "--grad-accum must be from 1 to 256"),
        (["--reg-generate", "1000000000"], "--reg-generate must be from 0 to 10000"),
        (["--sample-steps", "1000000000"], "--sample-steps must be from 1 to 1000"),
        (["--workers", "100000"], "--workers must be from 0 to 64"),
        (["--sample-guidance", "1e30"], "--sample-guidance must be from 0 to 100"),
        (["--sample-guidance", "nan"], "--sample-guidance must be from 0 to 100 (got nan)"),
        (["--rank", "2.5"], "--rank must be a whole number from 1 to 1024 (got '2.5')"),
        (["--lr", "fast"], "--lr must be a number, positive, at most 1 (got 'fast')"),
        (["--crop", "middle"], "--crop must be one of: center, random (got 'middle')"),
        (["--base", ""], "--base must not be empty"),
        (
            ["--conv-alpha", "4"],
            "--conv-alpha is used only with --conv-rank (without it k×k convolutions take "
            "--rank and --alpha); give --conv-rank too, or leave --conv-alpha out",
        ),
        (["--name", "x" * 300], "is 300 bytes long; give at most 200"),
        (["--name", "a\nb"], "--name 'a\\nb' must be printable characters"),
        (["--name", "tab\there"], "must be printable characters"),
    ],
)
def test_the_command_refuses_in_one_line_before_any_work(tmp_path, capsys, extra, message):
    err = one_line_error(capsys, train_args(tmp_path, *extra))
    assert message in err, err
    assert not (tmp_path / "out").exists()


def test_a_data_folder_whose_name_is_too_long_for_the_adapter_is_refused(tmp_path):
    data = tmp_path / ("d" * 240)
    data.mkdir()
    with pytest.raises(SdloraError, match="is 240 bytes long; give at most 200") as caught:
        TrainConfig(data_dir=str(data), output=str(tmp_path / "o")).check()
    assert caught.value.setting == "name"


def test_a_name_of_many_byte_letters_counts_bytes():
    TrainConfig(data_dir="d", output="o", name="é" * 100).check()  # 200 bytes
    with pytest.raises(SdloraError, match="202 bytes"):
        TrainConfig(data_dir="d", output="o", name="é" * 101).check()


def test_resume_lists_come_from_the_declarations():
    assert set(RESUME_MUST_MATCH) == {
        "base", "rank", "alpha", "nonlinearity", "dropout", "targets", "conv_rank",
        "conv_alpha", "train_text_encoder", "text_encoder_targets", "optimizer", "seed",
        "batch_size", "grad_accum", "resolution", "buckets", "validation_split", "reg_data",
        "prior_loss_weight", "class_prompt", "reg_generate", "new_tokens", "init_token",
        "loraplus_lr_ratio", "loraplus_text_encoder_lr_ratio", "optimizer_args", "dora", "no_t5", "t5_max_length",
    }  # fmt: skip
    assert set(RUN_ONLY) == {
        "output", "resume", "overwrite", "workers", "tensorboard", "compile",
        "activation_budget", "log_every",
    }  # fmt: skip
    assert not set(RUN_ONLY) & set(TrainConfig(data_dir="d", output="o").settings())


def test_the_forms_labels_come_from_the_declarations():
    assert train_setup.LABELS["lr"] == OPTIONS["lr"].label == "Learning rate"
    assert train_setup.label_of("batch_size") == "Batch size"
    assert train_setup.label_of("mixed_precision") == "mixed precision"  # not on the form
    assert train_setup.label_of("output") == "Adapter name"  # outputs/train/<name>


def test_a_type_mistake_through_the_python_api_names_the_setting():
    with pytest.raises(SdloraError) as caught:
        TrainConfig(data_dir="d", output="o", steps=1e30).check()
    assert caught.value.worded(flag) == "--steps must be a whole number (got 1e+30)"
    with pytest.raises(SdloraError, match="must be true or false"):
        TrainConfig(data_dir="d", output="o", flip="yes").check()


def test_cross_field_errors_name_both_settings_in_each_front_ends_words(tmp_path):
    with pytest.raises(SdloraError) as caught:
        TrainConfig(data_dir="d", output="o", steps=10, epochs=2).check()
    assert caught.value.worded(flag) == (
        "--steps and --epochs cannot both be given: give --steps or --epochs, not both"
    )
    ctx = h.Context("toy", tmp_path / "a", tmp_path / "d", tmp_path / "o")
    assert train_setup.ui_words(caught.value, ctx) == (
        "Steps and epochs cannot both be given: give Steps or epochs, not both"
    )


def test_sample_configs_write_to_folders_of_their_own():
    outputs = {}
    for toml in sorted(SAMPLES.glob("*.toml")):
        output = load_config(toml).output
        assert output not in outputs, f"{toml.name} and {outputs[output]} both write {output}"
        outputs[output] = toml.name


def test_the_train_modules_own_command_words_errors_with_flags(tmp_path, capsys):
    from sdlora.train.command import main as train_main

    assert train_main([str(tmp_path / "d"), "-o", str(tmp_path / "o"), "--rank", "0"]) == 2
    assert capsys.readouterr().err.strip() == "sdlora: --rank must be from 1 to 1024 (got 0)"


def test_a_failed_ui_run_reports_the_setting_for_the_page_to_word(tmp_path):
    """The child process sends an error's setting apart from its message."""
    from sdlora.ui.training import TrainJob

    settings = dict(data_dir=str(tmp_path), output=str(tmp_path / "o"), steps=2, rank=0)
    s = TrainJob(settings, tmp_path / "o").wait(timeout=240)
    assert not s.running and s.failure().setting == "rank", s
    ctx = h.Context("toy", tmp_path / "a", tmp_path / "d", tmp_path / "o")
    assert train_setup.ui_words(s.failure(), ctx) == "Rank must be from 1 to 1024 (got 0)"
