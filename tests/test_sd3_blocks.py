"""Per-block strengths on SD 3.x (sdlora/lora/blocks.py): one value per joint block, groups by
thirds, exact on tiny-sd3's transformer through the Mixer, fused and unfused."""

from __future__ import annotations

import pytest
import torch

from sdlora.bases.base import load_base
from sdlora.bases.families import SD1, SD3
from sdlora.errors import SdloraError
from sdlora.lora.adapter import Adapter, ModuleFactors, module_keys
from sdlora.lora.blend import Mixer
from sdlora.lora.blocks import block_of, parse_blocks, scale_blocks, third


@pytest.fixture(scope="module")
def sd3():
    return load_base("tiny-sd3")


@pytest.fixture(scope="module")
def adapter(sd3):
    """Random factors on every Linear/Conv2d of the transformer: both joint blocks, the
    embedders and the final layer (1x1-kernel-free: pos_embed's conv gets flattened factors)."""
    t = sd3.transformer
    keys = module_keys(t, "transformer")
    g = torch.Generator().manual_seed(3)
    modules = {}
    for path, module in t.named_modules():
        if isinstance(module, torch.nn.Linear):
            fan_in, fan_out = module.in_features, module.out_features
        elif isinstance(module, torch.nn.Conv2d):
            fan_in, fan_out = module.weight[0].numel(), module.out_channels
        else:
            continue
        down = torch.randn(4, fan_in, generator=g) * 0.2
        up = torch.randn(fan_out, 4, generator=g) * 0.2
        modules[keys[path]] = ModuleFactors(down, up, 2.0)
    return Adapter(modules, source="hand.safetensors")


def run(t, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, 8, 8, generator=g)
    context = torch.randn(1, 12, t.config.joint_attention_dim, generator=g)
    pooled = torch.randn(1, t.config.pooled_projection_dim, generator=g)
    with torch.no_grad():
        return t(latents, context, pooled, torch.tensor([400.0])).sample


def output(pipe, adapter, fuse, strength=0.8, blocks=None):
    mixer = Mixer(pipe)
    mixer.add(adapter, name="a", strength=strength, fuse=fuse, blocks=blocks)
    try:
        return run(pipe.transformer)
    finally:
        mixer.remove("a")


def test_transformer_modules_map_to_joint_blocks():
    cases = {
        ("transformer", "transformer_blocks.0.attn.to_q"): "J00",
        ("transformer", "transformer_blocks_13_ff_net_2"): "J13",
        ("transformer", "pos_embed.proj"): "EMBED",
        ("transformer", "time_text_embed.timestep_embedder.linear_1"): "EMBED",
        ("transformer", "context_embedder"): "EMBED",
        ("transformer", "norm_out.linear"): "FINAL",
        ("transformer", "proj_out"): "FINAL",
        ("unet", "joint_blocks_7_x_block_attn_qkv"): "J07",  # kohya's SD3 names
        ("unet", "final_layer_linear"): "FINAL",
        ("unet", "context_embedder"): "EMBED",
        ("text_encoder_3", "encoder.block.0.layer.0.SelfAttention.q"): "BASE",
    }
    assert {k: block_of(*k) for k in cases} == cases
    # UNet paths keep their blocks (transformer_blocks inside a UNet attention is not a joint block)
    assert block_of("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") == "IN01"
    # thirds: 24 blocks 8/8/8, 38 blocks 13/12/13, 2 blocks J00 / none / J01
    assert [sum(third(i, 24) == g for i in range(24)) for g in ("FIRST", "MIDDLE", "LAST")] == [
        8,
        8,
        8,
    ]
    assert [sum(third(i, 38) == g for i in range(38)) for g in ("FIRST", "MIDDLE", "LAST")] == [
        13,
        12,
        13,
    ]
    assert (third(0, 2), third(1, 2)) == ("FIRST", "LAST")


def test_parse_sd3_specs_by_block_group_and_vector():
    assert parse_blocks("J03=0,TE=0.5", SD3, 24) == {"J03": 0.0, "BASE": 0.5}
    groups = parse_blocks("FIRST=0.1,MIDDLE=0.2,LAST=0.3,J08=1", SD3, 24)
    assert groups["J00"] == groups["J07"] == groups["EMBED"] == 0.1
    assert groups["J08"] == 1.0 and groups["J09"] == groups["J15"] == 0.2
    assert groups["J16"] == groups["J23"] == groups["FINAL"] == 0.3
    vector = parse_blocks([0.5, *range(24)], SD3, 24)
    assert vector["BASE"] == 0.5 and vector["J05"] == 5.0
    assert (vector["EMBED"], vector["FINAL"]) == (0.0, 23.0)


@pytest.mark.parametrize(
    "spec, depth, match",
    [
        ("IN04=0", 24, r"an SD 3.x adapter has no block 'IN04'; use FIRST, MIDDLE, LAST, BASE"),
        ("MID=0", 24, r"SD 3.x adapter has no block 'MID'.*J00..J23"),
        ("J24=0", 24, r"SD 3.x adapter has no block 'J24'.*J00..J23"),
        ("1,0,0,0,0", 24, r"vector for this SD 3.x base has 25 values \(BASE, then J00..J23"),
        ([1] * 26, 24, r"has 25 values .* not 26"),
        ("1,0,0", 24, r"not 3"),
        ("J00=x", 24, r"J00='x' is not a number"),
        ("1", None, r"SD 3.x adapter has BASE then one value per joint block"),
    ],
)
def test_bad_sd3_specs_are_refused_in_one_line(spec, depth, match):
    with pytest.raises(SdloraError, match=match) as err:
        parse_blocks(spec, SD3, depth)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("spec", ["J00=0", "FIRST=0", "MIDDLE=1,EMBED=0", [1] * 25])
def test_sd3_names_on_a_unet_base_are_refused_naming_the_family(spec):
    with pytest.raises(SdloraError, match=r"SD 1.x adapter") as err:
        parse_blocks(spec, SD1)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("fuse", [True, False])
def test_a_joint_block_at_zero_equals_its_layers_removed(sd3, adapter, fuse):
    plain = run(sd3.transformer)
    zeroed = output(sd3, adapter, fuse, blocks="J00=0")
    kept = {k: f for k, f in adapter.modules.items() if "_transformer_blocks_0_" not in k}
    assert len(kept) < len(adapter.modules)
    by_hand = output(sd3, Adapter(kept, source="kept.safetensors"), fuse)
    assert (zeroed - plain).abs().max() > 1e-2  # the other blocks still change the output
    assert (zeroed - output(sd3, adapter, fuse)).abs().max() > 1e-3  # and J00 mattered
    torch.testing.assert_close(zeroed, by_hand, rtol=0, atol=1e-6)
    torch.testing.assert_close(run(sd3.transformer), plain, rtol=0, atol=1e-6)  # removed clean


@pytest.mark.parametrize("fuse", [True, False])
def test_thirds_equal_the_same_per_block_vector(sd3, adapter, fuse):
    # tiny-sd3 has 2 joint blocks: J00 is FIRST (with EMBED), J01 LAST (with FINAL)
    grouped = output(sd3, adapter, fuse, blocks="FIRST=0.3,MIDDLE=5,LAST=-0.6,TE=0")
    vector = output(sd3, adapter, fuse, blocks=[0, 0.3, -0.6])
    whole = output(sd3, adapter, fuse)
    assert (grouped - whole).abs().max() > 1e-3
    torch.testing.assert_close(grouped, vector, rtol=0, atol=1e-6)


def test_the_mixer_checks_the_base_block_count_and_family(sd3, adapter):
    mixer = Mixer(sd3)
    with pytest.raises(SdloraError, match=r"^a: block strengths: a vector for this SD 3.x base "):
        mixer.add(adapter, name="a", blocks=[1] * 25)  # SD3 Medium's length; tiny-sd3 has 2
    with pytest.raises(SdloraError, match=r"^a: .*SD 3.x adapter has no block 'OUT'"):
        mixer.add(adapter, name="a", blocks="OUT=0")
    assert not mixer.entries


def test_scale_blocks_counts_an_sd3_adapters_joint_blocks(adapter):
    scaled = scale_blocks(adapter, "LAST=0")
    for key, factors in scaled.modules.items():
        dropped = "_transformer_blocks_1_" in key or "_norm_out_" in key or key.endswith("proj_out")
        assert (
            factors.up.abs().max() == 0
            if dropped
            else torch.equal(factors.up, adapter.modules[key].up)
        )
    with pytest.raises(SdloraError, match=r"hand.safetensors: .* has 3 values"):
        scale_blocks(adapter, [1, 1])
