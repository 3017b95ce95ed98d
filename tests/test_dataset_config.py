"""--dataset-config: kohya sd-scripts' dataset TOML read as it is (issue 35).

The files are the examples of kohya's docs/config_README-en.md, with their Windows folders
(C:\\hoge, C:\\reg) made folders beside the file."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

import pytest
from PIL import Image

from sdlora.errors import SdloraError
from sdlora.errors import flag as flag_of
from sdlora.train.command import config_from_args, register
from sdlora.train.config import TrainConfig, load_config
from sdlora.train.data import discover
from sdlora.train.prior import PriorImages

ROOT = Path(__file__).resolve().parent.parent

# kohya's first example: one DreamBooth-style dataset (hoge, fuga, a reg folder) and one
# fine-tuning dataset (piyo, a metadata file)
KOHYA_EXAMPLE = """\
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = 'hoge'
  class_tokens = 'hoge girl'
  # This subset uses keep_tokens = 2 (the value of the parent datasets)

  [[datasets.subsets]]
  image_dir = 'fuga'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = 'reg'
  class_tokens = 'human'
  keep_tokens = 1

# This is a fine-tuning dataset
[[datasets]]
resolution = [768, 768]
batch_size = 2

  [[datasets.subsets]]
  image_dir = 'piyo'
  metadata_file = 'piyo_md.json'
  # This subset uses keep_tokens = 1 (the value of [general])
"""

# the same example as sdlora can train it: its first dataset, one training folder, and the
# reg subset without a caption setting of its own
SUPPORTED = """\
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = 'hoge'
  class_tokens = 'hoge girl'
  num_repeats = 10

  [[datasets.subsets]]
  is_reg = true
  image_dir = 'reg'
  class_tokens = 'human'
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """hoge/ (3 images, one with a .txt caption, one wide), reg/ (2 images), fuga/, piyo/."""
    for name, count in (("hoge", 3), ("reg", 2), ("fuga", 1), ("piyo", 1)):
        (tmp_path / name).mkdir()
        for i in range(count):
            size = (96, 48) if (name, i) == ("hoge", 2) else (48, 48)
            Image.new("RGB", size, (40 * i, 90, 160)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "hoge" / "0.txt").write_text("a hoge girl, smiling, red hat", encoding="utf-8")
    return tmp_path


def write(folder: Path, text: str, name: str = "dataset.toml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def test_kohyas_example_reads_as_the_same_sdlora_options(folder):
    config = load_config(None, dataset_config=str(write(folder, SUPPORTED)), output="out")
    same = TrainConfig(
        data_dir=str(folder / "hoge"), output="out", resolution=512, batch_size=4,
        buckets=False, shuffle_tags=True, keep_tags=2, caption="hoge girl", repeats=10,
        reg_data=str(folder / "reg"), class_prompt="human",
    )  # fmt: skip
    got = asdict(config.check())
    assert got.pop("dataset_config") == str(folder / "dataset.toml")
    want = asdict(same)
    assert want.pop("dataset_config") is None
    assert got == want
    # ... and finds the same images, captions, repeats and buckets, class images too
    assert discover(config) == discover(same)
    items, _, _ = discover(config)
    assert [(i.path.name, i.caption, i.repeats) for i in items] == [
        ("0.png", "a hoge girl, smiling, red hat", 10),
        ("1.png", "hoge girl", 10),
        ("2.png", "hoge girl", 10),
    ]
    prior = PriorImages.find(config)
    assert prior.captions == PriorImages.find(same).captions == ["human"]
    assert len(prior.images) == 2


def test_the_flag_and_the_toml_key_read_it_too(folder):
    kohya = write(folder, SUPPORTED)
    parser = argparse.ArgumentParser(prog="sdlora")
    train_parser = register(parser.add_subparsers(dest="command"))
    assert "--dataset-config FILE" in train_parser.format_help()
    args = parser.parse_args(
        ["train", "--dataset-config", str(kohya), "-o", str(folder / "out"), "--lr", "2e-4"]
    )
    from_flags = config_from_args(args)
    run = write(folder, 'dataset_config = "dataset.toml"\noutput = "out"\nlr = 2e-4\n', "run.toml")
    from_toml = load_config(run)
    assert asdict(from_flags) == asdict(from_toml)
    assert (from_flags.data_dir, from_flags.lr, from_flags.batch_size) == (
        str(folder / "hoge"),
        2e-4,
        4,
    )
    # sdlora's own options win over the dataset file's; DATA_DIR beside it is refused
    assert load_config(None, dataset_config=str(kohya), output="o", batch_size=2).batch_size == 2
    with pytest.raises(SdloraError) as err:
        load_config(None, dataset_config=str(kohya), output="o", data_dir="photos")
    assert err.value.worded(flag_of) == (
        "--dataset-config and DATA_DIR cannot both be given: the file's image_dir is the data "
        "folder"
    )


def refusal(folder: Path, text: str) -> str:
    path = write(folder, text)
    with pytest.raises(SdloraError) as err:
        load_config(None, dataset_config=str(path), output="o")
    message = err.value.worded(flag_of)
    assert message.startswith(f"--dataset-config {path}: "), message
    return message.removeprefix(f"--dataset-config {path}: ")


def test_what_sdlora_cannot_honour_is_refused_by_name(folder):
    assert refusal(folder, KOHYA_EXAMPLE).startswith("has 2 [[datasets]]; sdlora trains one")
    first = KOHYA_EXAMPLE.split("# This is a fine-tuning dataset")[0]
    assert refusal(folder, first).startswith(
        "has 2 training subsets (hoge, fuga) in [[datasets.subsets]]"
    )
    without_fuga = first.replace(
        "  [[datasets.subsets]]\n  image_dir = 'fuga'\n  class_tokens = 'fuga boy'\n"
        "  keep_tokens = 3\n",
        "",
    )
    assert refusal(folder, without_fuga).startswith("keep_tokens on the is_reg subset is not")
    one = SUPPORTED
    assert refusal(folder, one.replace("keep_tokens = 1", "color_aug = true")) == (
        "color_aug ([general]) is not supported by sdlora; remove it"
    )
    assert refusal(folder, one.replace("num_repeats = 10", "metadata_file = 'm.json'")) == (
        "metadata_file ([[datasets.subsets]]) is not supported by sdlora; remove it"
    )
    assert refusal(folder, one.replace("batch_size = 4", "min_bucket_reso = 256")).startswith(
        "min_bucket_reso ([[datasets]]) is not supported"
    )
    assert refusal(folder, one.replace("'.txt'", "'.caption'")).startswith(
        "caption_extension '.caption' ([general]) is not supported: sdlora reads captions from "
        "IMAGE.txt"
    )
    assert refusal(folder, one.replace("resolution = 512", "resolution = [768, 512]")).startswith(
        "resolution [768, 512] is not square"
    )
    assert refusal(folder, "[train]\nrank = 4\n").startswith("unknown table or key 'train'")
    # neutral values and kohya's square [w, h] pass
    calm = one.replace("keep_tokens = 1", "color_aug = false\ncache_info = true")
    calm = calm.replace("resolution = 512", "resolution = [512, 512]")
    config = load_config(None, dataset_config=str(write(folder, calm)), output="o")
    assert config.resolution == 512 and config.keep_tags == 2


def test_the_sample_kohya_file_trains(tmp_path):
    """samples/style-kohya.toml (kohya dataset file, kohya-style prompts file) loads, checks
    and finds the sample images with the file's repeats."""
    config = load_config(ROOT / "samples" / "style-kohya.toml").check()
    assert config.data_dir == str(ROOT / "samples" / "style")
    assert (config.resolution, config.batch_size, config.repeats) == (64, 4, 2)
    assert config.shuffle_tags and config.keep_tags == 1 and config.buckets
    items, _, _ = discover(config)
    assert len(items) == 12 and {i.repeats for i in items} == {2}
    assert [p.seed for p in config.sample_prompt_settings()] == [1, 2]
