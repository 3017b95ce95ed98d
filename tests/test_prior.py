"""Regularization images (train/prior.py): captions, the draw, and loss = instance + w × prior."""

from __future__ import annotations

import logging
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import settings, shapes  # noqa: F401 (a fixture)

from sdlora.errors import SdloraError
from sdlora.train import train
from sdlora.train.prior import PriorImages

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def class_images(tmp_path_factory):
    """kohya layout: 2_dog/ (repeated twice) with one captioned image, and one plain folder."""
    root = tmp_path_factory.mktemp("reg")
    (root / "2_dog").mkdir()
    (root / "other").mkdir()
    for i, folder in enumerate(["2_dog", "2_dog", "other"]):
        Image.new("RGB", (80, 64), (40 * i, 90, 200 - 50 * i)).save(root / folder / f"img_{i}.png")
    (root / "2_dog" / "img_1.txt").write_text("a photo of a brown dog", encoding="utf-8")
    return root


def test_class_captions_and_the_draw_follow_kohya_and_the_seed(shapes, class_images, tmp_path):  # noqa: F811
    config = settings(shapes, tmp_path / "o", reg_data=str(class_images))
    prior = PriorImages.find(config)
    by_name = {item.path.name: caption for item, caption in prior.images}
    assert by_name == {
        "img_0.png": "dog",
        "img_1.png": "a photo of a brown dog",
        "img_2.png": "img 2",
    }
    assert len(prior.order) == 5  # the 2_dog images count twice
    with_prompt = PriorImages.find(
        settings(shapes, tmp_path / "o", reg_data=str(class_images), class_prompt="a dog")
    )
    assert {c for _, c in with_prompt.images} == {"a dog", "a photo of a brown dog"}
    drawn = prior.draw(3, (64, 64), 2)
    pixels, captions = drawn.pixels, drawn.captions
    assert pixels.shape == (2, 3, 64, 64) and -1 <= pixels.min() and pixels.max() <= 1
    again = prior.draw(3, (64, 64), 2)
    assert (
        torch.equal(pixels, again.pixels) and captions == again.captions
    )  # the same micro-batch, the same draw
    # one cycle hands out every image as often as its repeats say
    cycle = [prior.draw(k, (64, 64), 1).captions[0] for k in range(5)]
    assert sorted(cycle) == sorted(["dog"] * 2 + ["a photo of a brown dog"] * 2 + ["img 2"])
    with pytest.raises(SdloraError, match="--reg-data"):
        PriorImages.find(settings(shapes, tmp_path / "o", reg_data=str(tmp_path / "none")))


def _first_loss(caplog) -> float:
    return float(re.search(r"step 1: loss ([\d.e+-]+)", caplog.text).group(1))


def test_a_step_loss_is_instance_plus_weight_times_prior(shapes, class_images, tmp_path, caplog):  # noqa: F811
    caplog.set_level(logging.DEBUG, logger="sdlora.train")
    losses = {}
    for weight in (0.0, 1.0, 2.5):
        caplog.clear()
        config = settings(
            shapes,
            tmp_path / str(weight),
            steps=1,
            reg_data=str(class_images),
            prior_loss_weight=weight,
        )
        train(config)
        losses[weight] = _first_loss(caplog)
    prior = losses[1.0] - losses[0.0]  # the same draws each time: only the weight differs
    assert prior > 0
    assert losses[2.5] == pytest.approx(losses[0.0] + 2.5 * prior, rel=1e-4)


def test_reg_generate_fills_the_folder_once_with_the_bases_images(shapes, tmp_path, caplog):  # noqa: F811
    from sdlora.bases.base import load_base
    from sdlora.bases.generate import GenerateSettings, generate
    from sdlora.train.data import derived_seed
    from sdlora.train.prior import GENERATED

    caplog.set_level(logging.INFO, logger="sdlora.train")
    reg = tmp_path / "reg"
    (reg / "1_circle").mkdir(parents=True)
    Image.new("RGB", (64, 64), (10, 200, 30)).save(reg / "1_circle" / "mine.png")
    config = settings(
        shapes, tmp_path / "a", steps=1, reg_data=str(reg), reg_generate=3, class_prompt="a circle"
    )
    train(config)
    drawn = sorted((reg / GENERATED).iterdir())
    assert [p.name for p in drawn] == ["class-00000.png", "class-00001.png"]  # 1 + 2 = 3
    assert "regularization: 3 class image(s)" in caplog.text
    # image 1 is what the base draws for the class prompt with its seed (recommended settings)
    expected = generate(
        load_base("tiny"),
        GenerateSettings(prompt="a circle", seed=derived_seed(config.seed, "class image", 1)),
    )[0]
    assert np.array_equal(np.asarray(Image.open(drawn[1])), np.asarray(expected))
    stamps = [p.stat().st_mtime_ns for p in drawn]
    caplog.clear()
    train(
        settings(
            shapes,
            tmp_path / "b",
            steps=1,
            reg_data=str(reg),
            reg_generate=3,
            class_prompt="a circle",
        )
    )
    assert "drawing" not in caplog.text  # cached: nothing drawn the second time
    assert [p.stat().st_mtime_ns for p in sorted((reg / GENERATED).iterdir())] == stamps
    assert not list(reg.rglob(".*"))  # no temporary files left behind
    with pytest.raises(SdloraError, match="reg_generate draws class images"):
        train(settings(shapes, tmp_path / "c", reg_data=str(reg), reg_generate=3))


def test_a_reg_folder_inside_the_data_is_not_trained_as_instance_images(
    shapes,  # noqa: F811
    class_images,
    tmp_path,
):
    """It used to be walked with DATA_DIR, so its class images trained as the subject too."""
    import shutil

    from sdlora.train.data import discover

    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    shutil.copytree(class_images, data / "reg")
    shutil.copytree(class_images, data / "held")
    config = settings(data, tmp_path / "o", reg_data=str(data / "reg"))
    shapes_only = ["0.png", "1.png", "2.png", "3.png"]
    items, _, _ = discover(config)
    held = [f"img_{i}.png" for i in range(3)]  # held/ is trained, reg/ is not
    assert sorted(item.path.name for item in items) == shapes_only + held
    items, _, _ = discover(replace(config, validation_data=str(data / "held")))
    assert sorted(item.path.name for item in items) == shapes_only
    assert len(PriorImages.find(config).images) == 3  # the class images are all there


def test_a_reg_folder_that_holds_the_data_is_refused_before_loading(
    shapes,  # noqa: F811
    class_images,
    tmp_path,
    monkeypatch,
):
    import shutil

    from sdlora.train import models

    def refuse(*args, **kwargs):
        raise AssertionError("the base was loaded before the folders were checked")

    monkeypatch.setattr(models, "load_base", refuse)
    reg = tmp_path / "reg"
    shutil.copytree(class_images, reg)
    shutil.copytree(shapes, reg / "me")
    for data in (reg / "me", reg):
        with pytest.raises(SdloraError, match=r"holds the training images of .*; give the") as err:
            train(settings(data, tmp_path / "o", reg_data=str(reg)))
        assert err.value.setting == "reg_data" and "\n" not in str(err.value)
    assert not (tmp_path / "o").exists()
