"""The stacked inference path: equal to the per-adapter formula, one pair of matmuls per layer,
rebuilt whenever what it was built from changes, and never used for adapters being trained."""

import pytest
import torch
from conftest import make_adapter_file, run_unet
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sdlora.bases.base import load_base
from sdlora.lora.blend import Mixer
from sdlora.lora.layer import NONLINEARITIES, LoRALayer, LoRAWeights, make_nonlinearity
from sdlora.lora.unfused import IN_PLACE, OUT_OF_PLACE

# (name, nonlinearity, rank, scale, strength): two relu adapters apart in the file order, so the
# stack has to reorder them to keep one relu run
ADAPTERS = [
    ("r1", "relu", 3, 0.5, 0.8),
    ("g", "gelu", 2, 1.0, -0.6),
    ("lin", "identity", 4, 2.0, 0.3),
    ("t", "tanh", 1, 1.5, 1.2),
    ("r2", "relu", 2, 1.0, 0.4),
    ("s", "silu", 3, 0.25, 1.0),
    ("l", "leaky_relu", 2, 1.0, 0.7),
]


def make_layer(base: nn.Module, adapters=ADAPTERS, seed: int = 0) -> LoRALayer:
    g = torch.Generator().manual_seed(seed)
    layer = LoRALayer(base)
    out_f, *rest = base.weight.shape
    ones = [1, 1] if base.weight.dim() == 4 else []
    for name, act, rank, scale, strength in adapters:
        down = torch.randn(rank, *rest, generator=g) * 0.3
        up = torch.randn(out_f, rank, *ones, generator=g) * 0.3  # non-zero: the test can fail
        weights = LoRAWeights(down, up, scale, act, conv=layer.conv_args())
        layer.add(name, weights, strength)
    return layer.eval()


def reference(layer: LoRALayer, x: torch.Tensor) -> torch.Tensor:
    """W0·x + Σ strength·s·B·σ(A·x), one adapter at a time in fp64."""
    base = layer.base
    conv = layer.conv_args()
    x = x.double()
    if conv is None:
        y = nn.functional.linear(x, base.weight.double(), base.bias.double())
    else:
        y = nn.functional.conv2d(x, base.weight.double(), base.bias.double(), **conv)
    for name, w in layer.items():
        strength = layer.strengths[name]
        if name in layer.fused or strength == 0.0:
            continue
        down, up = w.down.detach().double(), w.up.detach().double()
        if conv is None:
            h = make_nonlinearity(w.nonlinearity)(nn.functional.linear(x, down))
            y = y + strength * w.scale * nn.functional.linear(h, up)
        else:
            h = make_nonlinearity(w.nonlinearity)(nn.functional.conv2d(x, down, **conv))
            y = y + strength * w.scale * nn.functional.conv2d(h, up)
    return y


BASES = {
    "linear": (lambda: nn.Linear(16, 12), (2, 5, 16)),
    "conv": (lambda: nn.Conv2d(8, 12, 3, padding=1, stride=2), (2, 8, 7, 7)),
}


@pytest.fixture(params=list(BASES))
def layer_and_input(request):
    torch.manual_seed(0)
    make_base, shape = BASES[request.param]
    return make_layer(make_base()), torch.randn(*shape)


def test_stack_nonlinearities_equal_the_modules():
    assert set(IN_PLACE) == set(OUT_OF_PLACE) == set(NONLINEARITIES) - {"identity"}
    x = torch.randn(64) * 3
    for name, act in IN_PLACE.items():
        h = x.clone()
        act(h.narrow(0, 8, 40))  # on a slice, as the stack applies them
        expected = torch.cat([x[:8], make_nonlinearity(name)(x[8:48]), x[48:]])
        assert torch.equal(h, expected), name
        assert torch.equal(OUT_OF_PLACE[name](x), make_nonlinearity(name)(x)), name


def test_stack_equals_the_formula(layer_and_input):
    layer, x = layer_and_input
    with torch.inference_mode():
        y = layer(x)
    torch.testing.assert_close(y.double(), reference(layer, x), atol=1e-5, rtol=1e-5)
    stack = layer._stack
    assert sorted(stack.names) == sorted(n for n, *_ in ADAPTERS)
    assert stack.down.shape[0] == sum(rank for _, _, rank, _, _ in ADAPTERS)
    # adapters of one σ side by side: one call per nonlinearity, none for identity
    assert len(stack.runs) == len({act for _, act, *_ in ADAPTERS} - {"identity"})


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("count", [1, 4])
def test_one_pair_of_matmuls_however_many_adapters(count):
    adapters = [(f"a{i}", "relu", 2, 1.0, 0.5) for i in range(count)]
    for base, x in ((nn.Linear(16, 12), torch.randn(3, 16)), (nn.Conv2d(8, 12, 3), None)):
        layer = make_layer(base, adapters)
        x = torch.randn(2, 8, 6, 6) if x is None else x
        with torch.inference_mode():
            layer(x)  # builds the stack
            with CountOps() as counted:
                layer(x)
        products = [op for op in counted.ops if op in ("linear", "addmm_", "conv2d", "convolution")]
        assert len(products) == 3, counted.ops  # the base, the stacked down, the stacked up
        assert sum(op.startswith("relu") for op in counted.ops) == 1, counted.ops


def test_changes_rebuild_the_stack(layer_and_input):
    layer, x = layer_and_input

    def check():
        with torch.inference_mode():
            y = layer(x)
        torch.testing.assert_close(y.double(), reference(layer, x), atol=1e-5, rtol=1e-5)

    check()
    layer.strengths["g"] = 1.7  # the Mixer writes strengths directly
    check()
    layer.strengths["t"] = 0.0  # leaves the stack
    check()
    assert "t" not in layer._stack.names
    layer.fuse({"lin"})  # a fused linear adapter leaves it too, its ΔW now in the weight
    check()
    assert "lin" not in layer._stack.names
    layer.strengths["lin"] = -0.9  # the fused weight is the base's own: nothing to rebuild
    layer.fuse(layer.fused)
    check()
    with torch.no_grad():
        layer.get("s").down.mul_(2.0)  # factors changed in place (their version counter moves)
    check()
    layer.remove("r1")
    check()
    assert "r1" not in layer._stack.names
    for name in [n for n, _ in layer.items()]:
        layer.strengths[name] = 0.0
    check()
    assert layer._stack is None


def test_stack_follows_the_activations_dtype(layer_and_input):
    layer, x = layer_and_input
    with torch.inference_mode():
        y32 = layer(x)
        layer.to(torch.bfloat16)
        y16 = layer(x.bfloat16())
    assert layer._stack.down.dtype == torch.bfloat16
    # the factors are fp32 parameters cast to bf16 together with the base: bf16 tolerance
    torch.testing.assert_close(y16.float(), y32, atol=0.05, rtol=0.05)


def test_stack_built_in_inference_mode_serves_gradients_later():
    layer = make_layer(nn.Linear(16, 12))
    x = torch.randn(4, 16)
    with torch.inference_mode():
        layer(x)  # the stack is built here
    x.requires_grad_(True)
    y = layer(x)  # e.g. a later step that differentiates through the frozen adapters
    y.sum().backward()
    expected = torch.autograd.grad(reference(layer, x).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected, atol=1e-5, rtol=1e-5)


def test_trainable_adapters_stay_out_of_the_stack():
    torch.manual_seed(0)
    layer = make_layer(nn.Linear(16, 12), ADAPTERS[:2])
    g = torch.Generator().manual_seed(1)
    trained = LoRAWeights(
        torch.randn(3, 16, generator=g),
        torch.randn(12, 3, generator=g),
        0.5,
        "silu",
        trainable=True,
    )
    layer.add("train", trained, 0.9)
    x = torch.randn(4, 16)
    y = layer(x)
    assert layer._stack.names == ("g", "r1")  # sorted by nonlinearity; "train" runs in fp32
    torch.testing.assert_close(y.double(), reference(layer, x), atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert trained.down.grad is not None and trained.up.grad is not None
    assert all(w.down.grad is None for n, w in layer.items() if n != "train")


def test_dropout_of_a_frozen_adapter_is_drawn_while_training():
    layer = LoRALayer(nn.Linear(8, 6))
    layer.add(
        "a", LoRAWeights(torch.randn(3, 8), torch.randn(6, 3), nonlinearity="relu", dropout=0.5)
    )
    x = torch.randn(64, 8)
    layer.train()
    torch.manual_seed(0)
    dropped = layer(x)
    assert layer._stack is None  # ran one by one, with its dropout
    assert (dropped.double() - reference(layer, x)).abs().max() > 1e-2
    layer.eval()
    torch.testing.assert_close(layer(x).double(), reference(layer, x), atol=1e-5, rtol=1e-5)
    assert layer._stack.names == ("a",)


def test_mixer_stack_equals_one_adapter_at_a_time(tiny, inputs, tmp_path):
    """Two nonlinear adapters stacked beside a fused linear one, in the tiny UNet, against the
    same adapters run one by one (made trainable, which takes them out of the stack)."""
    mixer = Mixer(tiny)
    for i, (act, strength) in enumerate((("relu", 0.8), ("gelu", -0.5), ("identity", 0.6))):
        path, _ = make_adapter_file(
            lambda: load_base("tiny"), tmp_path / f"{act}.safetensors", nonlinearity=act, seed=i
        )
        mixer.add(path, strength=strength)
    layers = [m for m in tiny.unet.modules() if isinstance(m, LoRALayer)]

    def one_at_a_time() -> torch.Tensor:
        adapters = [w for layer in layers for _, w in layer.items()]
        for w in adapters:
            w.requires_grad_(True)
        try:
            return run_unet(tiny, inputs)
        finally:
            for w in adapters:
                w.requires_grad_(False)

    for relu in (0.8, 0.3):  # a strength change through the mixer rebuilds every stack
        mixer.set_strength("relu", relu)
        stacked = run_unet(tiny, inputs)
        assert all(layer._stack.names == ("gelu", "relu") for layer in layers)
        assert all(layer._stack.up.abs().max() > 0 for layer in layers)
        torch.testing.assert_close(stacked, one_at_a_time(), atol=1e-5, rtol=1e-5)
    assert (stacked - run_unet(load_base("tiny"), inputs)).abs().max() > 1e-3  # adapters act
