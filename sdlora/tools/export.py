"""Merged export: base + Σ strength·ΔW as a diffusers folder or one original-layout file.

Weights are merged from the pristine W0 in fp32 and cast once to the export dtype. Nonlinear
adapters have no ΔW and cannot be folded into weights: an active one is refused by name.

New words an active adapter brings (pivotal tuning, sdlora/lora/embeddings.py) cannot live in a
checkpoint's vocabulary: the checkpoint holds the base's tokenizer and embedding, and each word
is written as an embedding file, `<token>.safetensors`, into `embeddings/` inside a diffusers
folder or into `NAME-embeddings/` beside a single file (`embeddings_folder`): A1111's
`embeddings/` and ComfyUI's `models/embeddings/` take them as they are (the file name is the
word), diffusers loads them with `load_textual_inversion`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from sdlora.bases.families import SD3, family_of_pipeline
from sdlora.bases.pipelines import assemble
from sdlora.errors import SdloraError
from sdlora.io.files import check_output
from sdlora.io.writing import written_folder
from sdlora.lora.embeddings import (
    TOKENIZERS,
    TokenEmbedding,
    attached,
    base_tokenizer,
    file_name,
    save_embedding_files,
)
from sdlora.lora.layer import LoRALayer

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    """'fp32' | 'fp16' | 'bf16' -> torch dtype."""
    if name not in DTYPES:
        raise SdloraError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def _models(pipe: DiffusionPipeline) -> tuple[str, ...]:
    """The pipeline's weighted parts: UNet (SD3: transformer), its family's text encoders (SD3's
    T5 only when the pipeline has one), VAE."""
    family = family_of_pipeline(pipe)
    texts = [e.component for e in family.text_encoders if getattr(pipe, e.component) is not None]
    return (family.denoiser, *texts, "vae")


def check_foldable(pipe: DiffusionPipeline) -> None:
    """Raise naming every active nonlinear adapter: they cannot be folded into weights."""
    blocked = set()
    for comp in _models(pipe):
        for module in getattr(pipe, comp).modules():
            if isinstance(module, LoRALayer):
                for name, weights in module.items():
                    if not weights.is_linear and module.strengths[name] != 0.0:
                        blocked.add(f"{name} ({weights.nonlinearity})")
    if blocked:
        raise SdloraError(
            "nonlinear adapters cannot be merged into weights: "
            f"{', '.join(sorted(blocked))}; set their strength to 0 or remove them"
        )


def merged_state_dict(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state dict as a plain (unwrapped) model with every linear adapter merged."""
    state: dict[str, torch.Tensor] = {}
    layers = {p: m for p, m in model.named_modules() if isinstance(m, LoRALayer)}
    words = [p for p, m in model.named_modules() if isinstance(m, TokenEmbedding)]
    for key, value in model.state_dict().items():
        word = next((p for p in words if key.startswith(p + ".")), None)
        if word is not None:  # the base's embedding; new words go to embedding files
            if key == f"{word}.base.weight":
                state[f"{word}.weight"] = value.detach().to("cpu", dtype)
            continue
        owner = next((p for p in layers if key.startswith(p + ".")), None)
        if owner is None:
            state[key] = value.detach().to("cpu", dtype if value.is_floating_point() else None)
            continue
        rest = key[len(owner) + 1 :]
        if rest.startswith("adapters."):
            continue
        plain = f"{owner}.{rest.removeprefix('base.')}"
        if rest == "base.weight":
            value = layers[owner].merged_weight(torch.float32)
            if not torch.isfinite(value).all():
                raise SdloraError(f"merged weight of {owner} is not finite; check the strengths")
        state[plain] = value.detach().to("cpu", dtype)
    return state


def merged_components(pipe: DiffusionPipeline, dtype: torch.dtype) -> dict[str, dict]:
    """{'unet'|'text_encoder'|'text_encoder_2' (SDXL)|'vae': merged state dict} in `dtype`."""
    check_foldable(pipe)
    return {comp: merged_state_dict(getattr(pipe, comp), dtype) for comp in _models(pipe)}


def _plain_copy(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A fresh, unwrapped model of the same class and config holding `state`."""
    if hasattr(model, "from_config"):
        with torch.device("meta"):
            fresh = type(model).from_config(model.config)
    else:  # transformers model
        with torch.device("meta"):
            fresh = type(model)(model.config)
    fresh.load_state_dict(state, strict=True, assign=True)
    return fresh


MODEL_INDEX = "model_index.json"  # every diffusers model folder has one


def check_out(out: str | Path, folder: bool, overwrite: bool, make_parents: bool = True) -> Path:
    """Refuse an --out that cannot take the export, before any work (`check_output`: a wrong
    name, one that exists unless `overwrite`, a file where a folder goes or the reverse, a place
    that cannot be written), and a folder holding anything but a diffusers model (--overwrite
    would delete it). `make_parents=False` refuses a missing parent folder too (the CLI)."""
    out = check_output(
        out,
        overwrite,
        suffix=None if folder else ".safetensors",
        folder=folder,
        make_parents=make_parents,
    )
    if folder and out.is_dir() and not (out / MODEL_INDEX).is_file():
        stray = sorted(out.iterdir())
        if stray:
            raise SdloraError(
                f"{out} holds {_count(stray)} not part of a diffusers model "
                f"({_names(stray)}); choose another --out or empty it"
            )
    return out


def _count(paths: list[Path]) -> str:
    """'1 file that is', '2 files and 1 folder that are'."""
    folders = sum(p.is_dir() for p in paths)
    files = len(paths) - folders
    parts = [
        f"{n} {word}{'s' if n != 1 else ''}"
        for n, word in ((files, "file"), (folders, "folder"))
        if n
    ]
    return " and ".join(parts) + (" that is" if len(paths) == 1 else " that are")


def _names(paths: list[Path], most: int = 3) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in paths[:most]]
    return ", ".join(names) + (f" and {len(paths) - most} more" if len(paths) > most else "")


def export_diffusers(
    pipe: DiffusionPipeline, out: str | Path, dtype: str = "fp16", overwrite: bool = False
) -> Path:
    """Write the current blend as a diffusers model folder (safetensors), whole or not at all."""
    out = check_out(out, folder=True, overwrite=overwrite)
    states = merged_components(pipe, parse_dtype(dtype))
    parts = {comp: _plain_copy(getattr(pipe, comp), states[comp]) for comp in states}
    tokenizers = {
        name: base_tokenizer(pipe, name) for name in TOKENIZERS.values() if hasattr(pipe, name)
    }
    plain = assemble(family_of_pipeline(pipe), {**pipe.components, **parts, **tokenizers})
    with written_folder(out) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        if attached(pipe):
            save_embedding_files(attached(pipe), embeddings_folder(tmp, folder=True))
        check_out(out, folder=True, overwrite=overwrite)  # nothing appeared there meanwhile
    return out


def export_single_file(
    pipe: DiffusionPipeline, out: str | Path, dtype: str = "fp16", overwrite: bool = False
) -> Path:
    """Write the current blend as one .safetensors in the original SD (A1111/ComfyUI) layout
    (SD 3.x: Stability's, as its own files have it)."""
    out = check_out(out, folder=False, overwrite=overwrite)
    words = attached(pipe)
    beside = embeddings_folder(out, folder=False)
    if words and beside.is_file():
        raise SdloraError(f"{beside} is a file and the new words' embeddings go there; move it")
    taken = [f for f in (beside / f"{file_name(t)}.safetensors" for t in words) if f.exists()]
    if taken and not overwrite:
        raise SdloraError(f"{taken[0]} already exists; choose another --out or pass --overwrite")
    states = merged_components(pipe, parse_dtype(dtype))
    if family_of_pipeline(pipe) is SD3:
        _save_sd3_single_file(pipe, states, out, dtype, overwrite)
    else:
        _save_ldm_single_file(pipe, states, out, dtype, overwrite)
    if words:
        save_embedding_files(words, embeddings_folder(out, folder=False), overwrite=overwrite)
    return out


def _save_ldm_single_file(pipe, states: dict, out: Path, dtype: str, overwrite: bool) -> None:
    """SD 1.x/2.x/XL: the original LDM/SGM layout (sdlora/io/single_file.py)."""
    from sdlora.io.single_file import save_single_file

    save_single_file(
        states["unet"],
        states["vae"],
        states["text_encoder"],
        pipe.unet.config,
        pipe.vae.config,
        out,
        dtype=dtype,
        overwrite=overwrite,
        text_encoder_2_sd=states.get("text_encoder_2"),
    )


def _save_sd3_single_file(pipe, states: dict, out: Path, dtype: str, overwrite: bool) -> None:
    """SD 3.x: Stability's layout, T5 inside when the pipeline has it (sdlora/io/sd3_single_file.py)."""
    from sdlora.io.files import atomic_save_file
    from sdlora.io.sd3_single_file import to_sd3_state_dict

    tensors = to_sd3_state_dict(
        states["transformer"],
        states["vae"],
        {e.component: states.get(e.component) for e in SD3.text_encoders},
        pipe.transformer.config,
        pipe.vae.config,
    )
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise SdloraError(
                f"{out}: {key} is not finite in {dtype} (too large for fp16? use bf16 or fp32); "
                "nothing was written"
            )
    check_out(out, folder=False, overwrite=overwrite)  # nothing appeared there meanwhile
    info = {"format": "pt", "sdlora_layout": SD3.single_file_layout}
    atomic_save_file({k: v.contiguous() for k, v in tensors.items()}, out, info)


def embeddings_folder(out: str | Path, folder: bool) -> Path:
    """Where an export puts the embedding files of active new words (see the module docstring)."""
    out = Path(out)
    return out / "embeddings" if folder else out.with_name(out.stem + "-embeddings")
