"""Adapter files: safetensors in the key layout A1111, ComfyUI, kohya and diffusers read.

Linear adapters:    `<flat>.lora_down.weight`, `<flat>.lora_up.weight`, `<flat>.alpha`
Nonlinear adapters: `nonlinear_<flat>.down.weight`, `.up.weight`, `.alpha` — names no other tool
applies as a plain LoRA (which would silently draw wrong images).

Saved adapters carry their training scale folded into the factors, so alpha = rank in the file
and strength 1.0 always means "as trained" (see `fold_scale`).

DoRA adapters add `<flat>.dora_scale`, the magnitude in LyCORIS' layout: (out, 1[, 1, 1]) per
output row (LyCORIS' `wd_on_output`, PEFT's axis) or (1, in[, 1, 1]) per input column.
"""

from __future__ import annotations

import os
import pickle
import re
import stat
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from sdlora.bases.families import SD1, SD3, Family
from sdlora.errors import SdloraError
from sdlora.io.labels import file_labels, writing_family
from sdlora.io.writing import TEMP_SUFFIX, reported, written_file
from sdlora.lora.adapter import Adapter, ModuleFactors, adapter_family, file_key, memory_key
from sdlora.lora.dora import dora_axis, file_magnitude, magnitude_2d
from sdlora.lora.embeddings import bundle_tensors
from sdlora.lora.layer import POSITIVELY_HOMOGENEOUS, check_nonlinearity

FORMAT_VERSION = "1"
NONLINEAR_PREFIX = "nonlinear_"
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
# An SDXL LoCon/LoKr adapter on every layer of both text encoders and the UNet holds about
# 20,000 tensors; a file with many more is no adapter, and reading it would take minutes.
MAX_TENSORS = 50_000


def load_failure(err: BaseException, advice: str = "use a .safetensors copy") -> str:
    """Why reading a weights file failed, in one line. A pickle that `torch.load(weights_only=
    True)` refused is told as such, naming what it asked for; PyTorch's advice to retry with
    `weights_only=False` (which would run the file's code) is never passed on."""
    text = str(err)
    if isinstance(err, pickle.UnpicklingError) or "weights_only" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            what = f"a pickle that asks for {found.group(1)}, not only tensors"
        else:
            what = "not a pickle of plain tensors"
        return f"{what}: refused unread, nothing in it ran; {advice}"
    if isinstance(err, EOFError):
        return "it ends too early (cut short?)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def special_file(path: str | Path) -> str | None:
    """What `path` is when it exists but is neither a regular file nor a folder, in words ("a
    character device" for /dev/null, "a named pipe (FIFO)"); None for anything else."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    for test, words in (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return words
    return None


def check_input(path: str | Path, setting: str | None = None) -> Path:
    """The check of a file a command is about to read: refuse in one line one that does not
    exist, and a device, pipe or socket given where a file goes (/dev/null reads as empty, a
    pipe waits forever for a writer), naming what it is. Folders are the caller's to judge."""
    path = Path(path)
    special = special_file(path)
    if special:
        raise SdloraError(f"{path} is {special}, not a file; give a file", setting=setting)
    if not path.exists():
        raise SdloraError(f"{path}: no such file", setting=setting)
    return path


def check_output(
    path: str | Path,
    overwrite: bool = False,
    *,
    setting: str | None = "out",
    suffix: str | None = None,
    folder: bool = False,
    make_parents: bool = False,
) -> Path:
    """The one check of a path a command is about to write, before any work: refuse in one
    line, about `setting` (the command's `--out`, say), a name without `suffix`, a folder where
    a file is meant (or a file where a folder is: `folder=True`), one that exists unless
    `overwrite`, a missing parent folder (unless `make_parents`: then the writer makes it), a
    file where a folder on the way should be, and a place the user may not write to (a
    temporary file is made there and removed: as root, on a read-only disk, under an ACL, this
    is what answers truly). Returns `path` as a Path."""
    path = Path(path)
    if str(path) in ("", "."):
        raise SdloraError("needs a file name", setting=setting)
    if suffix is not None and path.suffix.lower() != suffix:
        raise SdloraError(f"{path} must end in {suffix}; change the name", setting=setting)
    if path.is_dir() and not folder:
        raise SdloraError(f"{path} is a folder; give a file name", setting=setting)
    special = special_file(path)
    if special:
        raise SdloraError(f"{path} is {special}; choose another name", setting=setting)
    if path.exists() and folder and not path.is_dir():
        raise SdloraError(
            f"{path} is a file, not a folder; choose another name or move the file away",
            setting=setting,
        )
    if path.exists() and not overwrite:
        raise SdloraError(
            f"{path} already exists; choose another name or pass --overwrite", setting=setting
        )
    ancestor = next(p for p in (*path.parents, Path(".")) if p.exists())
    if not ancestor.is_dir():
        raise SdloraError(f"{ancestor} is a file, not a folder; choose another place", setting)
    if ancestor != path.parent and not make_parents:
        raise SdloraError(
            f"{path}: the folder {path.parent} does not exist; create it first", setting=setting
        )
    with reported(path):  # "cannot write PATH: permission denied; choose a folder you may ..."
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    return path


def fold_scale(factors: ModuleFactors, nonlinearity: str) -> tuple[ModuleFactors, str]:
    """Move scale = alpha/rank into the factors; return (factors with alpha = rank, where).

    s·B·σ(A·x) = B·σ((s·A)·x) when σ is positively homogeneous and s > 0 (identity, relu,
    leaky_relu): fold into down (A), as cloneofsimo/lora settled. Otherwise fold into up (B),
    which is exact for every σ.
    """
    s = factors.scale
    if nonlinearity == "identity" or (nonlinearity in POSITIVELY_HOMOGENEOUS and s > 0):
        return replace(factors, down=factors.down * s, alpha=float(factors.rank)), "down"
    return replace(factors, up=factors.up * s, alpha=float(factors.rank)), "up"


def check_rank(rank: int, out_features: int, in_features: int) -> None:
    """Refuse a rank above min(out, in): such a file is damaged or made by a broken tool."""
    if rank > min(out_features, in_features):
        raise SdloraError(
            f"rank {rank} is larger than the module's dims ({out_features}×{in_features})"
        )


def adapter_tensors(adapter: Adapter, family: Family | None = None) -> dict[str, torch.Tensor]:
    """The file's tensors for `adapter` (whose factors are already folded), under the names its
    family's files use (SDXL: lora_te1_ for the first text encoder)."""
    tensors: dict[str, torch.Tensor] = {}
    family = family or adapter_family(adapter) or SD1
    modules = adapter.modules
    if family is SD3 and adapter.is_linear:  # SAI names, fused qkv (sdlora/io/sd3_names.py)
        from sdlora.io.sd3_names import to_file_modules

        modules = to_file_modules(modules)
    for key, factors in modules.items():
        key = file_key(key, family)
        if adapter.is_linear:
            names = (f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha")
        else:
            base = NONLINEAR_PREFIX + key
            names = (f"{base}.down.weight", f"{base}.up.weight", f"{base}.alpha")
        alpha = factors.alpha if factors.alpha is not None else float(factors.rank)
        tensors[names[0]] = factors.down.detach().contiguous()
        tensors[names[1]] = factors.up.detach().contiguous()
        tensors[names[2]] = torch.tensor(alpha, dtype=torch.float32)
        if factors.magnitude is not None:
            tensors[f"{key}.dora_scale"] = file_magnitude(factors.magnitude, factors.down)
    for name, delta in adapter.diffs.items():  # bias / norm differences, as kohya and ComfyUI
        key, _, kind = name.rpartition(".")  # name them (A1111 and ComfyUI apply them)
        tensors[f"{file_key(key, family)}.{'diff_b' if kind == 'bias' else 'diff'}"] = delta
    return tensors | bundle_tensors(adapter.embeddings)


def atomic_save_file(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]
) -> None:
    """Write a safetensors file whole or not at all (see `sdlora.io.writing.written_file`)."""
    with written_file(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def save_adapter(adapter: Adapter, path: str | Path, overwrite: bool = False) -> Path:
    """Save `adapter` (factors already folded, see `fold_scale`) as safetensors at `path`."""
    path = check_output(path, overwrite, setting=None, suffix=".safetensors", make_parents=True)
    for key, factors in adapter.modules.items():
        parts = [factors.down, factors.up] + [m for m in [factors.magnitude] if m is not None]
        if not all(torch.isfinite(t).all() for t in parts):
            raise SdloraError(f"{path}: module {key} has NaN/Inf weights; nothing was written")
    for token, per_component in adapter.embeddings.items():
        if not all(torch.isfinite(v).all() for v in per_component.values()):
            raise SdloraError(
                f"{path}: embedding {token!r} has NaN/Inf values; nothing was written"
            )
    ranks = adapter.ranks()
    family = writing_family(adapter)
    metadata = {
        "sdlora_format_version": FORMAT_VERSION,
        "sdlora_nonlinearity": adapter.nonlinearity,
        "ss_network_module": "networks.lora" if adapter.is_linear else "sdlora.nonlinear",
        "ss_network_dim": str(max(ranks)) if ranks else "0",
        "ss_network_alpha": str(max(ranks)) if ranks else "0",  # = rank: the scale is folded
        "ss_output_name": path.stem,
        **(_sd3_metadata(adapter, path.stem) if family is SD3 else {}),
        **adapter.metadata,
    }
    tensors = adapter_tensors(adapter, family)
    metadata = {k: str(v) for k, v in metadata.items()}
    labels = file_labels(family, tensors, metadata, path.stem)  # family, model spec, hashes
    if family is SD3:  # the variant (3.5 Medium's MMDiT-X, or 3/3.5 Large) its names show
        labels["modelspec.architecture"] = metadata["modelspec.architecture"]
        labels["modelspec.implementation"] = metadata["modelspec.implementation"]
    metadata |= labels
    atomic_save_file(tensors, path, metadata)
    return path


def _sd3_metadata(adapter: Adapter, title: str) -> dict[str, str]:
    from sdlora.io.sd3_names import metadata

    return metadata(adapter.modules, title)


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and header metadata; refuse pickles, missing and corrupt files clearly."""
    path = check_input(path)
    if path.is_dir():
        raise SdloraError(f"{path} is a folder; give the .safetensors file inside it")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise SdloraError(
            f"{path}: pickle files are never loaded (they can run code); use a .safetensors file"
        )
    try:
        with safe_open(str(path), framework="pt") as f:  # the header only
            count, metadata = len(f.keys()), f.metadata() or {}
        if count > MAX_TENSORS:
            raise SdloraError(
                f"{path} holds {count:,} tensors; an adapter has at most {MAX_TENSORS:,} "
                "(is this the right file?)"
            )
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise SdloraError(f"{path}: not a readable safetensors file ({err})") from None
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def parse_flat_lora(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str
) -> Adapter:
    """Build an Adapter from the flat kohya/A1111 layout or sdlora's nonlinear layout."""
    nonlinear = any(k.startswith(NONLINEAR_PREFIX) for k in tensors)
    down_part, up_part = (
        (".down.weight", ".up.weight") if nonlinear else (".lora_down.weight", ".lora_up.weight")
    )
    modules: dict[str, ModuleFactors] = {}
    for name, down in tensors.items():
        if not name.endswith(down_part):
            continue
        base = name[: -len(down_part)]
        up = tensors.get(base + up_part)
        if up is None:
            raise SdloraError(f"{source}: {base} has a down weight but no up weight")
        alpha = tensors.get(base + ".alpha")
        key = memory_key(base[len(NONLINEAR_PREFIX) :] if nonlinear else base)
        if down.shape[0] != up.shape[1]:
            raise SdloraError(
                f"{source}: {key} has down rank {down.shape[0]} but up rank {up.shape[1]}"
            )
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise SdloraError(f"{source}: {key} has NaN/Inf weights; the file is damaged")
        try:
            check_rank(down.shape[0], up.shape[0], down[0].numel())
        except SdloraError as err:
            raise SdloraError(f"{source}: {key}: {err}") from None
        magnitude = tensors.get(base + ".dora_scale")
        if magnitude is not None:
            try:
                in_channels = down.shape[1]
                magnitude = magnitude_2d(magnitude, dora_axis(magnitude, up.shape[0], in_channels))
            except SdloraError as err:
                raise SdloraError(f"{source}: {key}: {err}") from None
            if not torch.isfinite(magnitude).all():
                raise SdloraError(f"{source}: {key} has NaN/Inf weights; the file is damaged")
        modules[key] = ModuleFactors(
            down=down,
            up=up,
            alpha=None if alpha is None else float(alpha.float().item()),
            magnitude=magnitude,
        )
    if not modules:
        raise SdloraError(f"{source}: no LoRA weights found (not a LoRA adapter file?)")
    nonlinearity = metadata.get("sdlora_nonlinearity", "missing" if nonlinear else "identity")
    try:
        check_nonlinearity(nonlinearity)
    except SdloraError as err:
        raise SdloraError(f"{source}: {err}") from None
    if nonlinear == (nonlinearity == "identity"):
        raise SdloraError(f"{source}: key layout and nonlinearity {nonlinearity!r} disagree")
    if nonlinear and any(m.magnitude is not None for m in modules.values()):
        raise SdloraError(f"{source}: DoRA (dora_scale) with a nonlinearity is not defined")
    return Adapter(modules=modules, nonlinearity=nonlinearity, metadata=metadata, source=source)
