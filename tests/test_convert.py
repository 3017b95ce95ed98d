"""Converting adapters: kohya and diffusers outputs load in diffusers and in sdlora the same."""

import json

import pytest
from conftest import make_adapter_file, run_text, run_unet
from safetensors import safe_open
from test_formats import close, kohya_file, loha_lokr_file, peft_file

from sdlora.bases.base import load_base
from sdlora.cli import main
from sdlora.errors import SdloraError
from sdlora.io.convert import convert_adapter, path_by_name
from sdlora.io.formats import load_adapter
from sdlora.lora.blend import Mixer


def ours(path, strength=1.0):
    pipe = load_base("tiny")
    Mixer(pipe).add(path, strength=strength)
    return pipe


def theirs(path):
    pipe = load_base("tiny")
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="x")
    return pipe


@pytest.mark.parametrize("with_base", [False, True])
def test_kohya_locon_to_diffusers(tmp_path, inputs, with_base):
    """Mixed ranks, alpha ≠ rank, 3x3 and 1x1 convs: diffusers reads our output like the source."""
    src, _ = kohya_file(tmp_path)
    out = tmp_path / "pytorch_lora_weights.safetensors"
    pipe = load_base("tiny") if with_base else None
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder} if pipe else None
    convert_adapter(load_adapter(src), "diffusers", out, models=models)
    with safe_open(str(out), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert (
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.lora_A.weight" in keys
    )
    assert json.loads(meta["lora_adapter_metadata"])["unet.r"] in (2, 3, 4)
    expected = ours(src)
    close(run_unet(theirs(out), inputs), run_unet(expected, inputs))
    close(run_text(theirs(out), inputs), run_text(expected, inputs))
    back = load_adapter(out)
    assert back.metadata["sdlora_detected_format"] == "diffusers-peft"
    close(run_unet(ours(out), inputs), run_unet(expected, inputs))


def test_peft_and_lycoris_to_kohya(tmp_path, inputs):
    src, live = peft_file(tmp_path)
    out = tmp_path / "k.safetensors"
    convert_adapter(load_adapter(src), "kohya", out)
    assert load_adapter(out).metadata["sdlora_converted_from"] == "diffusers-peft"
    close(run_unet(theirs(out), inputs), run_unet(live, inputs))
    close(run_text(theirs(out), inputs), run_text(live, inputs))
    close(run_unet(ours(out), inputs), run_unet(live, inputs))
    lyco, _ = loha_lokr_file(tmp_path)
    convert_adapter(load_adapter(lyco), "kohya", tmp_path / "lk.safetensors")
    close(
        run_unet(ours(tmp_path / "lk.safetensors", 0.5), inputs), run_unet(ours(lyco, 0.5), inputs)
    )


def test_refusals(tmp_path):
    n, _ = make_adapter_file(
        lambda: load_base("tiny"), tmp_path / "n.safetensors", nonlinearity="tanh"
    )
    with pytest.raises(SdloraError, match="n.safetensors: has nonlinearity 'tanh'"):
        convert_adapter(load_adapter(n), "kohya", tmp_path / "o.safetensors")
    with pytest.raises(SdloraError, match="cannot tell the module path .* pass --base"):
        path_by_name("unet", "down_blocks_0_mystery_layer")
    assert (
        path_by_name("unet", "up_blocks_1_resnets_0_conv_shortcut")
        == "up_blocks.1.resnets.0.conv_shortcut"
    )
    assert path_by_name("text_encoder", "text_model_encoder_layers_11_self_attn_out_proj") == (
        "text_model.encoder.layers.11.self_attn.out_proj"
    )
    src, _ = kohya_file(tmp_path)
    (tmp_path / "taken.safetensors").write_bytes(b"x")
    with pytest.raises(SdloraError, match="taken.safetensors already exists"):
        convert_adapter(load_adapter(src), "diffusers", tmp_path / "taken.safetensors")


def test_cli(tmp_path, capsys):
    src, _ = kohya_file(tmp_path)
    out = tmp_path / "d.safetensors"
    assert (
        main(["convert", str(src), "--to", "diffusers", "--out", str(out), "--base", "tiny"]) == 0
    )
    assert out.exists()
    (tmp_path / "a.ckpt").write_bytes(b"\x80\x04")
    assert (
        main(
            [
                "convert",
                str(tmp_path / "a.ckpt"),
                "--to",
                "kohya",
                "--out",
                str(tmp_path / "b.safetensors"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "a.ckpt: pickle files are never loaded" in err and err.count("\n") == 1


def test_base_with_other_shapes_is_refused(tmp_path, capsys):
    """--base checks shapes too: a to_q adapter 48 wide (the tiny base's is 32) writes nothing."""
    import torch
    from safetensors.torch import save_file

    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    src = tmp_path / "wide.safetensors"
    save_file(
        {f"{key}.lora_down.weight": torch.ones(2, 48), f"{key}.lora_up.weight": torch.ones(32, 2)},
        src,
    )
    pipe = load_base("tiny")
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    for to in ("kohya", "diffusers"):
        out = tmp_path / f"{to}.safetensors"
        shapes = r"wide.safetensors: 1 modules have other shapes .*file 32×48, base 32×32"
        with pytest.raises(SdloraError, match=shapes):
            convert_adapter(load_adapter(src), to, out, models=models)
        assert not out.exists()
        argv = ["convert", str(src), "--to", to, "--out", str(out), "--base", "tiny"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("sdlora: wide.safetensors: ") and err.count("\n") == 1
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide.safetensors"]
