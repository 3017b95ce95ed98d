"""--base-precision fp8 (sdlora/lora/fp8.py): the storage round-trips within e4m3fn's rounding,
fp8 layers compute what their upcast weight gives, the LoRA layer wraps them unchanged, and
torch.compile traces them to the same numbers."""

from __future__ import annotations

import pytest
import torch
from conftest import run_unet
from torch import nn

from sdlora.lora.fp8 import (
    FP8_MAX,
    SCALINGS,
    Fp8Conv2d,
    Fp8Linear,
    dequantize,
    fp8_bytes,
    is_fp8,
    quantize,
    store_in_fp8,
)
from sdlora.lora.inject import UNET_TARGETS, add_trainable, target_names
from sdlora.lora.layer import LoRALayer

HALF_ULP = 2.0**-4  # e4m3fn: 3 mantissa bits, so rounding moves a normal number by ≤ 2**-4 of it
SUBNORMAL_HALF_STEP = 2.0**-10  # subnormals are spaced 2**-9 apart


def weights(*shape, seed=0) -> torch.Tensor:
    """SD-like weights: mostly 1e-3..1e-1, a few larger."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.02
    w.view(-1)[:3] = torch.tensor([0.9, -1.7, 3.0])
    return w


@pytest.mark.parametrize("scaling", SCALINGS)
def test_round_trip_is_within_one_rounding(scaling):
    w = weights(64, 48)
    q, scale = quantize(w, scaling)
    assert q.dtype == torch.float8_e4m3fn
    back = dequantize(q, scale, torch.float32)
    unit = torch.ones(()) if scale is None else scale.expand_as(w)
    bound = HALF_ULP * w.abs() + SUBNORMAL_HALF_STEP * unit
    assert ((back - w).abs() <= bound * (1 + 1e-6)).all()
    # and the scaled variants use the range: each row's (or the tensor's) largest |w| maps to 448
    if scaling == "channel":
        top = q.float().abs().amax(dim=1)
        torch.testing.assert_close(top, torch.full_like(top, FP8_MAX))


def test_per_channel_scaling_loses_least():
    """The default, a scale per output channel: the smallest relative error of the three."""
    w = weights(256, 128) * torch.logspace(-2, 0, 256).unsqueeze(1)  # rows of unlike sizes
    errors = {}
    for scaling in SCALINGS:
        back = dequantize(*quantize(w, scaling), torch.float32)
        errors[scaling] = float((back - w).norm() / w.norm())
    assert errors["channel"] < errors["tensor"] < errors["none"], errors
    assert errors["channel"] < 0.03, errors


def test_values_past_the_range_saturate_instead_of_becoming_nan():
    q, scale = quantize(torch.tensor([[1000.0, -1e6, 1.0]]), "none")
    assert torch.isfinite(q.float()).all() and float(q.float().abs().max()) == FP8_MAX


def test_fp8_layers_compute_with_their_upcast_weight():
    torch.manual_seed(0)
    linear, conv = nn.Linear(16, 8), nn.Conv2d(4, 6, 3, padding=1)
    model = nn.Sequential(linear, nn.Unflatten(1, (2, 2, 2)), nn.Flatten(), nn.Linear(8, 4))
    model.add_module("conv", conv)
    model.requires_grad_(False)
    assert store_in_fp8(model, compute_dtype=torch.float32) == 3
    assert type(linear) is Fp8Linear and type(conv) is Fp8Conv2d and is_fp8(linear)
    x = torch.randn(5, 16)
    expected = torch.nn.functional.linear(
        x, dequantize(linear.weight, linear.weight_scale, torch.float32), linear.bias
    )
    assert torch.equal(linear(x), expected)
    image = torch.randn(2, 4, 5, 5)
    expected = torch.nn.functional.conv2d(
        image, dequantize(conv.weight, conv.weight_scale, torch.float32), conv.bias, padding=1
    )
    assert torch.equal(conv(image), expected)


def test_trainable_and_subclassed_layers_are_left_alone():
    class Own(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4), Own(4, 4))
    model[0].weight.requires_grad_(True)
    model[1].requires_grad_(False)
    assert store_in_fp8(model) == 0
    assert model[0].weight.dtype == model[1].weight.dtype == torch.float32


def test_the_unet_in_fp8_halves_its_weights_and_predicts_close_to_bf16(tiny, inputs):
    """A tiny UNet: the fp8 weights take half the bytes of bf16 ones, and the noise prediction
    differs from the bf16 one by under 10 % (relative L2; random weights, so a bound, not the
    real figure, which docs/performance.md gives for pretrained weights)."""
    unet = tiny.unet.to(torch.bfloat16)
    linear = [m for m in unet.modules() if type(m) in (nn.Linear, nn.Conv2d)]
    bf16_bytes = sum(m.weight.numel() * 2 for m in linear)
    bf16 = run_unet(tiny, {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                           for k, v in inputs.items()}).float()  # fmt: skip
    assert store_in_fp8(unet) == len(linear)
    scales = sum(m.weight_scale.numel() * 4 for m in linear)
    assert fp8_bytes(unet) == bf16_bytes // 2 + scales
    fp8 = run_unet(tiny, {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                          for k, v in inputs.items()}).float()  # fmt: skip
    difference = float((fp8 - bf16).norm() / bf16.norm())
    assert 0 < difference < 0.1, difference


def lora_unet(tiny, before: bool):
    """The tiny UNet with a trainable rank-4 adapter (up made non-zero), stored in fp8 before or
    after the injection."""
    unet = tiny.unet
    if before:
        store_in_fp8(unet)
    injected = add_trainable(
        unet, "unet", target_names("attn", UNET_TARGETS), rank=4, name="training",
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    if not before:
        store_in_fp8(unet)
    with torch.no_grad():
        for w in injected.values():
            w.up.copy_(torch.randn(w.up.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    return unet, injected


def test_the_lora_layer_wraps_an_fp8_base_and_only_its_factors_learn(tiny, inputs):
    unet, injected = lora_unet(tiny, before=True)
    layers = [m for m in unet.modules() if isinstance(m, LoRALayer)]
    assert layers and all(is_fp8(layer.base) for layer in layers)
    layer = layers[0]
    x = torch.randn(3, layer.base.in_features)
    weights = layer.get("training")
    expected = layer.base(x) + weights(x)
    torch.testing.assert_close(layer(x), expected)
    out = unet(inputs["latents"], inputs["timesteps"], inputs["hidden"]).sample
    out.square().mean().backward()
    assert all(w.down.grad is not None and w.up.grad is not None for w in injected.values())
    assert all(m.weight.grad is None for m in unet.modules() if is_fp8(m))


def test_storing_before_or_after_the_injection_is_the_same(inputs):
    from sdlora.bases.base import load_base

    outs = []
    for before in (True, False):
        unet, _ = lora_unet(load_base("tiny"), before)
        with torch.no_grad():
            outs.append(unet(inputs["latents"], inputs["timesteps"], inputs["hidden"]).sample)
    assert torch.equal(outs[0], outs[1])


def test_torch_compile_traces_an_fp8_layer_with_its_lora_to_the_same_numbers():
    torch.manual_seed(0)
    base = nn.Linear(32, 16).requires_grad_(False)
    store_in_fp8(base)
    layer = LoRALayer(base)
    from sdlora.lora.layer import LoRAWeights

    layer.add("training", LoRAWeights(torch.randn(4, 32) * 0.1, torch.randn(16, 4) * 0.1,
                                      trainable=True))  # fmt: skip
    x = torch.randn(8, 32)
    eager = layer(x)
    eager.sum().backward()
    grads = [p.grad.clone() for p in layer.get("training").parameters()]
    for p in layer.get("training").parameters():
        p.grad = None
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    for p, g in zip(layer.get("training").parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_a_dtype_cast_keeps_the_8_bit_storage_and_changes_the_compute_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.Conv2d(2, 4, 3)).requires_grad_(False)
    store_in_fp8(model)
    linear = model[0]
    stored, scale = linear.weight.detach().clone(), linear.weight_scale.clone()
    x = torch.randn(3, 16)
    before = linear(x)
    model.to(torch.bfloat16)
    assert linear.weight.dtype == torch.float8_e4m3fn and torch.equal(linear.weight, stored)
    assert linear.weight_scale.dtype == torch.float32 and torch.equal(linear.weight_scale, scale)
    assert linear.compute_dtype == torch.bfloat16 and linear.bias.dtype == torch.bfloat16
    after = linear(x.to(torch.bfloat16))
    assert after.dtype == torch.bfloat16
    torch.testing.assert_close(after.float(), before, rtol=2e-2, atol=2e-2)
    model.to(memory_format=torch.channels_last)  # a layout change is not a cast
    assert model[1].weight.dtype == torch.float8_e4m3fn
    assert model[1].weight.is_contiguous(memory_format=torch.channels_last)
