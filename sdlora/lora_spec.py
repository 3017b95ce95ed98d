"""`FILE[:STRENGTH]`, the way every command names an adapter and its strength."""

from __future__ import annotations


def parse_lora(spec: str) -> tuple[str, float]:
    """'FILE[:STRENGTH]' -> (file, strength); STRENGTH defaults to 1.0."""
    path, sep, strength = spec.rpartition(":")
    if sep:
        try:
            return path, float(strength)
        except ValueError:
            pass
    return spec, 1.0
