"""The LoRA layer: init changes nothing, fused == unfused, strength 0 == base, alpha algebra."""

import pytest
import torch
from torch import nn

from sdlora.errors import SdloraError
from sdlora.lora.layer import NONLINEARITIES, LoRALayer, LoRAWeights


def layer_with(base, nonlinearity="identity", scale=1.0, rank=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out_f, *rest = base.weight.shape
    down = torch.randn(rank, *rest, generator=g) * 0.3
    up = torch.randn(out_f, rank, *([1, 1] if base.weight.dim() == 4 else []), generator=g) * 0.3
    layer = LoRALayer(base)
    conv = layer.conv_args()
    layer.add("a", LoRAWeights(down, up, scale=scale, nonlinearity=nonlinearity, conv=conv))
    return layer, down, up


@pytest.mark.parametrize("nonlinearity", list(NONLINEARITIES))
def test_forward_matches_formula(nonlinearity):
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    layer, down, up = layer_with(base, nonlinearity, scale=0.75)
    x = torch.randn(5, 8)
    act = {
        "identity": lambda h: h,
        "relu": torch.relu,
        "leaky_relu": nn.functional.leaky_relu,
        "gelu": nn.functional.gelu,
        "silu": nn.functional.silu,
        "tanh": torch.tanh,
    }[nonlinearity]
    layer.strengths["a"] = 0.4
    expected = base(x) + 0.4 * 0.75 * act(x @ down.T) @ up.T
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize(
    "make_base", [lambda: nn.Linear(16, 12), lambda: nn.Conv2d(8, 12, 3, padding=1)]
)
def test_fused_equals_unfused(make_base):
    torch.manual_seed(0)
    base = make_base()
    layer, _, _ = layer_with(base, scale=1.7)
    x = torch.randn(2, 16) if isinstance(base, nn.Linear) else torch.randn(2, 8, 5, 5)
    layer.strengths["a"] = 0.6
    unfused = layer(x)
    base_out = base(x)
    assert (unfused - base_out).abs().max() > 1e-2  # the adapter does something
    layer.fuse({"a"})
    assert layer.fused == {"a"}
    torch.testing.assert_close(layer(x), unfused, atol=1e-5, rtol=0)


def test_unfuse_restores_w0_exactly():
    base = nn.Linear(16, 12)
    w0 = base.weight.detach().clone()
    layer, _, _ = layer_with(base)
    for s in torch.linspace(-2, 2, 50).tolist():
        layer.strengths["a"] = s
        layer.fuse({"a"})
    layer.fuse([])
    assert torch.equal(base.weight, w0)
    assert layer.pristine is None


def test_strength_zero_is_base():
    base = nn.Linear(16, 12)
    x = torch.randn(4, 16)
    layer, _, _ = layer_with(base, "gelu")
    layer.strengths["a"] = 0.0
    assert torch.equal(layer(x), base(x))


def test_nonlinear_has_no_delta():
    layer, _, _ = layer_with(nn.Linear(4, 4), "tanh")
    with pytest.raises(SdloraError, match="tanh"):
        layer.fuse({"a"})


def test_shape_mismatch_is_refused():
    layer = LoRALayer(nn.Linear(4, 4))
    with pytest.raises(SdloraError, match="does not fit"):
        layer.add("b", LoRAWeights(torch.zeros(2, 5), torch.zeros(4, 2)))


def test_unknown_nonlinearity():
    with pytest.raises(SdloraError, match="unknown nonlinearity 'swish'.*relu"):
        LoRAWeights(torch.zeros(2, 4), torch.zeros(4, 2), nonlinearity="swish")


def test_names_with_dots_and_module_attributes():
    layer = LoRALayer(nn.Linear(4, 4))
    for name in ("train", "style.v2", "to", "100%"):
        layer.add(name, LoRAWeights(torch.zeros(1, 4), torch.zeros(4, 1)))
    assert [n for n, _ in layer.items()] == ["train", "style.v2", "to", "100%"]


def test_alpha_equivalence_under_sgd():
    """../shared/references/lora-alpha-derivation.txt: alpha·k, lr/k, A-init/√k -> same losses."""
    n, m, rank = 4, 16, 2
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(m, n, generator=g), torch.randn(m, n, generator=g)
    base = nn.Linear(n, n, bias=False)
    down0 = torch.randn(rank, n, generator=g)
    up0 = torch.randn(n, rank, generator=g) * 0.1  # non-zero so A's gradient is non-zero too
    curves = []
    for k in (0.25, 1.0, 4.0, 16.0, 64.0):
        alpha = 2.0 * k
        lora = LoRAWeights(
            down0.clone() / k**0.5, up0.clone() / k**0.5, scale=alpha / rank, trainable=True
        )
        layer = LoRALayer(base)
        layer.add("a", lora)
        opt = torch.optim.SGD([lora.down, lora.up], lr=0.1 / k)
        losses = []
        for _ in range(6):
            opt.zero_grad()
            loss = nn.functional.l1_loss(layer(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    assert not torch.allclose(curves[0][0], curves[0][-1])  # it did learn
    for curve in curves[1:]:
        torch.testing.assert_close(curve, curves[0], rtol=1e-4, atol=1e-5)


def test_dropout_is_identity_at_zero_and_only_while_training():
    base = nn.Linear(8, 6)
    down, up = torch.randn(3, 8), torch.randn(6, 3)
    assert isinstance(LoRAWeights(down, up).dropout, nn.Identity)
    layer = LoRALayer(base)
    layer.add("a", LoRAWeights(down, up, dropout=0.5))
    x = torch.randn(64, 8)
    expected = base(x) + x @ down.T @ up.T
    layer.train()
    torch.manual_seed(0)
    dropped = layer(x)
    assert (dropped - expected).abs().max() > 1e-2  # some inputs were dropped (and rescaled)
    layer.eval()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
