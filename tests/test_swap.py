"""--blocks-to-swap (train/swap.py): swapped blocks give the same step as resident ones, and the
schedule keeps at most two swapped blocks on the compute device, each copied in before its use.

The compute device here is the CPU too, so a "copy to the device" is a clone the test can watch
(`Copies`): what is checked is the mechanism (which weights each layer computes with, when they
are copied in and dropped), which is the same whatever the devices are."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sdlora.lora.fp8 import store_in_fp8
from sdlora.lora.inject import UNET_TARGETS, add_trainable, target_names
from sdlora.lora.layer import LoRALayer, LoRAWeights
from sdlora.train.swap import BlockSwap, spread, swap_blocks, transformer_blocks


class Block(nn.Module):
    """A transformer-like block: a LoRA-wrapped Linear, a 3x3 convolution and a plain Linear."""

    def __init__(self, width: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = LoRALayer(nn.Linear(width, width))
        self.proj.add(
            "training",
            LoRAWeights(
                torch.randn(2, width, generator=g) * 0.3,
                torch.randn(width, 2, generator=g) * 0.3,
                trainable=True,
            ),
        )
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.out = nn.Linear(width, width)
        for m in (self.proj.base, self.conv, self.out):
            m.requires_grad_(False)

    def forward(self, x):
        h = torch.tanh(self.proj(x))
        h = h + self.conv(h.unsqueeze(1)).squeeze(1)
        return x + self.out(h)


class Copies:
    """A stand-in for the copy to the compute device: clones, and logs which block each is."""

    def __init__(self, log: list):
        self.log = log
        self.owner: dict[int, int] = {}  # id(offloaded weight) -> block

    def __call__(self, tensor):
        self.log.append(("copy", self.owner[id(tensor)]))
        return tensor.clone()


def collapse(log: list) -> list:
    """The log with repeats in a row made one (a block's layers are copied one after another)."""
    return [e for i, e in enumerate(log) if i == 0 or log[i - 1] != e]


def model(blocks: int = 6, width: int = 8) -> nn.Sequential:
    """The same blocks at every call (seeded)."""
    torch.manual_seed(0)
    return nn.Sequential(*[Block(width, seed=i) for i in range(blocks)])


def step(net: nn.Sequential, x: torch.Tensor, checkpointed: bool = False):
    """Output, input gradient and the LoRA factors' gradients of one forward/backward."""
    x = x.clone().requires_grad_(True)
    h = x
    for block in net:
        h = checkpoint(block, h, use_reentrant=False) if checkpointed else block(h)
    loss = h.square().mean()
    loss.backward()
    factors = [p.grad.clone() for p in net.parameters() if p.requires_grad]
    net.zero_grad(set_to_none=True)
    return h.detach(), x.grad, factors


def swapped(net: nn.Sequential, indices: list[int], log: list) -> BlockSwap:
    copies = Copies(log)
    swap = BlockSwap(list(net), indices, torch.device("cpu"), copy=copies)
    for i in indices:
        for layer in swap.layers[i]:
            copies.owner[id(layer.weight)] = i
    for i, block in enumerate(net):
        block.register_forward_pre_hook(lambda m, a, i=i: log.append(("run", i)))
    return swap


@pytest.mark.parametrize("checkpointed", [False, True])
def test_swapped_blocks_give_the_same_step_as_resident_ones(checkpointed):
    x = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(9))
    resident = step(model(), x, checkpointed)
    net = model()
    log: list = []
    swap = swapped(net, [1, 3, 4], log)
    for _ in range(2):  # twice: what the first step leaves resident must not change the second
        got = step(net, x, checkpointed)
        torch.testing.assert_close(got[0], resident[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[1], resident[1], rtol=1e-6, atol=1e-6)
        for g, r in zip(got[2], resident[2], strict=True):
            torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)
    assert swap.most_resident <= 2


def test_layers_compute_with_the_copy_and_never_the_offloaded_weight():
    """NaN in the offloaded weights, the true values only in the copies: a layer that read its
    offloaded weight instead of the copy would give NaN."""
    x = torch.randn(2, 3, 8)
    expected = step(model(3), x)
    net = model(3)
    true_values: dict[int, torch.Tensor] = {}
    swap = BlockSwap(
        list(net), [0, 1, 2], torch.device("cpu"), copy=lambda t: true_values[id(t)].clone()
    )
    for layers in swap.layers.values():
        for layer in layers:
            true_values[id(layer.weight)] = layer.weight.detach().clone()
            layer.weight.data.fill_(float("nan"))
    got = step(net, x)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-6, atol=1e-6)


def test_each_swapped_block_is_copied_in_before_it_runs_and_at_most_two_are_resident():
    net = model(6)
    log: list = []
    swap = swapped(net, [1, 3, 4], log)
    x = torch.randn(2, 3, 8)
    h = x.requires_grad_(True)
    for block in net:
        h = block(h)
        assert len(swap.resident) <= 2
    forward = collapse(log)
    # each swapped block is copied in as the swapped block before it starts (the first: as the
    # pass starts), so its copy overlaps the compute of every block in between
    assert forward == [
        ("copy", 1), ("run", 0), ("copy", 3), ("run", 1), ("run", 2), ("copy", 4), ("run", 3),
        ("run", 4), ("run", 5),
    ]  # fmt: skip
    assert len(swap.resident) <= 1  # after the forward pass: only what was prefetched
    log.clear()
    h.square().mean().backward()
    backward_copies = [e[1] for e in collapse(log) if e[0] == "copy"]
    assert backward_copies == [4, 3, 1]  # each once, in the order backward reaches them
    assert swap.most_resident <= 2


def test_offloaded_weights_live_on_the_offload_device_and_remove_restores_them():
    net = model(4)
    before = [p.detach().clone() for p in net.parameters()]
    swap = BlockSwap(list(net), [0, 2], torch.device("cpu"), copy=lambda t: t.clone())
    offloaded = [layer.weight for i in (0, 2) for layer in swap.layers[i]]
    assert offloaded and all(w.device.type == "cpu" for w in offloaded)
    assert all("forward" in vars(layer) for i in (0, 2) for layer in swap.layers[i])
    swap.remove()
    assert not any("forward" in vars(m) for m in net.modules())
    for p, b in zip(net.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_spread_picks_distinct_blocks_evenly():
    assert spread(70, 1) == [35]
    assert spread(10, 5) == [1, 3, 5, 7, 9]
    assert spread(4, 4) == [0, 1, 2, 3]
    assert spread(4, 9) == [0, 1, 2, 3]
    assert len(spread(70, 44)) == 44


@pytest.mark.parametrize("fp8", [False, True])
def test_a_unet_with_swapped_blocks_trains_the_same_step(inputs, fp8):
    """The tiny UNet's transformer blocks (LoRA on attention, fp8 bases or not): swapped or
    resident, the same prediction and the same LoRA gradients."""
    from sdlora.bases.base import load_base

    def unet_with_lora():
        unet = load_base("tiny").unet
        if fp8:
            store_in_fp8(unet)
        injected = add_trainable(
            unet, "unet", target_names("attn", UNET_TARGETS), rank=4, name="training",
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        with torch.no_grad():
            for w in injected.values():
                w.up.normal_(generator=torch.Generator().manual_seed(1))
        return unet, injected

    def run(unet, injected):
        pred = unet(inputs["latents"], inputs["timesteps"], inputs["hidden"]).sample
        pred.square().mean().backward()
        return pred.detach(), {k: (w.down.grad, w.up.grad) for k, w in injected.items()}

    resident = run(*unet_with_lora())
    unet, injected = unet_with_lora()
    blocks = transformer_blocks(unet)
    assert len(blocks) >= 2
    swap = swap_blocks(unet, 2, torch.device("cpu"), copy=lambda t: t.clone())
    assert len(swap.swapped) == 2
    got = run(unet, injected)
    torch.testing.assert_close(got[0], resident[0], rtol=1e-5, atol=1e-6)
    for key, (down, up) in resident[1].items():
        torch.testing.assert_close(got[1][key][0], down, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[1][key][1], up, rtol=1e-5, atol=1e-7)


def test_training_with_swapped_blocks_writes_the_same_adapter(tmp_path):
    """Two steps of `sdlora train` on the toy base, 2 blocks swapped or none: the same factors."""
    from sdlora.io.files import read_safetensors
    from sdlora.train.config import TrainConfig
    from sdlora.train.loop import train

    samples = Path(__file__).resolve().parents[1] / "samples"
    adapters = []
    for swapped_blocks in (0, 2):
        config = TrainConfig(
            data_dir=str(samples / "style"), output=str(tmp_path / str(swapped_blocks)),
            base="toy", resolution=64, batch_size=2, steps=2, save_every=0, compile="off",
            tensorboard=False, workers=0, seed=1, blocks_to_swap=swapped_blocks,
        )  # fmt: skip
        adapters.append(read_safetensors(train(config))[0])
    assert adapters[0].keys() == adapters[1].keys()
    for key, value in adapters[0].items():
        torch.testing.assert_close(adapters[1][key], value, rtol=1e-5, atol=1e-7)
