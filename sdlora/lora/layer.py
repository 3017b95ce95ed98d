"""The LoRA layer: y = W0·x + Σ strength_i · s_i · B_i · σ_i(A_i · x).

`LoRAWeights` holds one adapter's factors at one layer (A = `down`, B = `up`, training scale
s = alpha / rank, σ = the nonlinearity). `LoRALayer` wraps a frozen base Linear or Conv2d (keeping
a reference to it, never a copy) and holds any number of named adapters, each with its own
strength. Linear adapters (σ = identity) can be fused into the base weight: the fused weight is
always rebuilt from a pristine copy of W0 in fp32, so any number of strength changes gives the
same weights as one fresh fuse. Adapters that stay unfused and are frozen (generation) run
stacked, all of a layer's in one pair of matmuls (sdlora/lora/unfused.py); trainable ones run one by
one in fp32 with their gradients.

DoRA adapters (a `magnitude` m, sdlora/lora/dora.py) add strength · (W_dora − W0) instead of
strength · ΔW: fused, that delta is computed once from the pristine W0; unfused, it runs as
PEFT's forward does, (f − 1)·W0·x + f·ΔW·x with f = m / ‖W0 + ΔW‖ per output row (the input
side's f scales x instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdlora.errors import SdloraError
from sdlora.lora.dora import INPUT, axis_of, direction_scale
from sdlora.lora.dora import dora_delta as decomposed_delta
from sdlora.lora.fusion import Plan
from sdlora.lora.fusion import merged_weight as fused_weight
from sdlora.lora.unfused import Stack, build

# Element-wise nonlinearities allowed between down and up.
NONLINEARITIES: dict[str, type[nn.Module] | None] = {
    "identity": None,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,  # negative slope 0.01
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}

# σ(c·x) = c·σ(x) for c > 0: a positive scale can move from the output side into A exactly.
POSITIVELY_HOMOGENEOUS = {"identity", "relu", "leaky_relu"}


def check_nonlinearity(name: str) -> str:
    """Return `name` if it is a known nonlinearity, else raise listing the choices."""
    if name not in NONLINEARITIES:
        raise SdloraError(
            f"unknown nonlinearity {name!r}; choose one of: {', '.join(NONLINEARITIES)}"
        )
    return name


def make_nonlinearity(name: str) -> nn.Module:
    cls = NONLINEARITIES[check_nonlinearity(name)]
    return nn.Identity() if cls is None else cls()


def max_rank(base: nn.Module) -> int:
    """The largest rank a LoRA on `base` can have: min(in, out) of its weight as a matrix."""
    out_features = base.weight.shape[0]
    in_features = base.weight[0].numel()
    return min(out_features, in_features)


class LoRAWeights(nn.Module):
    """One adapter's factors at one layer.

    Linear base: down (r, in), up (out, r).  Conv2d base: down (r, in, kh, kw) applied with the
    base's stride/padding/dilation, up (out, r, 1, 1). DoRA: `magnitude` m shaped to broadcast on
    the base weight, (out, 1[, 1, 1]) per output row or (1, in[, 1, 1]) per input column.
    """

    def __init__(
        self,
        down: torch.Tensor,
        up: torch.Tensor,
        scale: float = 1.0,
        nonlinearity: str = "identity",
        dropout: float = 0.0,
        conv: dict | None = None,
        trainable: bool = False,
        magnitude: torch.Tensor | None = None,
    ):
        super().__init__()
        self.down = nn.Parameter(down, requires_grad=trainable)
        self.up = nn.Parameter(up, requires_grad=trainable)
        self.magnitude = None if magnitude is None else nn.Parameter(magnitude, trainable)
        self.scale = float(scale)
        self.nonlinearity = check_nonlinearity(nonlinearity)
        if magnitude is not None and nonlinearity != "identity":
            raise SdloraError(
                f"DoRA needs a weight delta to renormalise; an adapter with nonlinearity "
                f"{nonlinearity!r} has none"
            )
        self.act = make_nonlinearity(nonlinearity)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv = conv  # None for Linear; stride/padding/dilation of the base Conv2d

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def is_linear(self) -> bool:
        """True when the adapter is a weight delta (plain or DoRA), so it can be fused."""
        return self.nonlinearity == "identity"

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    def params(self) -> list[nn.Parameter]:
        """The factors (and DoRA's magnitude): what an optimizer trains and a checkpoint keeps."""
        return [self.down, self.up] + ([self.magnitude] if self.is_dora else [])

    def dora_delta(self, w0: torch.Tensor) -> torch.Tensor:
        """W_dora − W0 = m·(W0 + ΔW)/‖W0 + ΔW‖ − W0 in fp32 (sdlora/lora/dora.py); DoRA only."""
        delta = self.delta_weight().to(w0.device)
        return decomposed_delta(w0, delta, self.magnitude.detach().to(w0.device))

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B · A in fp32, shaped like the base weight. Only for linear adapters (DoRA's
        change from the base is `dora_delta`)."""
        if not self.is_linear:
            raise SdloraError(
                f"an adapter with nonlinearity {self.nonlinearity!r} has no weight delta; "
                "it can only run unfused"
            )
        down = self.down.detach().float()
        up = self.up.detach().float().reshape(self.up.shape[0], -1)  # (out, r)
        delta = up @ down.reshape(down.shape[0], -1)  # (out, in·kh·kw)
        return (self.scale * delta).reshape(up.shape[0], *down.shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """s · B · σ(A · x), in the factors' dtype."""
        return self._lowrank(self.dropout(x.to(self.down.dtype)))

    def _lowrank(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            h = F.linear(x, self.down)
            return self.scale * F.linear(self.act(h), self.up)
        h = F.conv2d(x, self.down, **self.conv)
        return self.scale * F.conv2d(self.act(h), self.up)

    def dora_forward(self, x: torch.Tensor, w0: torch.Tensor, w0x: torch.Tensor | None):
        """(W_dora − W0)·x, as PEFT's DoRA forward computes it, in the factors' dtype.

        `w0`: the pristine base weight; `w0x`: W0·x without bias, when the caller has it. The
        norm ‖W0 + ΔW‖ is detached (paper section 4.3, PEFT): m and the factors learn through
        f = m / ‖W0 + ΔW‖ and ΔW·x. Output rows: (f − 1)·W0·x + f·ΔW·x. Input columns: W_dora·x
        = (W0 + ΔW)·(f ⊙ x), so W0·((f − 1) ⊙ x) + ΔW·(f ⊙ x).
        """
        w0 = w0.to(self.down.dtype)
        up = self.up.reshape(self.up.shape[0], -1)
        delta = (self.scale * (up @ self.down.reshape(self.rank, -1))).reshape(w0.shape)
        f = direction_scale(w0, delta.detach(), self.magnitude)  # m / ‖W0 + ΔW‖, ‖·‖ detached
        x = x.to(self.down.dtype)
        dropped = self.dropout(x)  # dropout on the low-rank path only, as PEFT
        if axis_of(self.magnitude) == INPUT:
            g = f.reshape(-1) if self.conv is None else f  # (in,) or (1, in, 1, 1)
            return self._base(x * (g - 1), w0) + self._lowrank(dropped * g)
        g = f.reshape(-1) if self.conv is None else f.reshape(1, -1, 1, 1)  # (out,) / (1,out,1,1)
        w0x = self._base(x, w0) if w0x is None else w0x.to(x.dtype)
        return (g - 1) * w0x + g * self._lowrank(dropped)

    def _base(self, x: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
        """W0·x without bias, with the base's convolution settings."""
        return F.linear(x, w0) if self.conv is None else F.conv2d(x, w0, **self.conv)

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.params())

    @property
    def stackable(self) -> bool:
        """True when it can run in a layer's inference stack: frozen, plain (not DoRA), and no
        dropout to draw."""
        return (
            self.frozen
            and not self.is_dora
            and not (self.training and isinstance(self.dropout, nn.Dropout))
        )


def _key(name: str) -> str:
    """Adapter name -> ModuleDict key (no dots, no clash with nn.Module attributes)."""
    return "~" + name.replace("%", "%25").replace(".", "%2E")


def _name(key: str) -> str:
    return key[1:].replace("%2E", ".").replace("%25", "%")


class LoRALayer(nn.Module):
    """A frozen base Linear/Conv2d plus named adapters, each with a strength."""

    def __init__(self, base: nn.Linear | nn.Conv2d):
        super().__init__()
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise SdloraError("LoRA on grouped convolutions is not supported")
        self.base = base
        self.adapters = nn.ModuleDict()
        self.strengths: dict[str, float] = {}
        self.fused: set[str] = set()  # adapters whose ΔW is in base.weight right now
        self.pristine: torch.Tensor | None = None  # W0, kept once anything is fused
        self._weights: dict[str, LoRAWeights] = {}  # name -> adapter, without the key mangling
        self._stack: Stack | None = None  # the frozen unfused adapters, see unfused_adapters

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (models that read `.weight` of their Linears, T5's `wo`)."""
        return self.base.weight

    def conv_args(self) -> dict | None:
        if isinstance(self.base, nn.Conv2d):
            return dict(
                stride=self.base.stride, padding=self.base.padding, dilation=self.base.dilation
            )
        return None

    def add(self, name: str, weights: LoRAWeights, strength: float = 1.0) -> None:
        """Attach an adapter's factors under `name` (replacing any with that name)."""
        expected = tuple(self.base.weight.shape)
        got_in = (weights.down.shape[0], *expected[1:])
        if tuple(weights.down.shape) != got_in or weights.up.shape[0] != expected[0]:
            raise SdloraError(
                f"adapter {name!r} does not fit this layer: weight {list(expected)}, "
                f"down {list(weights.down.shape)}, up {list(weights.up.shape)}"
            )
        if weights.is_dora:
            axis = axis_of(weights.magnitude)
            size = expected[0] if axis != INPUT else expected[1]
            if tuple(weights.magnitude.shape) != (
                (size, *[1] * (len(expected) - 1))
                if axis != INPUT
                else (1, size, *[1] * (len(expected) - 2))
            ):
                raise SdloraError(
                    f"adapter {name!r}: its DoRA magnitude {list(weights.magnitude.shape)} does "
                    f"not fit the weight {list(expected)}"
                )
        if _key(name) in self.adapters:
            self.remove(name)
        self.adapters[_key(name)] = weights
        self._weights[name] = weights
        self.strengths[name] = float(strength)
        self._stack = None

    def get(self, name: str) -> LoRAWeights:
        return self.adapters[_key(name)]

    def items(self) -> list[tuple[str, LoRAWeights]]:
        """(adapter name, its weights here), in the order they were added."""
        return [(_name(k), w) for k, w in self.adapters.items()]

    def remove(self, name: str, refuse: bool = True) -> None:
        """Detach adapter `name`; if it was fused, rebuild the weight (unless `refuse` is False)."""
        was_fused = name in self.fused
        self.fused.discard(name)
        del self.adapters[_key(name)]
        del self._weights[name]
        del self.strengths[name]
        self._stack = None
        if was_fused and refuse:
            self.fuse(self.fused)

    def fuse(self, names: list[str] | set[str]) -> None:
        """Make base.weight = W0 + Σ strength·ΔW over `names` (linear adapters), from pristine W0."""
        names = set(names)
        for name in names:
            if not self.get(name).is_linear:
                raise SdloraError(
                    f"adapter {name!r} has nonlinearity {self.get(name).nonlinearity!r} and "
                    "cannot be fused; it can only run unfused"
                )
        self.fused = names
        Plan([self]).apply()

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W0 + Σ strength·ΔW over every linear adapter, fused or not, computed from W0 in fp32
        (a DoRA adapter's ΔW being W_dora − W0)."""
        names = [n for n, w in self.items() if w.is_linear and self.strengths[n] != 0.0]
        w0 = self.pristine if self.pristine is not None else self.base.weight
        return fused_weight(self, names, dtype or w0.dtype)

    def unfused_adapters(
        self, dtype: torch.dtype, device: torch.device
    ) -> tuple[Stack | None, list[tuple[str, float, LoRAWeights]]]:
        """(stack of the stackable adapters, the others as (name, strength, weights)).

        Only adapters that are neither fused nor at strength 0 count. The stack is kept until a
        strength, the fused set, an adapter or its factors, the dtype or the device change.
        """
        stacked, others, state = [], [], [dtype, device]
        for name, weights in self._weights.items():
            strength = self.strengths[name]
            if name in self.fused or strength == 0.0:
                continue
            if weights.stackable:
                stacked.append((name, strength, weights))
                state.append((name, strength, weights.down._version, weights.up._version))
            else:
                others.append((name, strength, weights))
        key = tuple(state)
        if not stacked:
            self._stack = None
        elif self._stack is None or self._stack.key != key:
            self._stack = build(key, stacked, dtype)
        return self._stack, others

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if len(self.fused) == len(self.adapters):
            return y  # everything is in the weight
        stack, others = self.unfused_adapters(y.dtype, y.device)
        w0x = self._w0x(y) if any(w.is_dora for _, _, w in others) else None
        if stack is not None:  # frozen: factors cached in the activations' dtype
            y = stack.add_to(y, x if x.dtype is y.dtype else x.to(y.dtype))
        for _, strength, weights in others:  # training: fp32 factors with gradients
            if weights.is_dora:
                w0 = self.pristine if self.pristine is not None else self.base.weight.detach()
                change = weights.dora_forward(x, w0, w0x)
            else:
                change = weights(x)
            y = y + (strength * change).to(y.dtype)
        return y

    def _w0x(self, y: torch.Tensor) -> torch.Tensor | None:
        """W0·x without bias from the base's output `y`, while the weight is W0 (nothing fused);
        a copy, since the stack adds into `y` in place."""
        if self.pristine is not None:
            return None
        bias = self.base.bias
        if bias is None:
            return y.clone()
        return y - (bias if isinstance(self.base, nn.Linear) else bias[:, None, None])
