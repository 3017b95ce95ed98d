"""Validation loss (train/validate.py): held-out split, fixed timesteps and noise, best kept."""

from __future__ import annotations

import logging
import re

import pytest
from test_train import settings, shapes  # noqa: F401 (a fixture)

from sdlora.errors import SdloraError
from sdlora.io.files import read_safetensors
from sdlora.train import train
from sdlora.train.data import discover
from sdlora.train.validate import recorded_best, split_items

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_split_follows_the_seed_and_leaves_images_to_train(shapes, tmp_path):  # noqa: F811
    items, _, _ = discover(settings(shapes, tmp_path / "out"))
    train_a, held_a = split_items(items, 0.25, seed=7)
    train_b, held_b = split_items(items, 0.25, seed=7)
    assert [i.path for i in held_a] == [i.path for i in held_b] and len(held_a) == 1
    assert {i.path for i in train_a} | {i.path for i in held_a} == {i.path for i in items}
    assert not {i.path for i in train_a} & {i.path for i in held_a}
    assert len(split_items(items, 0.01, seed=7)[1]) == 1  # a fraction asked for holds one out
    with pytest.raises(SdloraError, match="leaves none to train on"):
        split_items(items, 0.9, seed=7)


def _validation_losses(caplog) -> list[tuple[int, float]]:
    found = re.findall(r"step (\d+): validation loss ([\d.e+-]+)", caplog.text)
    return [(int(step), float(loss)) for step, loss in found]


def test_validation_loss_is_deterministic_and_the_best_adapter_is_kept(
    shapes,  # noqa: F811
    tmp_path,
    caplog,
):
    caplog.set_level(logging.INFO, logger="sdlora.train")
    runs = []
    for name in ("a", "b"):
        caplog.clear()
        config = settings(
            shapes,
            tmp_path / name,
            steps=4,
            validation_split=0.25,
            validate_every=2,
            keep_best=True,
        )
        train(config)
        runs.append(_validation_losses(caplog))
        assert "3 images" in caplog.text  # one of four held out, not trained on
    assert [step for step, _ in runs[0]] == [2, 4]
    assert runs[0] == runs[1]  # same seed, same held-out losses, to the digit
    best_step, best_loss = min(runs[0], key=lambda sl: sl[1])
    kept = settings(shapes, tmp_path / "a", keep_best=True, validation_split=0.25).best_path
    assert recorded_best(kept) == (pytest.approx(best_loss, rel=1e-5), best_step)
    tensors, meta = read_safetensors(kept)
    assert tensors and meta["sdlora_validation_step"] == str(best_step)
    assert f"best {best_loss:.5g} at step {best_step}" in caplog.text


def test_validation_settings_are_checked(shapes, tmp_path):  # noqa: F811
    with pytest.raises(SdloraError, match="keep_best needs validation images"):
        settings(shapes, tmp_path / "o", keep_best=True).check()
    with pytest.raises(SdloraError, match="not both"):
        settings(shapes, tmp_path / "o", validation_split=0.2, validation_data=str(shapes)).check()
    with pytest.raises(SdloraError, match=r"validation_split must be from 0 to below 1"):
        settings(shapes, tmp_path / "o", validation_split=1.5).check()
