"""Per-visitor state, kept in `gr.State`: the visitor's base choice and mix.

Only plain data lives here: names and strengths. The models themselves are shared (see
`engine.Engine`), and a visitor's mix is applied to them only while their own job runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from sdlora.errors import SdloraError

MAX_ADAPTERS = 8  # adapter rows shown in the Mix tab
STRENGTHS = (0.0, 1.0)  # the sliders' range: the mixer's meaning, 0 = base, 1 = as trained
EXTENDED = (-1.0, 2.0)  # the "extended range" setting, for shared prompts with other weights


@dataclass
class MixItem:
    """One adapter in a visitor's mix."""

    name: str  # adapter name: its path in the adapters folder without `.safetensors`
    strength: float = 1.0  # 0 = base, 1 = as trained
    enabled: bool = True
    blocks: str = (
        ""  # per-block strengths (sdlora/lora/blocks.py), e.g. "IN=0,MID=1,OUT=0.5"; "" = all 1
    )


@dataclass
class Session:
    """What one visitor has chosen: a base and an ordered mix of adapters."""

    base: str = "tiny"
    mix: list[MixItem] = field(default_factory=list)
    last_seed: int | None = None  # the seed the last generation used (for "reuse")
    interrupted: bool = False  # set by Interrupt; the running job stops at its next step
    putting_back: bool = False  # a refused strength is being put back in its slider
    extended: bool = False  # strengths from -1 to 2 instead of 0 to 1
    running: bool = False  # a generation or grid of this visitor is queued or running

    @property
    def strength_range(self) -> tuple[float, float]:
        return EXTENDED if self.extended else STRENGTHS

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

    def blocks(self) -> dict[str, str]:
        """Per-block strengths of the enabled adapters that have any."""
        return {item.name: item.blocks for item in self.mix if item.enabled and item.blocks}

    def mix_record(self) -> list[dict]:
        """The mix as plain JSON data (for browser storage and saved mixes)."""
        return [asdict(item) for item in self.mix]

    def set_mix(self, record: list) -> None:
        """Replace the mix with one from `mix_record` (unknown keys and bad rows, such as a
        strength outside the session's range, are dropped)."""
        items = []
        for row in record or []:
            try:
                item = MixItem(
                    str(row["name"]),
                    float(row.get("strength", 1.0)),
                    bool(row.get("enabled", True)),
                    str(row.get("blocks") or ""),
                )
            except (KeyError, TypeError, ValueError, AttributeError):
                continue
            low, high = self.strength_range
            if item.name not in [i.name for i in items] and low <= item.strength <= high:
                items.append(item)
        self.mix = items[:MAX_ADAPTERS]
