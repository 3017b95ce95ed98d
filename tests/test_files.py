"""Adapter files: key layout, metadata, folding, save -> load exact, bad files."""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_adapter_file, run_text, run_unet
from safetensors.torch import load_file, save_file

from sdlora.errors import SdloraError
from sdlora.io.files import read_safetensors
from sdlora.io.formats import load_adapter
from sdlora.lora.blend import Mixer
from sdlora.lora.layer import NONLINEARITIES


@pytest.mark.parametrize("nonlinearity", list(NONLINEARITIES))
def test_save_load_exact_every_nonlinearity(tiny, inputs, tmp_path, nonlinearity):
    """Strength 1.0 of the saved file reproduces the live trained module (alpha 8, rank 4)."""
    from sdlora.bases.base import load_base

    path, trained = make_adapter_file(
        lambda: load_base("tiny"), tmp_path / "a.safetensors", alpha=8.0, nonlinearity=nonlinearity
    )
    mixer = Mixer(tiny)
    mixer.add(path)
    torch.testing.assert_close(
        run_unet(tiny, inputs), run_unet(trained, inputs), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        run_text(tiny, inputs), run_text(trained, inputs), atol=1e-5, rtol=1e-5
    )
    meta = load_adapter(path).metadata
    assert meta["sdlora_nonlinearity"] == nonlinearity
    assert meta["sdlora_training_alpha"] == "8.0"
    assert meta["sdlora_scale_folded_into"] == (
        "down" if nonlinearity in ("identity", "relu", "leaky_relu") else "up"
    )


def test_key_layout_and_metadata(tiny, tmp_path):
    path, _ = make_adapter_file(lambda: tiny, tmp_path / "style.safetensors", rank=4, alpha=2.0)
    tensors = load_file(path)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert f"{key}.lora_down.weight" in tensors and f"{key}.lora_up.weight" in tensors
    assert tensors[f"{key}.alpha"].item() == 4.0  # alpha = rank: the scale is folded in
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    _, meta = read_safetensors(path)
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4"
    assert meta["ss_output_name"] == "style" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["sdlora_format_version"] == "1"


def test_nonlinear_keys_are_not_plain_lora(tiny, tmp_path):
    path, _ = make_adapter_file(lambda: tiny, tmp_path / "n.safetensors", nonlinearity="silu")
    keys = load_file(path).keys()
    assert not any(k.startswith("lora_") or "lora_down" in k for k in keys)
    assert load_file(path) and load_adapter(path).nonlinearity == "silu"


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(SdloraError, match="bad.safetensors: not a readable safetensors"):
        load_adapter(bad)
    with pytest.raises(SdloraError, match="no such file"):
        load_adapter(tmp_path / "missing.safetensors")
    pickle = tmp_path / "x.ckpt"
    pickle.write_bytes(b"whatever")
    with pytest.raises(SdloraError, match="pickle files are never loaded"):
        load_adapter(pickle)
    empty = tmp_path / "empty.safetensors"
    save_file({"foo": torch.zeros(2)}, empty)
    with pytest.raises(SdloraError, match="no LoRA weights found"):
        load_adapter(empty)


def test_nan_weights_refused(tiny, tmp_path):
    path, _ = make_adapter_file(lambda: tiny, tmp_path / "a.safetensors")
    tensors = load_file(path)
    first = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[first][0, 0] = float("nan")
    save_file(tensors, tmp_path / "nan.safetensors")
    with pytest.raises(SdloraError, match="nan.safetensors: .* NaN/Inf"):
        load_adapter(tmp_path / "nan.safetensors")


def test_unknown_nonlinearity_in_file(tiny, tmp_path):
    path, _ = make_adapter_file(lambda: tiny, tmp_path / "n.safetensors", nonlinearity="tanh")
    tensors, meta = read_safetensors(path)
    meta["sdlora_nonlinearity"] = "mish"
    save_file(tensors, tmp_path / "m.safetensors", metadata=meta)
    with pytest.raises(SdloraError, match="m.safetensors: unknown nonlinearity 'mish'"):
        load_adapter(tmp_path / "m.safetensors")


def test_adapter_for_another_base_is_refused(tiny, tmp_path):
    path, _ = make_adapter_file(lambda: tiny, tmp_path / "a.safetensors")
    tensors = {k.replace("lora_unet_", "lora_unet_extra_"): v for k, v in load_file(path).items()}
    save_file(
        {k: v for k, v in tensors.items() if "lora_unet" in k}, tmp_path / "other.safetensors"
    )
    from sdlora.bases.base import load_base

    with pytest.raises(SdloraError, match="other.safetensors: .* do not exist in this base"):
        Mixer(load_base("tiny")).add(tmp_path / "other.safetensors")


def test_shape_mismatch_is_refused(tmp_path):
    from sdlora.bases.base import load_base

    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file(
        {
            f"{key}.lora_down.weight": torch.zeros(2, 48),
            f"{key}.lora_up.weight": torch.zeros(32, 2),
        },
        tmp_path / "wide.safetensors",
    )
    pipe = load_base("tiny")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(SdloraError, match="wide.safetensors: .*to_q: .*does not fit"):
        Mixer(pipe).add(tmp_path / "wide.safetensors")
    after = {
        k.replace(".base.", "."): v
        for k, v in pipe.unet.state_dict().items()
        if ".adapters." not in k
    }
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_trigger_words_roundtrip(tiny, tmp_path):
    from sdlora.io.files import save_adapter
    from sdlora.lora.inject import add_trainable, collect_adapter

    injected = add_trainable(tiny.unet, "unet", ["to_q"], rank=2)
    meta = {"sdlora_trigger_words": json.dumps(["sks", "toy style"])}
    save_adapter(collect_adapter(injected, meta), tmp_path / "t.safetensors")
    assert load_adapter(tmp_path / "t.safetensors").trigger_words() == ["sks", "toy style"]
    with pytest.raises(SdloraError, match="already exists"):
        save_adapter(collect_adapter(injected, meta), tmp_path / "t.safetensors")


def test_rank_above_dims_in_our_file_is_refused(tmp_path):
    """Our own layout gets the same rank check as foreign files: rank 40 on a 32×32 module."""
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file(
        {
            f"{key}.lora_down.weight": torch.ones(40, 32),
            f"{key}.lora_up.weight": torch.ones(32, 40),
            f"{key}.alpha": torch.tensor(40.0),
        },
        tmp_path / "deep.safetensors",
        metadata={"sdlora_format_version": "1"},
    )
    with pytest.raises(SdloraError, match=f"deep.safetensors: {key}: rank 40 is larger") as err:
        load_adapter(tmp_path / "deep.safetensors")
    assert "\n" not in str(err.value)
    # a nonlinear file too: its hidden width is checked against the layer like any rank
    nonlinear = {
        f"nonlinear_{key}.down.weight": torch.ones(33, 32),
        f"nonlinear_{key}.up.weight": torch.ones(32, 33),
    }
    save_file(nonlinear, tmp_path / "wide.safetensors", metadata={"sdlora_nonlinearity": "relu"})
    with pytest.raises(SdloraError, match="wide.safetensors: .*rank 33 is larger"):
        load_adapter(tmp_path / "wide.safetensors")


@pytest.mark.parametrize("nonlinearity", ["relu", "leaky_relu"])
def test_negative_alpha_folds_into_up(tiny, inputs, tmp_path, nonlinearity):
    """relu(s·x) ≠ s·relu(x) for s < 0: the scale must go into B, and the file stays exact."""
    from sdlora.bases.base import load_base

    path, trained = make_adapter_file(
        lambda: load_base("tiny"),
        tmp_path / "neg.safetensors",
        alpha=-6.0,
        nonlinearity=nonlinearity,
    )
    assert load_adapter(path).metadata["sdlora_scale_folded_into"] == "up"
    Mixer(tiny).add(path)
    assert (run_unet(trained, inputs) - run_unet(load_base("tiny"), inputs)).abs().max() > 1e-3
    torch.testing.assert_close(
        run_unet(tiny, inputs), run_unet(trained, inputs), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        run_text(tiny, inputs), run_text(trained, inputs), atol=1e-5, rtol=1e-5
    )


def test_one_output_check_for_every_writer(tmp_path):
    """`check_output`: the library's writers make missing folders, the commands refuse them; a
    device or pipe is never a place to write; the probe of the folder leaves nothing behind."""
    from sdlora.io.files import check_output

    deep = tmp_path / "a" / "b.safetensors"
    assert check_output(deep, suffix=".safetensors", make_parents=True) == deep
    with pytest.raises(SdloraError, match="does not exist; create it first") as err:
        check_output(deep, suffix=".safetensors")
    assert err.value.setting == "out"
    with pytest.raises(SdloraError, match=r"^/dev/null is a character device") as err:
        check_output("/dev/null", overwrite=True, setting=None)
    assert err.value.setting is None
    with pytest.raises(SdloraError, match="is a character device"):
        check_output(Path("/dev/null"), overwrite=True, folder=True)
    with pytest.raises(SdloraError, match="needs a file name") as err:
        check_output("", setting="output")
    assert str(err.value) == "output needs a file name"
    assert os.listdir(tmp_path) == []
