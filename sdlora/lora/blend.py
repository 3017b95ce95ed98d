"""Blending: several adapters on one pipeline, each with a strength, exact and instant.

A strength change rebuilds the fused weights of that adapter's layers from the pristine W0 in fp32,
batched over layers of one shape (`fusion.Plan`, kept until what is fused where changes): no file
is read again, no module rebuilt, one host sync, and after any number of changes the weights equal
one fresh fuse. Linear adapters are fused (no per-step cost); nonlinear ones run unfused inside the
layers with their factors cached in the activations' dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from sdlora.bases.families import family_of_pipeline
from sdlora.errors import SdloraError
from sdlora.io.formats import load_adapter
from sdlora.lora.adapter import Adapter, check_strength, resolve
from sdlora.lora.blocks import block_of, joint_blocks, multiplier, parse_blocks
from sdlora.lora.embeddings import attach, check_words, detach
from sdlora.lora.fusion import Plan
from sdlora.lora.inject import unwrap_all, wrap
from sdlora.lora.layer import LoRALayer, LoRAWeights, max_rank
from sdlora.lora.offsets import Offsets, resolve_diffs

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")  # SD3: T5
logger = logging.getLogger(__name__)


@dataclass
class Entry:
    """One loaded adapter: its layers, strength and switches."""

    adapter: Adapter
    layers: list[LoRALayer]
    strength: float = 1.0
    enabled: bool = True
    fused: bool = True  # ΔW lives in the weights (linear adapters only)
    unmatched: list[str] = field(default_factory=list)  # file keys the base has no module for
    blocks: list[str] = field(default_factory=list)  # each layer's LoRA Block Weight block
    block_strengths: dict[str, float] = field(default_factory=dict)  # see sdlora/lora/blocks.py

    def layer_strength(self, i: int) -> float:
        """What layer i runs this adapter at: the effective strength × its block's multiplier."""
        if not self.block_strengths:
            return self.effective
        return self.effective * multiplier(self.block_strengths, self.blocks[i])

    @property
    def effective(self) -> float:
        return self.strength if self.enabled else 0.0


class Mixer:
    """Adapters attached to one pipeline's UNet and text encoder(s), by name."""

    def __init__(self, pipe: DiffusionPipeline):
        self.pipe = pipe
        self.entries: dict[str, Entry] = {}
        self._plan: Plan | None = None  # fused groups; None after a change of what is fused where
        self._words: tuple | None = ()  # the new words attached now (None: unknown, re-attach)
        # bumped by every change a recorded generation step (a CUDA graph) cannot follow: what is
        # fused where, adapters added or removed, unfused strengths (fast_sample.py)
        self.version = 0
        pipe.sdlora_mixer = self
        self.offsets = Offsets(lambda: self.models)  # bias / norm differences (offsets.py)

    @property
    def models(self) -> dict[str, torch.nn.Module]:
        return {c: getattr(self.pipe, c) for c in COMPONENTS if getattr(self.pipe, c, None)}

    def add(
        self,
        adapter: Adapter | str | Path,
        name: str | None = None,
        strength: float = 1.0,
        fuse: bool = True,
        blocks: str | dict | list | None = None,
    ) -> str:
        """Attach an adapter (object or file path) under `name`; return the name used.

        `blocks`: per-block strengths (sdlora/lora/blocks.py), e.g. "IN=0,MID=1,OUT=0.5",
        checked against the base's family (a vector of its lengths, its block names)."""
        if not isinstance(adapter, Adapter):
            adapter = load_adapter(adapter)
        check_strength(str(name or adapter.source), strength)
        name = name or Path(adapter.source).stem or "adapter"
        if name in self.entries:
            raise SdloraError(
                f"an adapter named {name!r} is already loaded; add this one under another "
                "name (name=...) or remove that one first"
            )
        resolved, unmatched = resolve(adapter, self.models)
        diffs = resolve_diffs(adapter, self.models)
        check_words(self.pipe, adapter.embeddings, adapter.source)
        for other in self.entries.values():
            shared = sorted(set(adapter.embeddings) & set(other.adapter.embeddings))
            if shared:
                raise SdloraError(
                    f"{adapter.source} and {other.adapter.source} both bring the word "
                    f"{shared[0]!r}; load only one of them"
                )
        if unmatched:
            logger.warning(
                "%s: %d of %d keys match no module in this base and are ignored (e.g. %s)",
                adapter.source,
                len(unmatched),
                len(adapter.modules),
                ", ".join(unmatched[:3]),
            )
        fuse = fuse and adapter.is_linear
        block_strengths = self._blocks(name, blocks)
        layers: list[LoRALayer] = []
        layer_blocks: list[str] = []
        try:
            for (comp, path), factors in resolved.items():
                model = self.models[comp]
                layer = wrap(model, path)
                if factors.rank > max_rank(layer.base):
                    raise SdloraError(
                        f"{adapter.source}: rank {factors.rank} at {path} is larger than the "
                        f"layer allows ({max_rank(layer.base)}); the file is damaged or foreign"
                    )
                weight = layer.base.weight
                weights = LoRAWeights(
                    factors.down.to(weight.device, torch.float32),
                    factors.up.to(weight.device, torch.float32),
                    scale=factors.scale,
                    nonlinearity=adapter.nonlinearity,
                    conv=layer.conv_args(),
                    magnitude=None
                    if factors.magnitude is None
                    else factors.magnitude.to(weight.device, torch.float32),
                )
                try:
                    layer.add(name, weights, strength)
                except SdloraError as err:
                    raise SdloraError(f"{adapter.source}: {path}: {err}") from None
                layers.append(layer)
                layer_blocks.append(block_of(comp, path))
            entry = Entry(
                adapter,
                layers,
                float(strength),
                True,
                fuse,
                unmatched,
                layer_blocks,
                block_strengths,
            )
            self.entries[name] = entry
            self.offsets.add(name, diffs)
            self._refresh(entry, restructure=True)
        except BaseException:
            self.offsets.remove(name)
            for layer in layers:
                if name in layer.strengths:
                    layer.remove(name, refuse=False)
            self.entries.pop(name, None)
            self._refuse_all(layers)
            self._words = None
            self._sync_words()
            raise
        return name

    def _blocks(self, name: str, blocks: str | dict | list | None) -> dict[str, float]:
        """Per-block strengths parsed for this base's family; errors name the adapter."""
        try:
            family = family_of_pipeline(self.pipe)
            return parse_blocks(blocks, family, joint_blocks(family, self.models))
        except SdloraError as err:
            raise SdloraError(f"{name}: {err}") from None

    def _get(self, name: str) -> Entry:
        if name not in self.entries:
            known = ", ".join(self.entries) or "none"
            raise SdloraError(f"no adapter named {name!r} is loaded (loaded: {known})")
        return self.entries[name]

    def _layers(self) -> list[LoRALayer]:
        return list(dict.fromkeys(layer for e in self.entries.values() for layer in e.layers))

    def _refuse_all(self, released: list[LoRALayer] = ()) -> None:
        """Rebuild the plan from what is fused where now and write every layer's weight.

        `released`: layers an adapter just left, which get W0 back if nothing is fused there.
        """
        self.version += 1
        Plan([layer for layer in released if not layer.fused]).apply()
        self._plan = Plan(self._layers())
        self._plan.apply()

    def _refresh(self, entry: Entry, restructure: bool = False) -> None:
        """Push the entry's effective strength (and fused switch) into its layers' weights."""
        name = next(n for n, e in self.entries.items() if e is entry)
        write_offsets = self.offsets.prepare(name, lambda key: self._offset_strength(entry, key))
        for i, layer in enumerate(entry.layers):
            layer.strengths[name] = entry.layer_strength(i)
            if entry.fused != (name in layer.fused):
                restructure = True
                if entry.fused:
                    layer.fused.add(name)
                else:
                    layer.fused.discard(name)
        if not entry.fused:  # its stack is rebuilt
            self.version += 1
        if restructure or self._plan is None:
            self._refuse_all()
        elif entry.fused:
            self._plan.apply(only=name)
        write_offsets()
        self._sync_words()

    def _offset_strength(self, entry: Entry, key: tuple[str, str, str]) -> float:
        """The strength of a bias/norm difference: the entry's, times its block's multiplier."""
        if not entry.block_strengths:
            return entry.effective
        return entry.effective * multiplier(entry.block_strengths, block_of(key[0], key[1]))

    def _sync_words(self) -> None:
        """Give the pipeline the new words (embeddings) of every adapter that is on, and only
        those: with none on, the base's own tokenizer and embedding are back, so a prompt
        holding such a word is tokenised exactly as the base would (sdlora/lora/embeddings.py)."""
        active = {
            token: vectors
            for entry in self.entries.values()
            if entry.effective != 0
            for token, vectors in entry.adapter.embeddings.items()
        }
        words = tuple((token, id(vectors)) for token, vectors in active.items())
        if words == self._words:
            return
        self._words = None  # until the attach below is complete
        if active:
            attach(self.pipe, active)
        else:
            detach(self.pipe)
        self._words = words

    def set_strength(self, name: str, strength: float) -> None:
        """Set one adapter's strength (any float; 0 = base, 1 = as trained)."""
        entry = self._get(name)
        strength = check_strength(name, strength)
        if strength != entry.strength:
            previous, entry.strength = entry.strength, strength
            try:
                self._refresh(entry)
            except SdloraError:  # nothing was written: put the old strength back everywhere
                entry.strength = previous
                for i, layer in enumerate(entry.layers):
                    layer.strengths[name] = entry.layer_strength(i)
                raise

    def set_blocks(self, name: str, blocks: str | dict | list | None) -> None:
        """Set one adapter's per-block strengths (sdlora/lora/blocks.py); None or {}: all blocks 1."""
        entry = self._get(name)
        parsed = self._blocks(name, blocks)
        if parsed != entry.block_strengths:
            previous, entry.block_strengths = entry.block_strengths, parsed
            try:
                self._refresh(entry)
            except SdloraError:
                entry.block_strengths = previous
                for i, layer in enumerate(entry.layers):
                    layer.strengths[name] = entry.layer_strength(i)
                raise

    def set_strengths(self, strengths: dict[str, float]) -> None:
        """Set several strengths at once."""
        for name, strength in strengths.items():
            self.set_strength(name, strength)

    def enable(self, name: str, enabled: bool = True) -> None:
        """Switch an adapter on or off without forgetting its strength."""
        entry = self._get(name)
        if entry.enabled != enabled:
            entry.enabled = enabled
            self._refresh(entry)

    def set_fused(self, name: str, fused: bool) -> None:
        """Fuse a linear adapter into the weights (no per-step cost) or run it unfused."""
        entry = self._get(name)
        if fused and not entry.adapter.is_linear:
            raise SdloraError(f"{name!r} has a nonlinearity and cannot be fused")
        if entry.fused != fused:
            entry.fused = fused
            self._refresh(entry)

    def remove(self, name: str) -> None:
        """Detach an adapter; when none is left the base modules are put back exactly."""
        entry = self._get(name)
        for layer in entry.layers:
            layer.remove(name, refuse=False)
        del self.entries[name]
        self.offsets.remove(name)
        self._refuse_all(entry.layers)
        self._sync_words()
        if not self.entries:
            for model in self.models.values():
                unwrap_all(model)

    def clear(self) -> None:
        """Remove every adapter."""
        for name in list(self.entries):
            self.remove(name)

    def strengths(self) -> dict[str, float]:
        """Effective strength per adapter (0 when disabled)."""
        return {n: e.effective for n, e in self.entries.items()}

    def describe(self) -> list[dict]:
        """One dict per adapter: name, strength, enabled, nonlinearity, ranks, module counts."""
        return [
            dict(
                name=n,
                strength=e.strength,
                blocks=dict(e.block_strengths),
                enabled=e.enabled,
                fused=e.fused,
                nonlinearity=e.adapter.nonlinearity,
                ranks=e.adapter.ranks(),
                words=list(e.adapter.embeddings),
                modules=e.adapter.components(),
                unmatched=len(e.unmatched),
                source=e.adapter.source,
            )
            for n, e in self.entries.items()
        ]
