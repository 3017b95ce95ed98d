"""Per-visitor state, kept in `gr.State`: the visitor's base choice and mix.

Only plain data lives here: names and strengths. The models themselves are shared (see
`engine.Engine`), and a visitor's mix is applied to them only while their own job runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdlora.errors import SdloraError

MAX_ADAPTERS = 8  # adapter rows shown in the Mix tab


@dataclass
class MixItem:
    """One adapter in a visitor's mix."""

    name: str  # adapter name: its path in the adapters folder without `.safetensors`
    strength: float = 1.0  # 0 = base, 1 = as trained
    enabled: bool = True


@dataclass
class Session:
    """What one visitor has chosen: a base and an ordered mix of adapters."""

    base: str = "tiny"
    mix: list[MixItem] = field(default_factory=list)

    def names(self) -> list[str]:
        return [item.name for item in self.mix]

    def add(self, name: str, strength: float = 1.0) -> None:
        """Put an adapter in the mix; refuse duplicates and more than MAX_ADAPTERS."""
        if name in self.names():
            raise SdloraError(f"adapter {name!r} is already in the mix")
        if len(self.mix) >= MAX_ADAPTERS:
            raise SdloraError(f"at most {MAX_ADAPTERS} adapters in one mix; remove one first")
        self.mix.append(MixItem(name, float(strength)))

    def remove(self, index: int) -> None:
        if 0 <= index < len(self.mix):
            del self.mix[index]

    def strengths(self) -> dict[str, float]:
        """Strength of every enabled adapter, in mix order (what generation and export use)."""
        return {item.name: item.strength for item in self.mix if item.enabled}
