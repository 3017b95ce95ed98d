"""LoCon training (--targets locon, --conv-rank): kohya's LoCon layout, read by diffusers as ours."""

from __future__ import annotations

import pytest
import torch
from conftest import run_unet
from safetensors.torch import load_file
from test_train import settings, shapes  # noqa: F401 (a fixture)

from sdlora.bases.base import load_base
from sdlora.errors import SdloraError
from sdlora.io.files import save_adapter
from sdlora.io.formats import load_adapter
from sdlora.lora.blend import Mixer
from sdlora.train import train


@pytest.fixture(scope="module")
def locon_file(shapes, tmp_path_factory):  # noqa: F811
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("locon")
    config = settings(shapes, out, targets="locon", rank=4, conv_rank=2, conv_alpha=1.0, steps=3)
    path = train(config)
    torch.set_num_threads(threads)
    return path


def test_convolutions_get_the_conv_rank_in_kohya_locon_layout(locon_file):
    tensors = load_file(str(locon_file))
    down = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
    up = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"]
    assert down.shape[0] == 2 and down.shape[2:] == (3, 3)  # a k×k down of the conv rank
    assert up.shape[1:] == (2, 1, 1) and up.abs().max() > 0  # a 1×1 up; it trained
    # the scale (conv alpha 1 / conv rank 2) is folded in: alpha = rank in the file
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].item() == 2.0
    assert tensors["lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_down.weight"].shape[0] == 4
    samplers = [k for k in tensors if "samplers_0_conv.lora_down" in k]
    assert samplers and all(tensors[k].shape[0] == 2 for k in samplers)


def test_diffusers_reads_a_locon_file_as_we_do_and_it_round_trips(locon_file, tmp_path, inputs):
    ours = load_base("tiny")
    Mixer(ours).add(locon_file)
    unfused = load_base("tiny")
    Mixer(unfused).add(locon_file, fuse=False)
    theirs = load_base("tiny")
    theirs.load_lora_weights(str(locon_file), adapter_name="locon")
    base = run_unet(load_base("tiny"), inputs)
    assert (run_unet(ours, inputs) - base).abs().max() > 1e-4  # the adapter does something
    torch.testing.assert_close(
        run_unet(theirs, inputs), run_unet(ours, inputs), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        run_unet(unfused, inputs), run_unet(ours, inputs), atol=1e-5, rtol=1e-5
    )
    again = save_adapter(load_adapter(locon_file), tmp_path / "again.safetensors")
    first, second = load_file(str(locon_file)), load_file(str(again))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_conv_rank_is_checked(shapes, tmp_path):  # noqa: F811
    with pytest.raises(SdloraError, match="conv_rank must be from 1 to"):
        settings(shapes, tmp_path / "o", targets="locon", conv_rank=0).check()
