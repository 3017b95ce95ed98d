"""The labels other tools read in an adapter file's header: its family, model spec and hashes.

Every adapter file sdlora writes carries them, whichever command wrote it:
  kohya / A1111      `ss_base_model_version` (sd_v1, sd_v2, sd_v2_v for v-prediction,
                     sdxl_base_v1-0) and `ss_v2` ("True" for SD 2.x): A1111 decides a LoRA's family
                     from these (`startswith("sdxl_")`, `ss_v2 == "True"`) and hides files that do
                     not match the loaded model.
  SAI model spec     `modelspec.sai_model_spec`, `.architecture` (`stable-diffusion-xl-v1-base/lora`
                     ..., `Family.modelspec_architecture`), `.implementation`, `.title`,
                     `.resolution`, `.prediction_type`, `.trigger_phrase`, `.date`: SwarmUI and
                     model sites read these (ids as kohya's library/sai_model_spec.py writes them).
  A1111 hashes       `sshs_model_hash`: sha256 of the file's tensor data (the bytes after the
                     header), which A1111 shows and looks LoRAs up by (its network.py takes it
                     from the metadata before hashing the file itself; hashes.py hashes the same
                     bytes); `sshs_legacy_hash`: the first 8 hex digits of the sha256 of the 64 KiB
                     at offset 1 MiB of the file written with only its `ss_*` metadata. Both
                     computed as kohya's train_util.precalculate_safetensors_hashes does.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone

import torch
from safetensors.torch import save

from sdlora.bases.families import (
    BY_NAME,
    FAMILIES,
    SD1,
    SDXL,
    Family,
    family_of_pipeline,
    family_of_width,
)
from sdlora.lora.adapter import Adapter, adapter_family, widths

FAMILY_KEY = "sdlora_family"  # the family name (families.py) the writer knew the adapter for
PREDICTION_KEY = "sdlora_prediction_type"  # epsilon / v_prediction, where the writer knew it
SPEC_VERSION = "1.0.0"
IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
_SPEC_PREDICTION = {"epsilon": "epsilon", "v_prediction": "v"}
_RESOLUTION = re.compile(r"\(?\s*(\d+)\s*,\s*(\d+)\s*\)?")  # kohya's ss_resolution "(512, 512)"


def writing_family(adapter: Adapter) -> Family:
    """The family to label `adapter` with: the one its writer recorded (`sdlora_family`), else
    what its widths or SDXL names show, else kohya's `ss_base_model_version`, else its text
    encoder's width or new words; SD 1.x when nothing shows one."""
    meta = adapter.metadata
    if meta.get(FAMILY_KEY) in BY_NAME:
        return BY_NAME[meta[FAMILY_KEY]]
    found = adapter_family(adapter)
    if found is not None:
        return found
    version = meta.get("ss_base_model_version", "")
    by_version = [f for f in FAMILIES if version and version.startswith(f.base_model_version)]
    if by_version:
        return max(by_version, key=lambda f: len(f.base_model_version))
    text = widths(adapter).get("text_encoder")
    if text is not None and family_of_width(text) is not None:
        return family_of_width(text)
    if any("text_encoder_2" in words for words in adapter.embeddings.values()):
        return SDXL
    return SD1


def base_labels(pipe) -> dict[str, str]:
    """`sdlora_family` and `sdlora_prediction_type` of a loaded base pipeline, for the metadata
    of an adapter made on it (extract, distill): the family comes from the base itself, not from
    which modules the adapter happens to hold."""
    labels = {FAMILY_KEY: family_of_pipeline(pipe).name}
    scheduler = getattr(pipe, "scheduler", None)
    prediction = getattr(getattr(scheduler, "config", None), "get", lambda _: None)(
        "prediction_type"
    )
    if prediction in _SPEC_PREDICTION:
        labels[PREDICTION_KEY] = prediction
    return labels


def prediction_of(metadata: dict[str, str]) -> str | None:
    """epsilon / v_prediction, where the metadata says (ours, kohya's `_v` suffix, model spec)."""
    if metadata.get(PREDICTION_KEY) in _SPEC_PREDICTION:
        return metadata[PREDICTION_KEY]
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sd_v"):
        return "v_prediction" if version.endswith("_v") else "epsilon"
    spec = {v: k for k, v in _SPEC_PREDICTION.items()}
    return spec.get(metadata.get("modelspec.prediction_type", ""))


def family_labels(
    family: Family, metadata: dict[str, str], title: str, now: datetime | None = None
) -> dict[str, str]:
    """kohya's family keys and the SAI model spec for an adapter of `family` with `metadata`."""
    architectures = family.modelspec_architecture
    prediction = prediction_of(metadata)  # unknown: the family's native bases' (SD 2.x: v)
    if prediction not in architectures:
        prediction = next(iter(architectures))
    version = family.base_model_version
    if prediction == "v_prediction" and version.startswith("sd_v"):
        version += "_v"  # as kohya writes it
    architecture = architectures[prediction]
    found = _RESOLUTION.fullmatch(metadata.get("ss_resolution", "").strip())
    width, height = (
        (int(found.group(1)), int(found.group(2))) if found else (family.native_size,) * 2
    )
    labels = {
        "ss_base_model_version": version,
        "ss_v2": str(family.name == "sd2"),
        FAMILY_KEY: family.name,
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": (now or datetime.now(timezone.utc)).replace(microsecond=0).isoformat(),
    }
    if prediction in _SPEC_PREDICTION:
        labels[PREDICTION_KEY] = prediction
        labels["modelspec.prediction_type"] = _SPEC_PREDICTION[prediction]
    triggers = _trigger_words(metadata)
    if triggers:
        labels["modelspec.trigger_phrase"] = ", ".join(triggers)
    return labels


def _trigger_words(metadata: dict[str, str]) -> list[str]:
    raw = metadata.get("sdlora_trigger_words", "")
    try:
        words = json.loads(raw) if raw else []
    except (json.JSONDecodeError, RecursionError):
        return []
    return [str(w) for w in words if str(w).strip()] if isinstance(words, list) else []


def a1111_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """`sshs_model_hash` and `sshs_legacy_hash` of the file of `tensors` (see the module doc).

    The tensor data of a safetensors file does not depend on its metadata, so the model hash
    is that of the file written; the legacy hash is of the file with only `ss_*` metadata."""
    kept = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = save(tensors, metadata=kept)
    header = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header :]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}


def file_labels(
    family: Family, tensors: dict[str, torch.Tensor], metadata: dict[str, str], title: str
) -> dict[str, str]:
    """Every label above for the file of `tensors` with `metadata`, to update its metadata with
    (labels a source file brought, stale hashes above all, are replaced)."""
    labels = family_labels(family, metadata, title)
    return labels | a1111_hashes(tensors, metadata | labels)
