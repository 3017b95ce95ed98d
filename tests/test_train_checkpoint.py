"""Checkpoints: atomic, pruned to the last K, and never damaged by a save that dies half-way."""

from __future__ import annotations

import pytest
import torch

from sdlora.errors import SdloraError
from sdlora.io.formats import load_adapter
from sdlora.lora.adapter import Adapter, ModuleFactors
from sdlora.train import checkpoint


def adapter(value: float) -> Adapter:
    factors = ModuleFactors(down=torch.full((2, 4), value), up=torch.full((3, 2), value), alpha=2.0)
    return Adapter(modules={"lora_unet_mid_block_attn_to_q": factors})


def save(output, step, keep_last=2):
    state = {"step": step, "lora": {}, "optimizer": {"state": {}, "param_groups": []}}
    return checkpoint.save(output, step, state, adapter(float(step)), {"rank": 2}, keep_last)


def test_save_load_and_keep_last(tmp_path):
    for step in (2, 4, 6):
        save(tmp_path, step)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step-000004", "step-000006"]
    info, state = checkpoint.load(checkpoint.latest(tmp_path))
    assert info == {"step": 6, "settings": {"rank": 2}} and state["step"] == 6
    saved = load_adapter(checkpoint.latest(tmp_path) / checkpoint.ADAPTER)
    assert saved.modules["lora_unet_mid_block_attn_to_q"].down[0, 0] == 6.0


def test_a_save_that_dies_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    save(tmp_path, 2)

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # as if the run were stopped in the middle of writing

    monkeypatch.setattr(checkpoint.torch, "save", die)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 4)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step-000002"]
    assert [p.name for p in (tmp_path / checkpoint.FOLDER).iterdir()] == ["step-000002"]
    assert checkpoint.load(checkpoint.latest(tmp_path))[1]["step"] == 2


def test_leftovers_of_a_killed_save_are_ignored_then_cleaned(tmp_path):
    save(tmp_path, 2)
    leftover = tmp_path / checkpoint.FOLDER / ".tmp-step-000004-abc"
    leftover.mkdir()
    (leftover / checkpoint.ADAPTER).write_bytes(b"half a file")
    half = tmp_path / checkpoint.FOLDER / "step-000006"  # no checkpoint.json: incomplete
    half.mkdir()
    assert checkpoint.latest(tmp_path).name == "step-000002"
    checkpoint.clean(tmp_path)
    assert not leftover.exists()


def test_loading_something_else_is_a_clear_error(tmp_path):
    with pytest.raises(SdloraError, match="not a checkpoint folder"):
        checkpoint.load(tmp_path)
    save(tmp_path, 2)
    (checkpoint.latest(tmp_path) / checkpoint.STATE).write_bytes(b"garbage")
    with pytest.raises(SdloraError, match="checkpoint cannot be read"):
        checkpoint.load(checkpoint.latest(tmp_path))
