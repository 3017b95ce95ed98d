"""Exporting a visitor's mix (the Export tab and `/export`): into outputs/exports/ as a diffusers
folder, one checkpoint file or one merged LoRA, with a size estimate before writing, progress
measured in bytes written, one zip of a diffusers folder, and nonlinear adapters distilled to
plain LoRAs (`sdlora.tools.distill`) so that a mix holding them can be exported. No Gradio here."""

from __future__ import annotations

import json
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from sdlora.errors import SdloraError
from sdlora.io.files import save_adapter
from sdlora.io.formats import load_adapter
from sdlora.io.writing import written_file
from sdlora.lora.adapter import Adapter
from sdlora.lora.blend import Mixer
from sdlora.lora.blocks import parse_blocks, scale_blocks
from sdlora.tools.distill import distill_adapter
from sdlora.tools.export import export_diffusers, export_single_file, parse_dtype
from sdlora.tools.merge import (
    METHODS,
    PRUNING,
    MergeReport,
    check_density,
    merge_adapters,
    merge_exact,
)
from sdlora.ui import handlers as h
from sdlora.ui import paths
from sdlora.ui.engine import Engine

Progress = Callable[[float, str], None]
DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
LORA_BYTES = 4  # a merged LoRA is saved in float32
EXPORT_FORMATS = ("diffusers", "single-file", "lora")
MERGE_METHODS = METHODS  # how a "lora" export merges; "sum" is exact
DENSITY_METHODS = PRUNING  # the methods that take a density


def estimate_bytes(
    engine: Engine, spec: str, fmt: str, dtype: str, adapter_files: list[Path]
) -> int | None:
    """Bytes the export will take: the base's parameters × dtype size for a checkpoint (None
    until the base has been loaded once), the adapters' summed tensors for one merged LoRA."""
    if fmt == "lora":
        return sum(_tensor_bytes(path) for path in adapter_files)
    count = engine.parameters(spec)
    return None if count is None else count * DTYPE_BYTES.get(dtype, 2)


def _tensor_bytes(path: Path) -> int:
    """Elements of a safetensors file's tensors × 4 bytes (the merged LoRA's float32)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            n = 1
            for d in shape:
                n *= d
            total += n * LORA_BYTES
    return total


def human(size: int | None) -> str:
    """'1.9 GiB', '812 KiB'; 'unknown until the base is loaded' for None."""
    if size is None:
        return "known once the base has been loaded (generate once)"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


@contextmanager
def bytes_progress(
    folder: Path, total: int | None, progress: Progress, start: float = 0.3
) -> Iterator[None]:
    """Report the bytes written so far into `folder`'s temporary entries (the writer's
    `.name.<random>.tmp`) as progress from `start` to 0.95 of `total`."""
    stop = threading.Event()

    def written() -> int:
        size = 0
        for entry in folder.glob(".*"):
            files = entry.rglob("*") if entry.is_dir() else [entry]
            for f in files:
                try:
                    size += f.stat().st_size if f.is_file() else 0
                except OSError:
                    pass
        return size

    def watch() -> None:
        while not stop.wait(0.5):
            if total:
                done = min(written(), total)
                progress(start + (0.95 - start) * done / total, f"writing {human(done)}")

    thread = threading.Thread(target=watch, daemon=True)
    folder.mkdir(parents=True, exist_ok=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def zip_folder(folder: Path, progress: Progress) -> Path:
    """`folder` as one `folder.zip` beside it (stored, not compressed: weights do not shrink)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files) or 1
    target = folder.with_name(folder.name + ".zip")
    done = 0
    with written_file(target) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for path in files:
            archive.write(path, f"{folder.name}/{path.relative_to(folder).as_posix()}")
            done += path.stat().st_size
            progress(0.95 + 0.05 * done / total, "zipping for download")
    return target


MAX_DISTILL_RANK = 1024  # far above any useful LoRA rank; a typo such as 80000 is refused


def distill_rank(value) -> int:
    """The Distilled rank box's value as a rank: a whole number from 1 to MAX_DISTILL_RANK,
    else a one-line error naming the box (Gradio's own check showed a bare "Error" pill)."""
    if value is None or value == "":
        raise SdloraError("give a rank for the distilled LoRA, e.g. 8", setting="rank")
    number = float(value)
    if not number.is_integer():
        raise SdloraError(f"must be a whole number (got {number:g})", setting="rank")
    if not 1 <= number <= MAX_DISTILL_RANK:
        raise SdloraError(f"must be from 1 to {MAX_DISTILL_RANK} (got {number:g})", setting="rank")
    return int(number)


def merge_rank(value) -> int | None:
    """The Merged rank box's value: empty or 0 for the library's default (the largest input
    rank), else a whole number from 1 to MAX_DISTILL_RANK."""
    if value is None or value == "" or float(value) == 0:
        return None
    number = float(value)
    if not number.is_integer() or not 1 <= number <= MAX_DISTILL_RANK:
        raise SdloraError(
            f"must be a whole number from 1 to {MAX_DISTILL_RANK}, or empty for the largest "
            f"input rank (got {number:g})",
            setting="merge_rank",
        )
    return int(number)


def merge_seed(value) -> int:
    """The Merge seed box's value (DARE's drops): a whole number ≥ 0; empty means 0."""
    if value is None or value == "":
        return 0
    number = float(value)
    if not number.is_integer() or number < 0:
        raise SdloraError(f"must be a whole number, 0 or more (got {number:g})", setting="seed")
    return int(number)


def merge_note(method: str, report: MergeReport) -> str:
    """The status line's words on a merge: its method, rank and relative errors (worst module
    and overall, as `sdlora merge` prints them)."""
    if report.rank is None:
        return f"{method} merge: exact (relative error 0)"
    worst = max(report.errors.items(), key=lambda kv: kv[1], default=None)
    text = f"{method} merge at rank {report.rank}: overall relative error {report.overall:.3g}"
    if worst is not None:
        text += f", worst {worst[1]:.3g} in {worst[0]} ({len(report.errors)} modules)"
    return text


def distilled_name(name: str, rank: int) -> str:
    return f"{name}.distilled-r{rank}"


def distill_nonlinear(
    engine: Engine,
    spec: str,
    adapters_dir: Path,
    mix: dict[str, tuple[Path, float]],
    rank: int,
    prompts: list[str],
    progress: Progress,
) -> tuple[dict[str, float], list[str]]:
    """Replace each nonlinear adapter of `mix` by a plain LoRA of rank `rank` fitted to it
    (saved beside it as NAME.distilled-rR, reused when already there). Returns the new
    {name: strength} and one line per distilled adapter with its relative error."""
    strengths: dict[str, float] = {}
    notes: list[str] = []
    nonlinear = [n for n, (p, _) in mix.items() if not load_adapter(p).is_linear]
    for i, (name, (path, strength)) in enumerate(mix.items()):
        if name not in nonlinear:
            strengths[name] = strength
            continue
        new = distilled_name(name, rank)
        target = paths.inside(adapters_dir, new + paths.ADAPTER_SUFFIX, "adapter")
        if target.is_file() and target.stat().st_mtime >= path.stat().st_mtime:
            meta = load_adapter(target).metadata
            notes.append(
                f"{name}: reused {new} (relative error "
                f"{meta.get('sdlora_distill_relative_error', '?')})"
            )
        else:
            progress(0.05 + 0.25 * i / len(mix), f"distilling {name} to rank {rank}")
            adapter = load_adapter(path)
            with engine.bare(spec, f"distilling {name}") as pipe:
                started = time.perf_counter()
                linear, report = distill_adapter(pipe, adapter, rank, prompts=prompts or None)
            save_adapter(linear, target, overwrite=True)
            notes.append(
                f"{name}: distilled to {new} in {time.perf_counter() - started:.0f} s "
                f"(relative error {report.overall:.2g})"
            )
        strengths[new] = strength
    if not nonlinear:
        raise SdloraError("no adapter of the mix is nonlinear; untick Distill")
    return strengths, notes


class BaseAlone(SdloraError):
    """An export of an empty mix, which would write a full copy of the base: ask first."""


def export_plan(
    ctx: h.Context,
    base: str,
    strengths: dict[str, float] | None,
    fmt: str,
    dtype: str,
    blocks: dict[str, str] | None = None,
) -> str:
    """What an export would write: the mix, the format and its estimated size."""
    mix = h.mix_files(ctx, strengths)
    spec = h.resolve_base(ctx, base)
    what = {
        "diffusers": f"a diffusers folder ({dtype}), downloadable as one zip",
        "single-file": f"one checkpoint file ({dtype}) for A1111 / ComfyUI",
        "lora": "one merged LoRA file (float32)",
    }.get(fmt, fmt)
    parts = [
        f"{n} {s:g}" + (f" [{blocks[n]}]" if blocks and blocks.get(n) else "")
        for n, (_, s) in mix.items()
    ]
    files = [p for p, s in mix.values() if s != 0.0]
    size = estimate_bytes(ctx.engine, spec, fmt, dtype, files)
    mix_text = ", ".join(parts) if parts else "the base alone (empty mix: a full copy of the base)"
    return f"Will write {what}: base {base or ctx.base} + {mix_text}; about {human(size)}."


def run_export(
    ctx: h.Context,
    base: str,
    strengths: dict[str, float] | None,
    fmt: str = "diffusers",
    dtype: str = "fp16",
    name: str = "",
    overwrite: bool = False,
    progress: Progress = h._quiet,
    blocks: dict[str, str] | None = None,
    base_alone_ok: bool = True,
    distill_rank: int = 0,
    prompts: list[str] | None = None,
    notes: list[str] | None = None,
    method: str = "sum",
    density: float | None = None,
    rank: int | None = None,
    seed: int = 0,
) -> Path:
    """Write the mix to outputs/exports/: a diffusers folder, one checkpoint file, or one LoRA.

    `base_alone_ok=False` refuses an empty mix with `BaseAlone` (the page asks first).
    `distill_rank` > 0 replaces nonlinear adapters by plain LoRAs of that rank fitted to them
    on `prompts` (else the prompts the files record); `notes` receives a line for each.
    `method`, `density`, `rank` and `seed` choose how a "lora" export merges (`merge_mix`).
    """
    if fmt not in EXPORT_FORMATS:
        raise SdloraError(
            f"unknown export format {fmt!r}; choose one of: {', '.join(EXPORT_FORMATS)}"
        )
    parse_dtype(dtype)
    if fmt == "lora":  # refused before any loading, in the library's words
        check_density(method, density)
        if rank is not None and rank < 1:
            raise SdloraError(f"must be at least 1 (got {rank})", setting="merge_rank")
    name = paths.clean_name(name or f"mix-{h._stamp()}", "export name")
    if fmt != "diffusers" and not name.endswith(paths.ADAPTER_SUFFIX):
        name += paths.ADAPTER_SUFFIX
    out = paths.inside(ctx.outputs, f"exports/{name}", "export name")
    if out.exists() and not overwrite:
        raise SdloraError(f"exports/{name} already exists; choose another name or tick Overwrite")
    mix = h.mix_files(ctx, strengths)
    active = {n: v for n, v in mix.items() if v[1] != 0.0}
    if not active and fmt != "lora" and not base_alone_ok:
        raise BaseAlone(
            "the mix is empty, so this writes a full copy of the base; "
            "press Export the base alone to go ahead"
        )
    spec = h.resolve_base(ctx, base)
    blocks = dict(blocks or {})
    if distill_rank:
        progress(0.02, "distilling nonlinear adapters")
        strengths, lines = distill_nonlinear(
            ctx.engine, spec, ctx.adapters, mix, int(distill_rank), prompts or [], progress
        )
        renamed = {distilled_name(n, int(distill_rank)): n for n in mix}
        blocks = {new: blocks[old] for new, old in renamed.items() if old in blocks} | blocks
        mix = h.mix_files(ctx, strengths)
        (notes if notes is not None else []).extend(lines)
    files = [p for p, s in mix.values() if s != 0.0]
    size = estimate_bytes(ctx.engine, spec, fmt, dtype, files)
    progress(0.3, "merging the adapters into the weights")
    with (
        ctx.engine.mixed(spec, mix, blocks, "exporting") as (pipe, mixer),
        bytes_progress(out.parent, size, progress),
    ):
        if fmt == "diffusers":
            return export_diffusers(pipe, out, dtype, overwrite=overwrite)
        if fmt == "single-file":
            return export_single_file(pipe, out, dtype, overwrite=overwrite)
        merged = merge_mix(mixer, mix, blocks, method, density, rank, seed, notes)
        return save_adapter(merged, out, overwrite=overwrite)


def merge_mix(
    mixer: Mixer,
    mix: dict[str, tuple[Path, float]],
    blocks: dict[str, str],
    method: str = "sum",
    density: float | None = None,
    rank: int | None = None,
    seed: int = 0,
    notes: list[str] | None = None,
) -> Adapter:
    """The mix (its adapters at their strengths and per-block strengths) as one LoRA.

    "sum": exact, by the library's `merge_exact` keyed as the loaded base's family names its
    modules. Any other of `METHODS` (svd, ties, dare, dare-ties, magnitude-prune): by
    `merge_adapters` at `rank` (None: the largest input rank), with `density` for the pruning
    methods and `seed` for DARE; `notes` receives its reconstruction errors. Adapters at
    strength 0 are left out; messages name adapters as the mix does."""
    items = [
        (
            replace(scale_blocks(mixer.entries[n].adapter, parse_blocks(blocks.get(n))), source=n),
            s,
        )
        for n, (_, s) in mix.items()
        if s != 0.0
    ]
    if not items:
        raise SdloraError("the mix is empty; enable at least one adapter to merge")
    if method == "sum" and density is None and rank is None:
        merged = merge_exact(items, mixer.models)
    else:
        merged, report = merge_adapters(items, rank, method, density, seed)
        (notes if notes is not None else []).append(merge_note(method, report))
    merged.metadata["sdlora_merged_from"] = json.dumps({a.source: s for a, s in items})
    return merged
