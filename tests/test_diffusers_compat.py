"""diffusers' own loaders read our files the way we do."""

import torch
from conftest import make_adapter_file, run_text, run_unet

from sdlora.bases.base import load_base
from sdlora.lora.blend import Mixer


def test_load_lora_weights_agrees(tmp_path, inputs):
    path, trained = make_adapter_file(
        lambda: load_base("tiny"), tmp_path / "style.safetensors", alpha=8.0
    )
    theirs = load_base("tiny")
    theirs.load_lora_weights(str(path), adapter_name="style")
    ours = load_base("tiny")
    mixer = Mixer(ours)
    mixer.add(path)
    base_unet = run_unet(load_base("tiny"), inputs)
    assert (run_unet(ours, inputs) - base_unet).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(
        run_unet(theirs, inputs), run_unet(ours, inputs), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        run_text(theirs, inputs), run_text(ours, inputs), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        run_unet(ours, inputs), run_unet(trained, inputs), atol=1e-5, rtol=1e-5
    )

    theirs.set_adapters(["style"], [0.5])
    mixer.set_strength("style", 0.5)
    torch.testing.assert_close(
        run_unet(theirs, inputs), run_unet(ours, inputs), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        run_text(theirs, inputs), run_text(ours, inputs), atol=1e-5, rtol=1e-5
    )


def test_two_adapters_agree_with_diffusers_blend(tmp_path, inputs):
    a, _ = make_adapter_file(lambda: load_base("tiny"), tmp_path / "a.safetensors", seed=3)
    b, _ = make_adapter_file(
        lambda: load_base("tiny"), tmp_path / "b.safetensors", rank=2, seed=4, text_encoder=False
    )
    theirs = load_base("tiny")
    theirs.load_lora_weights(str(a), adapter_name="a")
    theirs.load_lora_weights(str(b), adapter_name="b")
    theirs.set_adapters(["a", "b"], [0.7, 0.4])
    ours = load_base("tiny")
    mixer = Mixer(ours)
    mixer.add(a, strength=0.7)
    mixer.add(b, strength=0.4)
    torch.testing.assert_close(
        run_unet(theirs, inputs), run_unet(ours, inputs), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        run_text(theirs, inputs), run_text(ours, inputs), atol=1e-5, rtol=1e-5
    )
