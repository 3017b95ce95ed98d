"""Block swapping: frozen transformer blocks kept in CPU memory, copied in ahead of their use.

For GPUs too small for the base's weights beside a training step (kohya's `--blocks_to_swap`).
`BlockSwap(blocks, swapped, device)` takes a model's blocks in the order a forward pass runs them
and the indices of those to keep off the GPU. The frozen Linear/Conv2d weights of each swapped
block (LoRA layers' bases included, fp8 ones as stored) then live in pinned CPU memory; the GPU
holds at most two swapped blocks at a time:

- forward: when any block starts, the next swapped block is copied in on a side stream, so the
  copy overlaps the compute; a swapped block's copy is dropped as soon as its forward ends.
- backward: each swapped layer computes its input's gradient from the weight copied in again
  (autograd saves neither the weight nor the input: a frozen weight needs no gradient, and
  dL/dx = dL/dy · W needs no x); the first request of a block prefetches the swapped block the
  backward pass reaches next.

Gradient checkpointing composes (a recomputed forward fetches the weights again); torch.compile
does not (each swapped layer calls Python between kernels), so a run with swapped blocks runs its
UNet uncompiled. The schedule never decides what is computed, only when weights are copied: a
block that is needed and not resident is copied in on the spot, so results are those of
resident weights (tests/test_swap.py).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from sdlora.errors import SdloraError
from sdlora.lora.fp8 import dequantize, is_fp8

SWAPPABLE = (nn.Linear, nn.Conv2d)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks (diffusers' BasicTransformerBlock, SD3's
    JointTransformerBlock) in the order the forward pass runs them (registration order)."""
    from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock

    return [
        m for m in model.modules() if isinstance(m, BasicTransformerBlock | JointTransformerBlock)
    ]


def spread(count: int, swapped: int) -> list[int]:
    """`swapped` of `count` block indices, spread evenly, so that every copy has resident blocks
    before it to overlap with."""
    swapped = min(swapped, count)
    return sorted({min(count - 1, int((i + 0.5) * count / swapped)) for i in range(swapped)})


def frozen_layers(block: nn.Module) -> list[nn.Module]:
    """The Linear/Conv2d modules of `block` whose weight is frozen (LoRA bases, not factors)."""
    return [m for m in block.modules() if isinstance(m, SWAPPABLE) and not m.weight.requires_grad]


def block_bytes(block: nn.Module) -> int:
    """Bytes a swapped block keeps off the GPU: its frozen Linear/Conv2d weights."""
    return sum(m.weight.numel() * m.weight.element_size() for m in frozen_layers(block))


class BlockSwap:
    """Swapped blocks' weights in CPU memory, copied to `device` ahead of use (see the module).

    copy(tensor) -> the tensor on the compute device; None: a copy on a side stream from pinned
    memory on CUDA, `.to(device)` elsewhere. Tests pass their own to see every copy."""

    def __init__(
        self,
        blocks: list[nn.Module],
        swapped: list[int],
        device: torch.device,
        copy: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.device = torch.device(device)
        self.order = list(range(len(blocks)))
        self.swapped = sorted(set(swapped))
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.copy = copy or self._copy
        self.layers: dict[int, list[nn.Module]] = {}
        self.resident: dict[int, dict[int, torch.Tensor]] = {}  # block -> id(layer) -> weight
        self.events: dict[int, torch.cuda.Event] = {}
        self.prefetched: int | None = None
        self.copies = 0  # blocks copied in so far (tests and the log)
        self.most_resident = 0  # the most swapped blocks on the device at once
        self.hooks = []
        for i in self.swapped:
            self.layers[i] = frozen_layers(blocks[i])
            for layer in self.layers[i]:
                offload = layer.weight.detach().to("cpu")
                layer.weight.data = offload.pin_memory() if self.cuda else offload.clone()
                layer.forward = partial(swapped_forward, layer, self, i)
        for i, block in enumerate(blocks):
            self.hooks.append(block.register_forward_pre_hook(partial(self._before, i)))
            if i in self.layers:
                self.hooks.append(block.register_forward_hook(partial(self._after, i)))

    # --- copies ---
    def _copy(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return tensor.to(self.device)
        with torch.cuda.stream(self.stream):
            return tensor.to(self.device, non_blocking=True)

    def _load(self, i: int) -> None:
        """Start copying block i's weights to the device (nothing if it is there)."""
        if i in self.resident:
            return
        self.resident[i] = {id(layer): self.copy(layer.weight) for layer in self.layers[i]}
        if self.cuda:
            self.events[i] = torch.cuda.Event()
            self.events[i].record(self.stream)
        self.copies += 1
        self.most_resident = max(self.most_resident, len(self.resident))

    def _drop(self, i: int) -> None:
        self.resident.pop(i, None)
        self.events.pop(i, None)

    def _keep_only(self, *keep: int | None) -> None:
        for j in [j for j in self.resident if j not in keep]:
            self._drop(j)

    def acquire(self, i: int) -> None:
        """Block i resident and its copy finished as the current stream sees it."""
        if i not in self.resident:
            self._keep_only(self.prefetched)
            self._load(i)
        event = self.events.pop(i, None)
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for weight in self.resident[i].values():  # freed only once this stream is past them
                weight.record_stream(stream)
        if self.prefetched == i:
            self.prefetched = None

    def prefetch(self, i: int | None, current: int | None = None) -> None:
        """Start copying block i while `current` (and nothing else swapped) stays resident."""
        if i is None:
            return
        self._keep_only(i, current)
        self._load(i)
        self.prefetched = i

    def next_swapped(self, i: int, backward: bool) -> int | None:
        """The swapped block the pass reaches after block i (forward order or backward)."""
        later = [j for j in self.swapped if (j < i if backward else j > i)]
        return (later[-1] if backward else later[0]) if later else None

    def weight(self, i: int, layer: nn.Module, backward: bool) -> torch.Tensor:
        """Layer's weight on the device, in its compute dtype; in backward, the first request of
        a block also prefetches the next one backward reaches."""
        first = i not in self.resident or i in self.events
        self.acquire(i)
        if backward and first:
            self.prefetch(self.next_swapped(i, backward=True), current=i)
        weight = self.resident[i][id(layer)]
        if is_fp8(layer):
            return dequantize(weight, layer.weight_scale, layer.compute_dtype)
        return weight

    # --- forward hooks ---
    def _before(self, i: int, module, args) -> None:
        if i in self.layers:
            self.acquire(i)
        self.prefetch(self.next_swapped(i, backward=False), current=i if i in self.layers else None)

    def _after(self, i: int, module, args, output) -> None:
        self._drop(i)

    def remove(self) -> None:
        """Put every weight back on the device and the layers and hooks as they were."""
        for hook in self.hooks:
            hook.remove()
        for layers in self.layers.values():
            for layer in layers:
                layer.weight.data = layer.weight.data.to(self.device)
                del layer.forward
        self.resident.clear()
        self.events.clear()


class SwappedOp(torch.autograd.Function):
    """y = op(x, W) + b for a frozen W fetched from a BlockSwap in forward and again in backward."""

    @staticmethod
    def forward(ctx, x, layer, swap, block):
        ctx.layer, ctx.swap, ctx.block = layer, swap, block
        ctx.input_shape, ctx.input_dtype = x.shape, x.dtype
        weight = swap.weight(block, layer, backward=False)
        x = x.to(weight.dtype)  # the compute dtype, as autocast would give
        bias = None if layer.bias is None else layer.bias.to(weight.dtype)
        if isinstance(layer, nn.Linear):
            return F.linear(x, weight, bias)
        return layer._conv_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        layer = ctx.layer
        weight = ctx.swap.weight(ctx.block, layer, backward=True)
        grad = grad.to(weight.dtype)
        if isinstance(layer, nn.Linear):
            grad_x = grad @ weight  # (..., out) @ (out, in)
        else:
            grad_x = torch.nn.grad.conv2d_input(
                ctx.input_shape,
                weight,
                grad,
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                groups=layer.groups,
            )
        return grad_x.to(ctx.input_dtype), None, None, None


def swapped_forward(layer: nn.Module, swap: BlockSwap, block: int, x: torch.Tensor):
    """A swapped layer's forward (set on the instance by BlockSwap)."""
    with torch.autocast(x.device.type, enabled=False):
        return SwappedOp.apply(x, layer, swap, block)


def swap_blocks(model: nn.Module, count: int, device: torch.device, copy=None) -> BlockSwap | None:
    """Keep `count` of `model`'s transformer blocks (spread evenly) in CPU memory; None for 0."""
    if count <= 0:
        return None
    blocks = transformer_blocks(model)
    chosen = spread(len(blocks), count)
    for i in chosen:  # the swapped backward computes conv gradients with zero padding only
        for layer in blocks[i].modules():
            if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
                raise SdloraError(
                    f"cannot swap a block with a {layer.padding_mode}-padded convolution; "
                    "leave it at 0",
                    setting="blocks_to_swap",
                )
    return BlockSwap(blocks, chosen, device, copy)
