"""Injection: by path, no double wrap, clear errors, init changes nothing."""

import pytest
import torch
from conftest import run_text, run_unet

from sdlora.errors import SdloraError
from sdlora.lora.inject import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_trainable, find_targets
from sdlora.lora.layer import LoRALayer


def test_init_changes_nothing(tiny, inputs):
    before_unet, before_text = run_unet(tiny, inputs), run_text(tiny, inputs)
    add_trainable(tiny.unet, "unet", UNET_TARGETS["all"], rank=4, nonlinearity="gelu")
    add_trainable(tiny.text_encoder, "text_encoder", TEXT_ENCODER_TARGETS["attn"], rank=4)
    assert torch.equal(run_unet(tiny, inputs), before_unet)
    assert torch.equal(run_text(tiny, inputs), before_text)


def test_targets_match_by_path(tiny):
    paths = find_targets(tiny.unet, UNET_TARGETS["attn"])
    assert len(paths) == 7 * 2 * 4  # 7 transformer blocks, 2 attentions, q/k/v/out
    assert all(
        p.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or p.endswith("to_out.0") for p in paths
    )
    conv = find_targets(tiny.unet, ["proj_in"])
    assert all(isinstance(tiny.unet.get_submodule(p), torch.nn.Conv2d) for p in conv)


def test_no_double_wrap(tiny):
    first = add_trainable(tiny.unet, "unet", ["to_q"], rank=2, name="one")
    second = add_trainable(tiny.unet, "unet", ["to_q"], rank=2, name="two")
    assert first.keys() == second.keys()
    for path in find_targets(tiny.unet, ["to_q"]):
        layer = tiny.unet.get_submodule(path)
        assert isinstance(layer, LoRALayer) and not isinstance(layer.base, LoRALayer)
        assert [n for n, _ in layer.items()] == ["one", "two"]


def test_only_lora_params_train(tiny):
    injected = add_trainable(tiny.unet, "unet", UNET_TARGETS["attn"], rank=4)
    trainable = [p for p in tiny.unet.parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(injected)
    assert all(p.dtype == torch.float32 for p in trainable)


def test_nothing_matched_lists_names(tiny):
    with pytest.raises(SdloraError, match="no module matches targets to_z; available: .*to_q"):
        add_trainable(tiny.unet, "unet", ["to_z"], rank=2)


def test_rank_above_dims(tiny):
    with pytest.raises(SdloraError, match="rank 33 is larger than module .* allows \\(32\\)"):
        add_trainable(tiny.unet, "unet", ["to_q"], rank=33)
