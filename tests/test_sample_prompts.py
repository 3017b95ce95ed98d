"""Sample prompts with kohya's per-line options (issue 35), from --sample-prompt and
--sample-prompts-file, in the flags and the TOML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdlora.errors import SdloraError
from sdlora.errors import flag as flag_of
from sdlora.train.config import TrainConfig, load_config
from sdlora.train.sample import SamplePrompt, parse_prompt_line, sample_grid


def test_a_kohya_line_reads_to_its_settings():
    line = "masterpiece, 1girl, red hair --n low quality, worst quality --w 768 --h 512 --s 28 --l 5.5 --d 42"  # noqa: E501
    assert parse_prompt_line(line) == SamplePrompt(
        prompt="masterpiece, 1girl, red hair",
        negative="low quality, worst quality",
        width=768,
        height=512,
        steps=28,
        guidance=5.5,
        seed=42,
    )
    assert parse_prompt_line("a red circle") == SamplePrompt("a red circle")
    assert parse_prompt_line("  a cat --d 7  ") == SamplePrompt("a cat", seed=7)
    assert parse_prompt_line("a well-drawn cat--dog --w 64").prompt == "a well-drawn cat--dog"


def refused(line: str, where: str = "prompts.txt:3") -> str:
    with pytest.raises(SdloraError) as err:
        parse_prompt_line(line, where)
    return err.value.worded(flag_of)


def test_unknown_options_and_bad_values_are_refused_with_the_line():
    assert refused("a cat --ss euler_a") == (
        "prompts.txt:3: unknown option --ss; a prompt line takes --n, --w, --h, --s, --l, --d"
    )
    assert refused("a cat --w 770") == (
        "prompts.txt:3: --w (width) must be a multiple of 8 from 8 to 4096 (got 770)"
    )
    assert (
        refused("a cat --s many")
        == "prompts.txt:3: --s (steps) must be a whole number (got 'many')"
    )
    assert refused("a cat --l -1") == "prompts.txt:3: --l (guidance) must be from 0 to 100 (got -1)"
    assert refused("--w 64") == "prompts.txt:3: the line has options but no prompt"


def test_the_file_and_the_flags_are_checked_before_training(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# kohya's comments are skipped\n\na dog --w 64\na cat --x 1\n", "utf-8")
    config = TrainConfig(data_dir="d", output="o", sample_prompts_file=str(prompts))
    with pytest.raises(SdloraError) as err:
        config.check()
    assert err.value.worded(flag_of) == (
        f"{prompts}:4: unknown option --x; a prompt line takes --n, --w, --h, --s, --l, --d"
    )
    config = TrainConfig(data_dir="d", output="o", sample_prompts=["fine", "a cat --q 2"])
    with pytest.raises(SdloraError) as err:
        config.check()
    assert err.value.worded(flag_of).startswith("--sample-prompt number 2: unknown option --q")
    missing = TrainConfig(data_dir="d", output="o", sample_prompts_file=str(tmp_path / "no"))
    with pytest.raises(SdloraError) as err:
        missing.check()
    assert err.value.worded(flag_of).startswith(
        f"--sample-prompts-file names {tmp_path / 'no'}, which does not exist"
    )


def test_flags_and_toml_give_the_same_prompts(tmp_path):
    import argparse

    from sdlora.train.command import config_from_args, register

    (tmp_path / "prompts.txt").write_text("a dog --n cat --w 128 --h 64\n", "utf-8")
    toml = tmp_path / "run.toml"
    toml.write_text(
        'data_dir = "d"\noutput = "o"\nsample_prompts_file = "prompts.txt"\n'
        'sample_prompts = ["a bird --s 3"]\n',
        encoding="utf-8",
    )
    parser = argparse.ArgumentParser(prog="sdlora")
    train_parser = register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["train", "d", "-o", "o", "--sample-prompt", "a bird --s 3"]
        + ["--sample-prompts-file", str(tmp_path / "prompts.txt")]
    )
    for config in (load_config(toml), config_from_args(args)):
        assert config.check().sample_prompt_settings() == [
            SamplePrompt("a bird", steps=3),
            SamplePrompt("a dog", negative="cat", width=128, height=64),
        ]
    assert "--sample-prompts-file FILE" in train_parser.format_help()


class FakePipe:
    """Records each call; draws grey images of the size asked for."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        from sdlora.bases.recommend import Recommended

        self.sdlora_recommended = Recommended(guidance=2.0, steps=20, size=64)
        self.calls: list[dict] = []

    def __call__(self, prompt, **kwargs):
        self.calls.append({"prompt": prompt, **kwargs})
        size = (kwargs["width"], kwargs["height"])
        return type("Result", (), {"images": [Image.new("RGB", size, "grey")]})()


def test_sample_grid_uses_each_lines_settings():
    pipe = FakePipe()
    grid = sample_grid(
        pipe, ["a dog --n cat --w 96 --h 32 --s 5 --l 4 --d 9", "a bird"], 100, None, 64, 64
    )
    first, second = pipe.calls
    assert (first["prompt"], first["negative_prompt"]) == ("a dog", "cat")
    assert (first["width"], first["height"], first["num_inference_steps"]) == (96, 32, 5)
    assert first["guidance_scale"] == 4.0 and first["generator"].initial_seed() == 9
    assert (second["prompt"], second["negative_prompt"]) == ("a bird", None)
    assert (second["width"], second["height"], second["num_inference_steps"]) == (64, 64, 20)
    assert second["guidance_scale"] == 2.0 and second["generator"].initial_seed() == 101
    assert grid.size == (2 * 96, 64)  # cells of the largest width and height


def test_a_run_samples_the_files_prompts_with_zero_terminal_snr(tmp_path, monkeypatch):
    """The tiny base, one step, v-prediction with rescaled betas; the sample grid follows the
    file's --w/--h and the settings are recorded in the adapter."""
    from sdlora.io.formats import load_adapter
    from sdlora.train import step, train

    schedulers = []
    init = step.TrainStep.__init__

    def keep(self, **kw):
        init(self, **kw)
        schedulers.append(self.noise_scheduler)

    monkeypatch.setattr(step.TrainStep, "__init__", keep)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --n blue --w 128 --h 64 --s 2\n", "utf-8")
    samples = Path(__file__).resolve().parent.parent / "samples" / "style"
    config = TrainConfig(
        data_dir=str(samples), output=str(tmp_path / "out"), base="tiny", resolution=64,
        steps=1, save_every=0, tensorboard=False, workers=0, sample_every=1,
        sample_prompts_file=str(prompts), zero_terminal_snr=True,
        prediction_type="v_prediction",
    )  # fmt: skip
    adapter = load_adapter(train(config))
    [scheduler] = schedulers
    assert scheduler.alphas_cumprod[-1].item() == pytest.approx(0, abs=1e-12)
    [grid] = sorted((tmp_path / "out" / "samples").glob("*.png"))
    assert Image.open(grid).size == (128, 64)
    recorded = json.loads(adapter.metadata["sdlora_training"])
    assert recorded["zero_terminal_snr"] is True
    assert recorded["sample_prompts_file"] == str(prompts)


def test_a_caption_given_as_a_sample_prompt_is_not_read_for_options():
    """The default sample prompt is a training caption: taken as it is, " --x" and all."""
    pipe = FakePipe()
    sample_grid(pipe, [SamplePrompt("a cat --x 1")], 0, None, 64, 64)
    assert pipe.calls[0]["prompt"] == "a cat --x 1" and pipe.calls[0]["width"] == 64
