"""What an adapter file holds: format, ranks, alpha and scale, nonlinearity, modules, metadata."""

from __future__ import annotations

import json
from pathlib import Path

from .adapter import Adapter, resolve
from .files import load_adapter

# Metadata keys shown as their own fields rather than in the metadata dump.
SHOWN = ("sdlora_nonlinearity", "sdlora_trigger_words", "sdlora_training")


def describe(adapter: Adapter) -> dict:
    """A JSON-ready summary of an adapter."""
    alphas = sorted(
        {m.alpha if m.alpha is not None else float(m.rank) for m in adapter.modules.values()}
    )
    scales = sorted({round(m.scale, 6) for m in adapter.modules.values()})
    training = adapter.metadata.get("sdlora_training")
    try:
        training = json.loads(training) if training else None
    except json.JSONDecodeError:
        pass
    return {
        "file": adapter.source,
        "format": adapter.metadata.get("sdlora_detected_format")
        or ("sdlora" if "sdlora_format_version" in adapter.metadata else "kohya")
        + (" (nonlinear)" if not adapter.is_linear else ""),
        "nonlinearity": adapter.nonlinearity,
        "ranks": adapter.ranks(),
        "alphas": alphas,
        "scales": scales,
        "modules": adapter.components(),
        "base_model": adapter.metadata.get("sdlora_base_model"),
        "trigger_words": adapter.trigger_words(),
        "training": training,
        "metadata": {k: v for k, v in adapter.metadata.items() if k not in SHOWN},
    }


def inspect_file(path: str | Path, base=None) -> dict:
    """Describe the adapter at `path`; with a loaded base pipeline, also its coverage."""
    adapter = load_adapter(path)
    info = describe(adapter)
    if base is not None:
        models = {c: getattr(base, c) for c in ("unet", "text_encoder")}
        resolved, unmatched = resolve(adapter, models)
        info["coverage"] = {
            "matched": len(resolved),
            "unmatched": len(unmatched),
            "unmatched_examples": unmatched[:5],
        }
    return info


def format_text(info: dict) -> str:
    """Human-readable lines for `sdlora inspect`."""
    lines = [
        f"file:          {info['file']}",
        f"format:        {info['format']}",
        f"nonlinearity:  {info['nonlinearity']}",
        f"rank:          {', '.join(map(str, info['ranks']))}",
        f"alpha:         {', '.join(f'{a:g}' for a in info['alphas'])}",
        f"scale:         {', '.join(f'{s:g}' for s in info['scales'])}  (alpha / rank; applied at strength 1.0)",
        "modules:       " + ", ".join(f"{c} {n}" for c, n in info["modules"].items()),
    ]
    if info.get("base_model"):
        lines.append(f"base model:    {info['base_model']}")
    if info.get("trigger_words"):
        lines.append(f"trigger words: {', '.join(info['trigger_words'])}")
    if "coverage" in info:
        cov = info["coverage"]
        lines.append(f"coverage:      {cov['matched']} matched, {cov['unmatched']} unmatched")
    if info.get("training"):
        lines.append(f"training:      {json.dumps(info['training'])}")
    if info["metadata"]:
        lines.append("metadata:")
        lines += [f"  {k}: {v}" for k, v in sorted(info["metadata"].items())]
    return "\n".join(lines)
