"""Exact full differences of parameters that no factors hold: biases and norm weights.

ComfyUI's trainer and its extract node write `<module>.diff_b` (a bias difference) and, for norm
layers, a 1-D `<module>.diff` (a weight difference); an `Adapter` holds them in `diffs`
("<flat key>.weight" / ".bias" -> ΔP). On a pipeline a parameter P with differences ΔP_i from
adapters at strengths s_i holds P0 + Σ s_i·ΔP_i, rebuilt from the pristine P0 in fp32 on every
change (as fused weights are, fusion.py): any number of strength changes equals one fresh
application, and at strength 0 or once every adapter is gone P0 is back bit for bit. The value is
written into the parameter itself, so fused and unfused runs and exported checkpoints see it alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sdlora.errors import SdloraError
from sdlora.io.ldm_names import original_module_paths
from sdlora.lora.adapter import Adapter, _canonical, _suffix, component_of

Key = tuple[str, str, str]  # (component, module path, "weight" | "bias")


def module_lookup(model: nn.Module, component: str) -> dict[str, str]:
    """Flat-name suffix -> module path for every module of `model` (a LoRALayer's path, not its
    `.base`), by diffusers' names and, for a UNet, the original ones too."""
    paths = [p for p, _ in model.named_modules() if p and not p.endswith(".base")]
    found = {_canonical(component, p): p for p in paths}
    config = getattr(model, "config", None)
    if component == "unet" and config is not None and "down_block_types" in config:
        for path, original in original_module_paths(config, paths).items():
            found.setdefault(_canonical(component, original), path)
    return found


def parameter(model: nn.Module, path: str, kind: str) -> torch.Tensor | None:
    """The `weight` or `bias` of the module at `path` (of the base under a LoRALayer)."""
    module = model.get_submodule(path)
    module = getattr(module, "base", module)
    return getattr(module, kind, None)


def resolve_diffs(adapter: Adapter, models: dict[str, nn.Module]) -> dict[Key, torch.Tensor]:
    """The adapter's parameter differences by (component, module path, kind), checked against
    the base's shapes; a difference for a parameter the base lacks is refused in one line."""
    lookups: dict[str, dict[str, str]] = {}
    found: dict[Key, torch.Tensor] = {}
    for name, delta in adapter.diffs.items():
        key, _, kind = name.rpartition(".")
        comp = component_of(key)
        if comp in models and comp not in lookups:
            lookups[comp] = module_lookup(models[comp], comp)
        path = lookups[comp].get(_suffix(comp, key)) if comp in lookups else None
        target = parameter(models[comp], path, kind) if path is not None else None
        if target is None:
            raise SdloraError(
                f"{adapter.source}: {name} (a {kind} difference) names no {kind} in this base; "
                "was it made for another base model?"
            )
        if tuple(target.shape) != tuple(delta.shape):
            raise SdloraError(
                f"{adapter.source}: {name} has shape {list(delta.shape)}, the base's {kind} "
                f"{list(target.shape)}; was it made for another base model?"
            )
        found[(comp, path, kind)] = delta
    return found


class Offsets:
    """The parameter differences of the adapters on one pipeline, by adapter name."""

    def __init__(self, models: Callable[[], dict[str, nn.Module]]):
        self._models = models
        self.deltas: dict[str, dict[Key, torch.Tensor]] = {}  # name -> key -> ΔP (fp32)
        self.strengths: dict[str, dict[Key, float]] = {}  # name -> key -> strength there
        self.pristine: dict[Key, torch.Tensor] = {}  # P0 of every parameter with a difference

    def add(self, name: str, deltas: dict[Key, torch.Tensor]) -> None:
        """Register adapter `name`'s differences, at strength 0 until `prepare` sets one."""
        models = self._models()
        for key in deltas:
            if key not in self.pristine:
                self.pristine[key] = self._param(models, key).detach().clone()
        self.deltas[name] = {k: d.detach().float() for k, d in deltas.items()}
        self.strengths[name] = dict.fromkeys(deltas, 0.0)

    def _param(self, models: dict[str, nn.Module], key: Key) -> torch.Tensor:
        comp, path, kind = key
        return parameter(models[comp], path, kind)

    def _values(self, keys, held: dict[str, dict[Key, float]]) -> dict[Key, torch.Tensor]:
        """P0 + Σ s·ΔP in fp32, cast back, for `keys`; strengths from `held` where it names the
        adapter, else those held now. P0 itself (bit for bit) where no strength is set."""
        values = {}
        for key in keys:
            p0 = self.pristine[key]
            total, active = p0.float(), False
            for other, deltas in self.deltas.items():
                s = held.get(other, self.strengths[other]).get(key, 0.0)
                if key in deltas and s != 0.0:
                    total, active = total + s * deltas[key].to(p0.device), True
            values[key] = total.to(p0.dtype) if active else p0
        return values

    def prepare(self, name: str, strength: Callable[[Key], float]) -> Callable[[], None]:
        """Compute the parameters with adapter `name` at `strength(key)`; refuse non-finite
        values before anything is written. Returns the write, to run once the weights are."""
        if name not in self.deltas:
            return lambda: None
        strengths = {key: float(strength(key)) for key in self.deltas[name]}
        values = self._values(strengths, {name: strengths})
        bad = [key for key, value in values.items() if not torch.isfinite(value).all()]
        if bad:
            raise SdloraError(
                f"{name} at this strength gives non-finite values in {bad[0][1]}.{bad[0][2]}; "
                "lower the strength or check the adapter file"
            )

        def write() -> None:
            self.strengths[name] = strengths
            self._write(values)

        return write

    def _write(self, values: dict[Key, torch.Tensor]) -> None:
        models = self._models()
        with torch.no_grad():
            for key, value in values.items():
                self._param(models, key).copy_(value)

    def remove(self, name: str) -> None:
        """Drop adapter `name`'s differences; parameters no adapter changes get P0 back."""
        deltas = self.deltas.pop(name, {})
        self.strengths.pop(name, None)
        self._write(self._values(deltas, {}))
        for key in deltas:
            if not any(key in d for d in self.deltas.values()):
                del self.pristine[key]
