"""What an adapter file holds: format, ranks, alpha and scale, nonlinearity, modules, metadata."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sdlora.bases.families import SD1, SD2, SDXL, family_of_adapter_keys, width_label
from sdlora.bases.pipelines import adaptable_models
from sdlora.errors import SdloraError
from sdlora.io.formats import FORMAT_KEY, load_adapter
from sdlora.io.metadata import parse_json
from sdlora.lora.adapter import Adapter, component_of, fits, module_paths, weight_of, widths

logger = logging.getLogger(__name__)

# Module names shown as groups (longest match wins), as flat-name suffixes.
LEAVES = (
    "to_q",
    "to_k",
    "to_v",
    "to_out_0",
    "ff_net_0_proj",
    "ff_net_2",
    "proj_in",
    "proj_out",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "conv",
    "conv_in",
    "conv_out",
    "linear_1",
    "linear_2",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "fc1",
    "fc2",
)

# Metadata keys shown as their own fields rather than in the metadata dump.
SHOWN = ("sdlora_nonlinearity", "sdlora_trigger_words", "sdlora_training")


def _component(key: str) -> str:
    """Flat key -> 'unet' | 'text_encoder' | 'text_encoder_2' | the other prefix."""
    return component_of(key) or "_".join(key.split("_")[:2])


def guess_architecture(adapter: Adapter) -> str:
    """The base family the adapter was made for (`sdlora.bases.families`): by its cross-attention
    width, else by SDXL's names (`family_of_adapter_keys`), else by its text encoder's width,
    else by its metadata."""
    found = widths(adapter)
    if "unet" in found:
        return width_label(found["unet"])
    named = family_of_adapter_keys(adapter.modules, adapter.metadata)
    if named is not None:
        return named.label
    if "text_encoder" in found:
        return width_label(found["text_encoder"])
    meta = adapter.metadata
    return meta.get("sdlora_base_model") or meta.get("ss_base_model_version") or "unknown"


def read_as(metadata: dict[str, str]) -> dict[str, str | None]:
    """The family other tools read from the file's labels (sdlora/io/labels.py): A1111's
    (`ss_base_model_version` "sdxl_…" -> SDXL, else `ss_v2` "True" -> SD 2.x, else any metadata
    -> SD 1.x; it hides LoRAs of other families) and the model spec's architecture (SwarmUI)."""
    meta = {k: v for k, v in metadata.items() if k != FORMAT_KEY}
    if str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
        a1111 = SDXL.label
    elif str(meta.get("ss_v2", "")) == "True":
        a1111 = SD2.label
    else:
        a1111 = SD1.label if meta else "unknown (no metadata: shown with every model)"
    return {"a1111": a1111, "modelspec": meta.get("modelspec.architecture")}


def module_groups(adapter: Adapter) -> dict[str, dict]:
    """Per '<component> <module name>' group: count, ranks, alphas and effective scales."""
    groups: dict[str, dict] = {}
    for key, m in adapter.modules.items():
        leaf = max((x for x in LEAVES if key.endswith("_" + x)), key=len, default="other")
        g = groups.setdefault(
            f"{_component(key)} {leaf}",
            {"modules": 0, "ranks": set(), "alphas": set(), "scales": set()},
        )
        g["modules"] += 1
        g["ranks"].add(m.rank)
        g["alphas"].add(m.alpha if m.alpha is not None else float(m.rank))
        g["scales"].add(round(m.scale, 6))
    return {
        name: {k: sorted(v) if isinstance(v, set) else v for k, v in g.items()}
        for name, g in sorted(groups.items())
    }


def coverage(adapter: Adapter, base) -> dict:
    """Which adapter keys the base pipeline has a module of the right shape for (never raises).

    `unmatched`: keys naming no module of the base; `mismatched`: keys naming a module whose
    weight has another shape (the adapter was made for another base). Only the rest is matched.
    """
    from sdlora.lora.adapter import _suffix

    models = adaptable_models(base)
    lookups = {c: module_paths(m, c) for c, m in models.items()}
    unmatched, mismatched = [], []
    for key, factors in adapter.modules.items():
        comp = _component(key)
        path = lookups[comp].get(_suffix(comp, key)) if comp in lookups else None
        if path is None:
            unmatched.append(key)
        elif not fits(factors, weight_of(models[comp], path).shape):
            mismatched.append(key)
    if unmatched:
        logger.warning(
            "%s: %d of %d keys match no module in this base (e.g. %s)",
            adapter.source,
            len(unmatched),
            len(adapter.modules),
            ", ".join(unmatched[:3]),
        )
    return {
        "matched": len(adapter.modules) - len(unmatched) - len(mismatched),
        "unmatched": len(unmatched),
        "unmatched_examples": unmatched[:5],
        "mismatched": len(mismatched),
        "mismatched_examples": mismatched[:5],
    }


def describe(adapter: Adapter) -> dict:
    """A JSON-ready summary of an adapter."""
    alphas = sorted(
        {m.alpha if m.alpha is not None else float(m.rank) for m in adapter.modules.values()}
    )
    scales = sorted({round(m.scale, 6) for m in adapter.modules.values()})
    training = adapter.metadata.get("sdlora_training")
    try:
        where = f"{adapter.source}: its sdlora_training metadata"
        training = parse_json(training, where) if training else None
    except SdloraError:
        pass  # shown as the text it is
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
        "architecture": guess_architecture(adapter),
        "read_as": read_as(adapter.metadata),
        # exact full differences no factors hold (ComfyUI's .diff_b, norm layers' 1-D .diff)
        "differences": {
            "bias": sum(k.endswith(".bias") for k in adapter.diffs),
            "norm weight": sum(k.endswith(".weight") for k in adapter.diffs),
        },
        "groups": module_groups(adapter),
        "base_model": adapter.metadata.get("sdlora_base_model"),
        "trigger_words": adapter.trigger_words(),
        # new words it brings (pivotal tuning): token -> {text encoder: vectors}
        "words": {t: {c: len(v) for c, v in per.items()} for t, per in adapter.embeddings.items()},
        "training": training,
        "metadata": {k: v for k, v in adapter.metadata.items() if k not in SHOWN},
    }


def inspect_file(path: str | Path, base=None) -> dict:
    """Describe the adapter at `path`; with a loaded base pipeline, also its coverage."""
    adapter = load_adapter(path)
    info = describe(adapter)
    if base is not None:
        info["coverage"] = coverage(adapter, base)
    return info


def read_as_text(info: dict) -> str:
    """`A1111: SD 2.x; model spec: stable-diffusion-v2-768-v/lora`, with a warning when A1111's
    family is not the architecture the weights show."""
    read = info["read_as"]
    text = f"A1111: {read['a1111']}; model spec: {read['modelspec'] or 'none'}"
    family = read["a1111"].split(" (")[0]
    labels = (SD1.label, SD2.label, SDXL.label)
    shown = info["architecture"]
    if family in labels and shown.startswith(labels) and not shown.startswith(family):
        text += f" (not {info['architecture']}: A1111 hides it on models of that family)"
    return text


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
        f"architecture:  {info['architecture']}",
        f"read as:       {read_as_text(info)}",
        *(
            [
                "note:          LoHa/LoKr modules are held as their exact ΔW, so their rank reads min(out, in)"
            ]
            if info["format"].startswith("lycoris")
            else []
        ),
        *(
            [
                f"differences:   {info['differences']['bias']} bias, "
                f"{info['differences']['norm weight']} norm weight (exact, added at the strength)"
            ]
            if any(info["differences"].values())
            else []
        ),
        "groups:        (modules, rank, alpha -> scale)",
    ]
    for name, g in info["groups"].items():
        ranks, alphas = "/".join(map(str, g["ranks"])), "/".join(f"{a:g}" for a in g["alphas"])
        scales = "/".join(f"{x:g}" for x in g["scales"])
        lines.append(f"  {name:<28} {g['modules']:>4}  r {ranks}  alpha {alphas} -> {scales}")
    if info.get("base_model"):
        lines.append(f"base model:    {info['base_model']}")
    if info.get("trigger_words"):
        lines.append(f"trigger words: {', '.join(info['trigger_words'])}")
    if info.get("words"):
        lines.append(
            "new words:     "
            + ", ".join(
                f"{t} ({n} vector{'s' if n != 1 else ''})"
                for t, n in ((t, max(c.values())) for t, c in info["words"].items())
            )
        )
    if "coverage" in info:
        cov = info["coverage"]
        lines.append(
            f"coverage:      {cov['matched']} matched, {cov['unmatched']} unmatched, "
            f"{cov['mismatched']} of another shape"
        )
        if cov["unmatched_examples"]:
            lines.append(f"  unmatched e.g. {', '.join(cov['unmatched_examples'])}")
        if cov["mismatched_examples"]:
            lines.append(f"  other shape e.g. {', '.join(cov['mismatched_examples'])}")
    if info.get("training"):
        lines.append(f"training:      {json.dumps(info['training'])}")
    if info["metadata"]:
        lines.append("metadata:")
        lines += [f"  {k}: {v}" for k, v in sorted(info["metadata"].items())]
    return "\n".join(lines)
