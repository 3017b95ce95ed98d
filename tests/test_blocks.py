"""Per-block strengths (sdlora/lora/blocks.py, Mixer blocks=): LoRA Block Weight's blocks, exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_adapter_file, run_unet
from diffusers import UNet2DConditionModel

from sdlora.bases.base import load_base
from sdlora.errors import SdloraError
from sdlora.io.formats import load_adapter
from sdlora.lora.blend import Mixer
from sdlora.lora.blocks import BLOCKS17, block_of, parse_blocks, scale_blocks


def test_modules_map_to_the_ldm_blocks():
    cases = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "IN01",
        "down_blocks_1_attentions_1_proj_in": "IN05",
        "down_blocks.2.downsamplers.0.conv": "IN09",
        "down_blocks.3.resnets.1.conv1": "IN11",
        "conv_in": "IN00",
        "mid_block.attentions.0.proj_out": "M00",
        "up_blocks.0.upsamplers.0.conv": "OUT02",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": "OUT03",
        "up_blocks_3_attentions_2_proj_out": "OUT11",
    }
    assert {path: block_of("unet", path) for path in cases} == cases
    assert block_of("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj") == "BASE"


def test_the_17_value_vector_covers_an_sd15_attention_lora():
    from benchmarks.sd15 import UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIG)
    blocks = {block_of("unet", p) for p, _ in unet.named_modules() if p.endswith("attn1.to_q")}
    assert sorted(blocks) == sorted(BLOCKS17[1:])


def test_specs_parse_and_bad_ones_are_refused():
    assert parse_blocks("IN=0, MID=1,out=0.5,TE=0.2,IN04=0.7") == {
        "IN": 0.0,
        "M00": 1.0,
        "OUT": 0.5,
        "BASE": 0.2,
        "IN04": 0.7,
    }
    vector = parse_blocks(",".join(["1"] * 7 + ["0"] + ["0.5"] * 9))
    assert vector["M00"] == 0 and vector["OUT11"] == 0.5 and len(vector) == 17
    for bad, match in [
        ("IN=x", "not a number"),
        ("FOO=1", "unknown block"),
        ("1,2,3", "17 or 26 values"),
        ("IN=1e30", "from -100 to 100"),
        ("IN", "17 or 26"),
    ]:
        with pytest.raises(SdloraError, match=match):
            parse_blocks(bad)


@pytest.fixture(scope="module")
def adapter_path(tmp_path_factory):
    path, _ = make_adapter_file(
        lambda: load_base("tiny"), tmp_path_factory.mktemp("blocks") / "a.safetensors"
    )
    return path


def _weights(pipe) -> dict[str, torch.Tensor]:
    """Every base weight under its plain name (a LoRALayer holds it as `<module>.base.weight`)."""
    out = {}
    for component in ("unet", "text_encoder"):
        for key, value in getattr(pipe, component).state_dict().items():
            if ".adapters." not in key:
                out[key.replace(".base.", ".")] = value.clone()
    return out


def test_every_block_at_s_equals_whole_strength_s_exactly(adapter_path, inputs):
    whole, blocked = load_base("tiny"), load_base("tiny")
    Mixer(whole).add(adapter_path, strength=0.6)
    mixer = Mixer(blocked)
    mixer.add(adapter_path, blocks="IN=0.6,MID=0.6,OUT=0.6,BASE=0.6")
    a, b = _weights(whole), _weights(blocked)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and moving the blocks back to 1 is the whole adapter at strength 1, exactly
    mixer.set_blocks("a", None)
    full = load_base("tiny")
    Mixer(full).add(adapter_path)
    c, d = _weights(full), _weights(blocked)
    assert all(torch.equal(c[k], d[k]) for k in c)


def test_a_block_at_zero_keeps_the_base_weights_bit_for_bit(adapter_path, inputs):
    base = _weights(load_base("tiny"))
    pipe = load_base("tiny")
    mixer = Mixer(pipe)
    mixer.add(adapter_path, blocks="IN=0")
    now = _weights(pipe)
    down = [k for k in base if k.startswith("down_blocks.") and "attentions" in k and ".to_" in k]
    up = [k for k in base if k.startswith("up_blocks.") and "attentions" in k and ".to_q" in k]
    assert down and all(torch.equal(now[k], base[k]) for k in down)
    assert any(not torch.equal(now[k], base[k]) for k in up)  # the others carry the adapter
    assert (run_unet(pipe, inputs) - run_unet(load_base("tiny"), inputs)).abs().max() > 0


def test_merging_with_block_strengths_scales_each_module(adapter_path):
    adapter = load_adapter(adapter_path)
    scaled = scale_blocks(adapter, parse_blocks("OUT=0.5,BASE=0"))
    for key, factors in adapter.modules.items():
        m = (
            0.5
            if key.startswith("lora_unet_up_blocks")
            else 0.0
            if key.startswith("lora_te_")
            else 1.0
        )
        torch.testing.assert_close(scaled.modules[key].up, factors.up * m, rtol=0, atol=0)
        assert torch.equal(scaled.modules[key].down, factors.down)


def test_the_command_line_takes_block_strengths_after_an_at(adapter_path, tmp_path):
    from PIL import Image

    from sdlora.cli import main
    from sdlora.io.lora_spec import parse_lora_spec

    spec = parse_lora_spec("a/b.safetensors:0.8@mine@IN=0,MID=1,OUT=0.5")
    assert (spec.path, spec.strength, spec.name, spec.blocks) == (
        "a/b.safetensors",
        0.8,
        "mine",
        "IN=0,MID=1,OUT=0.5",
    )
    vector = ",".join(["1"] * 17)
    assert parse_lora_spec(f"x.safetensors@{vector}").blocks == vector
    assert parse_lora_spec("me@home.safetensors:0.5").blocks is None
    common = ["generate", "--base", "tiny", "--prompt", "a red circle", "--steps", "2"]
    assert main([*common, "--out", str(tmp_path / "base.png")]) == 0
    off = f"{adapter_path}@IN=0,MID=0,OUT=0,BASE=0"  # every block at 0: the base, exactly
    assert main([*common, "--lora", off, "--out", str(tmp_path / "off.png")]) == 0
    on = f"{adapter_path}@OUT=2"
    assert main([*common, "--lora", on, "--out", str(tmp_path / "on.png")]) == 0
    pixels = {n: np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("base", "off", "on")}
    assert np.array_equal(pixels["base"], pixels["off"])
    assert not np.array_equal(pixels["base"], pixels["on"])
    name = Path(adapter_path).stem  # the PNG's A1111 record keeps the blocks
    assert f"<lora:{name}:1:lbw=OUT=2>" in Image.open(tmp_path / "on.png").text["parameters"]


def test_merge_honours_block_strengths(adapter_path, tmp_path):
    from sdlora.cli import main

    halves = tmp_path / "halves.safetensors"
    half = tmp_path / "half.safetensors"
    assert (
        main(["merge", f"{adapter_path}@IN=0.5,MID=0.5,OUT=0.5,BASE=0.5", "--out", str(halves)])
        == 0
    )
    assert main(["merge", f"{adapter_path}:0.5", "--out", str(half)]) == 0
    a, b = load_adapter(halves), load_adapter(half)
    assert a.modules.keys() == b.modules.keys()

    def delta(f):  # where the strength sits (down or up) is the merger's choice; ΔW is not
        return f.scale * f.up.reshape(f.up.shape[0], -1) @ f.down.reshape(f.down.shape[0], -1)

    for key in a.modules:
        torch.testing.assert_close(
            delta(a.modules[key]), delta(b.modules[key]), rtol=1e-6, atol=1e-7, msg=key
        )


# ---------------------------------------------------------------- checked against the family


@pytest.fixture(scope="module")
def xl_adapter_path(tmp_path_factory):
    path, _ = make_adapter_file(
        lambda: load_base("tiny-xl"),
        tmp_path_factory.mktemp("blocks-xl") / "xl.safetensors",
        text_encoder=False,
    )
    return path


def test_a_vector_of_the_other_familys_length_is_refused(adapter_path, xl_adapter_path):
    """17 zeros on SDXL left OUT00..OUT02 on; 12 zeros on SD 1.x left IN01, IN02, OUT06..OUT11."""
    sd, xl = Mixer(load_base("tiny")), Mixer(load_base("tiny-xl"))
    with pytest.raises(
        SdloraError,
        match=r"^a: block strengths: a vector for an SD 1\.x adapter has 17 values \(BASE, IN01, "
        r"IN02, IN04, IN05, IN07, IN08, M00, OUT03\.\.OUT11\) or 26 \(BASE, IN00\.\.IN11, M00, "
        r"OUT00\.\.OUT11\) in LoRA Block Weight's order, not 12$",
    ):
        sd.add(adapter_path, blocks=[0] * 12)
    with pytest.raises(SdloraError, match=r"an SDXL adapter has 12 values .* or 20 .*, not 17$"):
        xl.add(xl_adapter_path, blocks=",".join(["0"] * 17))
    with pytest.raises(SdloraError, match=r"an SDXL adapter has no block 'OUT10'; use IN, MID, "):
        xl.add(xl_adapter_path, blocks="OUT10=0")
    assert not sd.entries and not xl.entries  # refused before anything was attached
    # set_blocks (the web UI's block panel and <lora:...:lbw=...> tags come this way) too
    from sdlora.lora.prompt_tags import split_lora_tags

    _, _, tags = split_lora_tags("a cat <lora:xl:1:lbw=" + ",".join(["0"] * 17) + ">")
    xl.add(xl_adapter_path, blocks="IN=0.5")
    with pytest.raises(SdloraError, match=r"^xl: block strengths: a vector for an SDXL adapter"):
        xl.set_blocks("xl", tags["xl"])
    assert xl.entries["xl"].block_strengths == {"IN": 0.5}  # the old ones stay
    # merging checks against the adapter file's own family
    with pytest.raises(SdloraError, match=r"xl\.safetensors: block strengths: .* not 26$"):
        scale_blocks(load_adapter(xl_adapter_path), [0] * 26)


def test_each_familys_own_vectors_turn_every_module_off(xl_adapter_path, adapter_path, inputs):
    """The attention-block vector (17 for SD, 12 for SDXL) at 0 gives the base exactly."""
    for base, path, length in [("tiny", adapter_path, 17), ("tiny-xl", xl_adapter_path, 12)]:
        pipe = load_base(base)
        mixer = Mixer(pipe)
        mixer.add(path, blocks=[0] * length)
        entry = mixer.entries[Path(path).stem]
        assert all(entry.layer_strength(i) == 0 for i in range(len(entry.layers)))
        assert _weights(pipe).keys() == _weights(load_base(base)).keys()
        fresh = _weights(load_base(base))
        assert all(torch.equal(v, fresh[k]) for k, v in _weights(pipe).items()), base


def test_the_command_line_refuses_a_vector_of_the_wrong_length(adapter_path, tmp_path, capsys):
    """A vector of another length was read as the adapter's NAME before; now it is checked."""
    from sdlora.cli import main
    from sdlora.io.lora_spec import parse_lora_spec

    twelve = ",".join(["0"] * 12)
    spec = parse_lora_spec(f"x.safetensors:0.5@{twelve}")  # SDXL's attention vector
    assert (spec.name, spec.blocks) == (None, twelve)
    assert parse_lora_spec("x.safetensors@1,0.5,").blocks == "1,0.5,"  # checked by the mixer
    out = tmp_path / "o.png"
    common = ["generate", "--base", "tiny", "--prompt", "x", "--steps", "1", "--out", str(out)]
    for args in (
        [*common, "--lora", f"{adapter_path}:0.5@{twelve}"],
        ["merge", f"{adapter_path}@{twelve}", "--out", str(tmp_path / "m.safetensors")],
    ):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "an SD 1.x adapter has 17 values" in err and "not 12" in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "m.safetensors").exists()
