"""What the UI's buttons do, as thin calls into the library. No Gradio here.

Every name that comes from a visitor goes through `paths` before it touches the disk; every user
mistake is an `SdloraError` (the app shows it as a message). Long work reports through a
`progress(fraction, text)` callable.
"""

from __future__ import annotations

import functools
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sdlora.bases.base import BUILTIN
from sdlora.bases.families import width_label
from sdlora.bases.generate import SETTINGS, GenerateSettings, check_numbers, generate, save_png
from sdlora.bases.grid import labelled_grid
from sdlora.errors import SdloraError
from sdlora.io.formats import load_adapter
from sdlora.io.writing import written_file
from sdlora.lora.blocks import parse_blocks
from sdlora.lora.prompt_tags import split_lora_tags
from sdlora.tools.inspect import format_text, inspect_file
from sdlora.ui import paths
from sdlora.ui.engine import Engine
from sdlora.ui.state import Session

Progress = Callable[[float, str], None]
MAX_UPLOAD_BYTES = 2 * 1024**3  # 2 GiB: larger than any SD 1.x LoRA
CACHE = ".cache"  # under the outputs folder: uploads and temporary files, emptied at start
CACHE_MAX_AGE = 3600  # seconds an upload may stay in the cache while the app runs
MAX_CELLS = SETTINGS["num_images"].maximum  # images in one compare grid, as in one generate call
# The form's own values below the library's bounds: width/height 0 is the base's native size,
# a negative seed (as in A1111) a fresh random seed. Every other bound is the library's (`SETTINGS`).
FORM_FLOOR = {"width": (0, "0 = native"), "height": (0, "0 = native"), "seed": (-1, "-1 = random")}


def _quiet(fraction: float, text: str) -> None:
    """A progress callable that shows nothing."""


@dataclass
class Context:
    """The folders and the shared engine one app serves (the same for every visitor)."""

    base: str  # the base the app was started with: "tiny", a model folder, a single file, a Hub id
    adapters: Path  # adapters are listed, uploaded and trained into here
    datasets: Path  # training data folders live here
    outputs: Path  # images, grids, exports and training runs are written here
    engine: Engine = field(default_factory=Engine)
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    # where else adapters are listed from (read only), each under its folder's name:
    more_adapters: list[Path] = field(
        default_factory=list
    )  # e.g. "loras/x" for loras/x.safetensors
    runs: Path | None = None  # training runs: "runs/style/style" for runs/style/style.safetensors

    def __post_init__(self) -> None:
        self.more_adapters = [Path(p).resolve() for p in self.more_adapters]
        self.runs = Path(self.runs).resolve() if self.runs else None
        self.adapters = Path(self.adapters).resolve()
        self.datasets = Path(self.datasets).resolve()
        self.outputs = Path(self.outputs).resolve()
        self.adapters.mkdir(parents=True, exist_ok=True)
        self.outputs.mkdir(parents=True, exist_ok=True)

    @property
    def cache(self) -> Path:
        """The UI's own temporary files (Gradio's uploads): a hidden folder of the outputs."""
        return self.outputs / CACHE


def prune_cache(ctx: Context, max_age: float = CACHE_MAX_AGE) -> None:
    """Delete what in the cache is older than `max_age` seconds, and folders left empty (Gradio
    ages out the uploads it tracks; this catches the rest, such as its upload residue)."""
    now = time.time()
    for path in sorted(ctx.cache.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        try:
            if path.is_dir() and not path.is_symlink():
                if not any(path.iterdir()):
                    path.rmdir()
            elif now - path.lstat().st_mtime > max_age:
                path.unlink()
        except OSError:  # gone meanwhile, or in use: the next pass or the next start takes it
            continue


def clean_cache(ctx: Context) -> Path:
    """Empty the cache folder (nothing in it outlives the app that wrote it); return it."""
    shutil.rmtree(ctx.cache, ignore_errors=True)
    ctx.cache.mkdir(parents=True)
    return ctx.cache


# ---------------------------------------------------------------- bases and adapters


def base_choices(ctx: Context) -> list[str]:
    """The bases a visitor may pick: the app's base, the built-in ones, and folders exported here."""
    exported = [
        f"exports/{name}"
        for name in paths.list_folders(ctx.outputs / "exports")
        if (ctx.outputs / "exports" / name / "model_index.json").is_file()
    ]
    return list(dict.fromkeys([ctx.base, *BUILTIN, *exported]))


def resolve_base(ctx: Context, choice: str) -> str:
    """A base choice -> what `load_base` takes; anything not on the list is refused."""
    choice = choice or ctx.base
    if choice in (ctx.base, *BUILTIN):
        return choice
    path = paths.inside(ctx.outputs, choice, "base")
    if not (path / "model_index.json").is_file():
        raise SdloraError(f"base {choice!r}: pick one of {', '.join(base_choices(ctx))}")
    return str(path)


def adapter_folders(ctx: Context) -> list[tuple[str, Path, int | None]]:
    """The folders adapters are listed from besides the adapters folder: (the name they are
    listed under, the folder, how deep files may lie: None any depth, 1 in each run folder)."""
    folders, taken = [], set()
    for root, depth in [*((p, None) for p in ctx.more_adapters), (ctx.runs, 1)]:
        if root is None or root == ctx.adapters:
            continue
        prefix, n = root.name or "folder", 1
        while prefix in taken:
            n += 1
            prefix = f"{root.name}-{n}"
        taken.add(prefix)
        folders.append((prefix, root, depth))
    return folders


def list_adapters(ctx: Context) -> list[str]:
    """Adapter names: the adapters folder's by their path in it ("style"), then those of the
    other folders under the folder's name ("runs/style/style"); one file is listed once."""
    names = paths.list_adapters(ctx.adapters)
    seen = {(ctx.adapters / n).with_suffix(paths.ADAPTER_SUFFIX) for n in names}
    for prefix, root, depth in adapter_folders(ctx):
        for rel in paths.list_adapters(root):
            file = (root / (rel + paths.ADAPTER_SUFFIX)).resolve()
            if (depth is None or rel.count("/") == depth) and file not in seen:
                seen.add(file)
                names.append(f"{prefix}/{rel}")
    return names


def base_family(ctx: Context, base: str) -> str | None:
    """The family of `base` in the words `inspect` uses for adapters ("SD 1.x (tiny, sdlora
    built-in)"), if the base is loaded now (None: unknown yet; nothing is loaded for this)."""
    try:
        spec = resolve_base(ctx, base)
    except SdloraError:
        return None
    pipe = ctx.engine.pipe if ctx.engine.base == spec else None
    width = getattr(
        getattr(getattr(pipe, "unet", None), "config", None), "cross_attention_dim", None
    )
    return width_label(int(width)) if isinstance(width, int) else None


def adapters_hint(ctx: Context, names: list[str]) -> str | None:
    """What the adapter list says when it is empty: where adapters come from."""
    if names:
        return None
    runs = f" or sdlora train --output {ctx.runs.name}/NAME" if ctx.runs else ""
    return (
        f"No adapters yet: put .safetensors files in {ctx.adapters.name}/, train one (Train tab"
        f"{runs}) or upload one, then press Refresh lists."
    )


def adapter_path(ctx: Context, name: str) -> Path:
    """The file of adapter `name` as `list_adapters` names it; every name stays inside its
    folder (`paths.inside`), and a run's adapter is a file directly in its run folder."""
    path = paths.inside(
        ctx.adapters, name.removesuffix(paths.ADAPTER_SUFFIX) + paths.ADAPTER_SUFFIX, "adapter"
    )
    if not path.is_file():
        for prefix, root, depth in adapter_folders(ctx):
            rest = name.removeprefix(prefix + "/")
            if rest != name and (depth is None or rest.count("/") == depth):
                return paths.adapter_file(root, rest)
    return paths.adapter_file(ctx.adapters, name)


def adapter_info(ctx: Context, name: str) -> dict:
    """What `sdlora inspect` tells about adapter `name` (read once per version of the file)."""
    path = adapter_path(ctx, name)
    stat = path.stat()
    return _info(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _info(path: str, mtime_ns: int, size: int) -> dict:
    return inspect_file(path)


def inspect_adapter(ctx: Context, name: str, base: str = "") -> str:
    """`sdlora inspect` text for adapter `name`, with coverage against the chosen base."""
    path = adapter_path(ctx, name)
    with ctx.engine.mixed(resolve_base(ctx, base), {}) as (pipe, _):
        info = inspect_file(path, pipe)
    return format_text(
        info | {"file": name.removesuffix(paths.ADAPTER_SUFFIX) + paths.ADAPTER_SUFFIX}
    )


def summary(info: dict) -> str:
    """One line of an adapter's metadata for its row in the Mix tab."""
    parts = [
        f"rank {', '.join(map(str, info['ranks']))}",
        info["nonlinearity"],
        " + ".join(f"{c} {n}" for c, n in info["modules"].items()),
    ]
    if info.get("base_model"):
        parts.append(f"base {info['base_model']}")
    return " · ".join(parts)


def add_adapter(ctx: Context, session: Session, name: str, strength: float = 1.0) -> Session:
    """Put adapter `name` into the visitor's mix, after checking that it fits their base."""
    if not name:
        raise SdloraError("pick an adapter from the list first (or upload one)")
    path = adapter_path(ctx, name)
    if name in session.names():
        raise SdloraError(f"{name} is already in the mix; set its strength in its row")
    try:
        ctx.engine.check(resolve_base(ctx, session.base), name, path)
    except SdloraError as err:
        raise SdloraError(_mismatch(ctx, name, session.base) or str(err)) from None
    session.add(name, strength)
    return session


def check_mix_for_base(ctx: Context, session: Session, base: str) -> list[str]:
    """Lines naming each adapter of the mix that does not fit `base` (loaded now), with both
    families in the page's words: "style is made for SD 1.x (tiny, sdlora built-in); the
    base toy is SD 1.x (toy, sdlora built-in)"."""
    spec = resolve_base(ctx, base)
    unfit = []
    for item in session.mix:
        try:
            ctx.engine.check(spec, item.name, adapter_path(ctx, item.name))
        except SdloraError as err:
            unfit.append((item.name, err))
    family = base_family(ctx, base) or "another family"
    lines = []
    for name, err in unfit:
        try:
            made_for = adapter_info(ctx, name).get("architecture") or "unknown"
        except SdloraError:
            lines.append(f"{name}: {err}")
            continue
        lines.append(f"{name} is made for {made_for}; the base {base} is {family}")
    return lines


def _mismatch(ctx: Context, name: str, base: str) -> str | None:
    """'NAME was trained for base toy; switch base' when the file records another base."""
    try:
        trained_for = adapter_info(ctx, name).get("base_model")
    except SdloraError:
        return None
    if not trained_for or trained_for == base:
        return None
    switch = (
        f"switch Base model to {trained_for}"
        if trained_for in base_choices(ctx)
        else "switch Base model to one of that kind"
    )
    return f"{name} was trained for base {trained_for}, not {base}; {switch}"


def add_from_prompt(
    ctx: Context, session: Session, prompt: str, notes: list[str] | None = None
) -> tuple[str, list[str]]:
    """Take `<lora:name:w>` tags out of `prompt` into the mix: (prompt without tags, names).

    A tag for an adapter already in the mix sets its strength; a new one is added (checked
    against the base like Add to mix). A weight outside the session's range (0-1, or -1 to 2
    extended) is clamped into it, and `notes` gets a line saying so.
    """
    clean, strengths, blocks = split_lora_tags(prompt)
    low, high = session.strength_range
    for name, strength in strengths.items():
        adapter_path(ctx, name)  # refuses a name no file can have, in one line
        if not low <= strength <= high:
            clamped = min(max(strength, low), high)
            if notes is not None:
                notes.append(
                    f"<lora:{name}:{strength:g}> clamped to {clamped:g} (strengths here are "
                    f"{low:g} to {high:g}; turn on Extended range for -1 to 2)"
                    if not session.extended
                    else f"<lora:{name}:{strength:g}> clamped to {clamped:g} (at most "
                    f"{low:g} to {high:g})"
                )
            strength = strengths[name] = clamped
        if name in blocks:
            parse_blocks(blocks[name])
        if name not in session.names():
            add_adapter(ctx, session, name, strength)
        item = next(i for i in session.mix if i.name == name)
        item.strength, item.enabled = strength, True
        if name in blocks:
            item.blocks = blocks[name]
    return clean, list(strengths)


def check_ui_strength(value: float, what: str, low: float = 0.0, high: float = 1.0) -> float:
    """The UI's strength range is 0-1 (-1 to 2 extended; the API and CLI take any strength)."""
    if not (math.isfinite(value) and low <= value <= high):
        raise SdloraError(
            f"{what}: strengths in the UI are from {low:g} to {high:g} (got {value:g})"
        )
    return value


def set_blocks(session: Session, index: int, spec: str) -> str:
    """Set per-block strengths of the mix's adapter `index` (sdlora/lora/blocks.py); return the spec."""
    spec = (spec or "").strip()
    blocks = parse_blocks(spec)  # raises on a bad spec, naming it
    for key, value in blocks.items():
        check_ui_strength(value, f"block {key}")
    session.mix[index].blocks = spec
    return spec


def blocks_spec(te: float, in_: float, mid: float, out: float, custom: str = "") -> str:
    """The spec the block panel's sliders (or its custom text) stand for; "" when all are 1."""
    if (custom or "").strip():
        return custom.strip()
    values = {"BASE": te, "IN": in_, "MID": mid, "OUT": out}
    return ",".join(f"{k}={float(v):g}" for k, v in values.items() if float(v) != 1.0)


def upload_adapter(ctx: Context, upload: str | Path, overwrite: bool = False) -> str:
    """Copy an uploaded `.safetensors` adapter into the adapters folder; return its name.

    The file is parsed with safetensors only (never unpickled) and must be a LoRA we can read.
    Messages name the upload by its file name, never by where the server keeps it; the upload's
    copy in the UI's cache is deleted once handled, taken or refused.
    """
    upload = Path(upload)
    try:
        return _take_upload(ctx, upload, overwrite)
    finally:
        if upload.is_relative_to(ctx.cache):
            upload.unlink(missing_ok=True)
            prune_cache(ctx)


def _take_upload(ctx: Context, upload: Path, overwrite: bool) -> str:
    name = paths.clean_name(upload.name, "upload")
    if not name.lower().endswith(paths.ADAPTER_SUFFIX):
        raise SdloraError(f"{name}: only .safetensors adapter files can be uploaded")
    size = upload.stat().st_size
    if size > ctx.max_upload_bytes:
        raise SdloraError(
            f"{name}: {size / 2**20:.0f} MiB is over the upload limit of "
            f"{ctx.max_upload_bytes / 2**20:.0f} MiB"
        )
    try:
        load_adapter(upload)  # safetensors parse + LoRA layout check; raises SdloraError
    except SdloraError as err:  # the library names the file by the path it was given
        raise SdloraError(err.message.replace(str(upload), name), err.setting) from None
    dest = paths.inside(ctx.adapters, name[: -len(paths.ADAPTER_SUFFIX)] + paths.ADAPTER_SUFFIX)
    if dest.exists() and not overwrite:
        raise SdloraError(f"{dest.name} is already in the adapters folder; rename the file first")
    with written_file(dest) as tmp:
        shutil.copyfile(upload, tmp)
    return paths.relative(ctx.adapters, dest)[: -len(paths.ADAPTER_SUFFIX)]


def mix_files(ctx: Context, strengths: dict[str, float] | None) -> dict[str, tuple[Path, float]]:
    """{name: strength} from a visitor or the API -> {name: (file, strength)}, checked."""
    mix: dict[str, tuple[Path, float]] = {}
    for name, strength in (strengths or {}).items():
        try:
            strength = float(strength)
        except (TypeError, ValueError):
            raise SdloraError(f"strength of {name!r} must be a number, got {strength!r}") from None
        if not math.isfinite(strength):
            raise SdloraError(f"strength of {name!r} must be a finite number")
        name = name.removesuffix(paths.ADAPTER_SUFFIX)
        mix[name] = (adapter_path(ctx, name), strength)
    return mix


# ---------------------------------------------------------------- generate and compare


def form_bounds(name: str) -> tuple[float | None, float | None]:
    """(lowest, highest) value a form control offers for generation setting `name`: the
    library's bounds, reaching down to the form's 0 (native size) or -1 (random seed)."""
    setting = SETTINGS[name]
    return FORM_FLOOR.get(name, (setting.minimum,))[0], setting.maximum


def form_label(name: str) -> str:
    """The label of a generation setting's control: the library's, with what 0 or -1 means."""
    label = SETTINGS[name].label
    return f"{label} ({FORM_FLOOR[name][1]})" if name in FORM_FLOOR else label


def make_settings(*values, **named) -> GenerateSettings:
    """GenerateSettings from form values given in `SETTINGS` order (prompt, negative prompt,
    steps, guidance, seed, width, height, scheduler, images) or by name, checked against the
    library's bounds. 0 (or None) width/height is the base's native size; None steps/guidance
    the base's recommended values; seed -1 (or None) a fresh random seed."""
    form = dict(zip(SETTINGS, values, strict=False)) | named
    if len(values) > len(SETTINGS) or not set(form) <= set(SETTINGS):
        raise TypeError(f"make_settings takes the generation settings {', '.join(SETTINGS)}")
    if not str(form.get("prompt") or "").strip():
        raise SdloraError("write a prompt first")
    settings = GenerateSettings(**{name: _form_value(name, value) for name, value in form.items()})
    check_numbers(settings)
    return settings


def _form_value(name: str, value):
    """One form value as GenerateSettings takes it: text as text, numbers as int or float (a
    non-number refused, naming the setting), the form's 0 as the native size and any negative
    seed as a fresh random one. Numbers may come as text (the seed box: exact at any length)."""
    setting = SETTINGS[name]
    if setting.kind in ("text", "choice"):
        return "" if value is None else str(value)
    if isinstance(value, str):
        value = _number_text(name, value)
    if value is None:
        return (
            random_seed() if name == "seed" else GenerateSettings.__dataclass_fields__[name].default
        )
    try:
        number = value if isinstance(value, int) else float(value)
    except (TypeError, ValueError):
        raise SdloraError(f"must be a number (got {value!r})", setting=name) from None
    if setting.kind == "whole" and not isinstance(number, int):
        if not number.is_integer():
            raise SdloraError(f"must be a whole number (got {number:g})", setting=name)
        number = int(number)
    if name == "seed" and number < 0:
        return random_seed()
    if name in FORM_FLOOR and number == FORM_FLOOR[name][0]:
        return None
    return number


def _number_text(name: str, text: str) -> int | float | None:
    """A number typed as text: whole numbers exactly (any length), others as floats."""
    text = text.strip().replace("_", "")
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise SdloraError(f"must be a number (got {paths.shown(text)})", setting=name) from None


def valid_form_value(name: str, value) -> bool:
    """Whether a kept form value (browser storage, an image's record) is one the form may show
    again: within the library's bounds, or one of the form's own (0 native, negative seed)."""
    try:
        SETTINGS[name].check(_form_value(name, value))
    except (SdloraError, OverflowError):
        return False
    return True


def random_seed() -> int:
    """A fresh seed (what seed -1 stands for)."""
    return random.randrange(2**31)


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


class Interrupted(SdloraError):
    """The visitor pressed Interrupt; nothing was saved to the images folder. `partial`: the
    images as far as they got, kept in the outputs' partial/ folder (not in History)."""

    def __init__(self, message: str, partial: list[Path] | None = None):
        super().__init__(message)
        self.partial = partial or []


def run_generate(
    ctx: Context,
    base: str,
    strengths: dict[str, float] | None,
    settings: GenerateSettings,
    progress: Progress = _quiet,
    blocks: dict[str, str] | None = None,
    interrupted: Callable[[], bool] = lambda: False,
    windows: dict[str, str] | None = None,
) -> list[Path]:
    """Draw images with the given mix (and per-block strengths, and `windows`: the part of the
    steps an adapter acts over, sdlora/lora/schedule.py); save each under outputs/images/ with
    its recipe. `interrupted()` is asked after every denoising step."""
    mix = mix_files(ctx, strengths)
    settings.adapters = {name: strength for name, (_, strength) in mix.items()}
    settings.blocks = {n: b for n, b in (blocks or {}).items() if n in mix and b}
    settings.schedules = {n: w for n, w in (windows or {}).items() if n in mix and w}
    spec = resolve_base(ctx, base)
    running, stopped = [], []  # the pipeline in use; (step, steps) where Interrupt landed

    def on_step(done: int, total: int) -> None:
        if not stopped and interrupted():
            stopped.append((done, total))
            running[0]._interrupt = True  # diffusers skips the other steps, decodes what it has
        elif not stopped:
            progress(done / total, f"step {done} of {total}")

    progress(0.0, "loading the base and adapters")
    with ctx.engine.mixed(spec, mix, settings.blocks) as (pipe, mixer):
        running.append(pipe)
        try:
            images = generate(pipe, settings, on_step=on_step, mixer=mixer)
        except SdloraError:
            if not stopped:
                raise
            images = []  # the partial image came out blank: nothing to show
        finally:
            pipe._interrupt = False
    stem = f"{_stamp()}-{settings.seed}"
    if stopped:
        folder = ctx.outputs / "partial"
        kept = [
            save_png(image, _free(folder / f"{stem}-{i}.png"), settings, i)
            for i, image in enumerate(images)
        ]
        done, total = stopped[0]
        raise Interrupted(
            f"interrupted at step {done} of {total}; "
            + ("the partial image is shown, not kept in History" if kept else "nothing was saved"),
            kept,
        )
    folder = ctx.outputs / "images"
    return [
        save_png(image, _free(folder / f"{stem}-{i}.png"), settings, i)
        for i, image in enumerate(images)
    ]


def _free(path: Path) -> Path:
    """`path`, or `path` with -2, -3 ... added until no file has that name."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def parse_strengths(
    text: str, what: str = "strengths", low: float = 0.0, high: float = 1.0
) -> list[float]:
    """'0, 0.25, 0.5' -> [0.0, 0.25, 0.5]; each in the Mix tab's sliders' range."""
    try:
        values = [float(v) for v in (text or "").replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise SdloraError(f"{what}: give numbers separated by commas, e.g. 0, 0.5, 1") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise SdloraError(f"{what}: give numbers separated by commas, e.g. 0, 0.5, 1")
    for value in values:
        check_ui_strength(value, what, low, high)
    return values


def run_compare(
    ctx: Context,
    base: str,
    strengths: dict[str, float] | None,
    settings: GenerateSettings,
    x_name: str,
    x_values: list[float],
    y_name: str = "",
    y_values: list[float] | None = None,
    progress: Progress = _quiet,
    blocks: dict[str, str] | None = None,
    interrupted: Callable[[], bool] = lambda: False,
) -> Path:
    """Sweep `x_name` over `x_values` (and `y_name` over `y_values`): one labelled grid PNG.

    Every other adapter of the mix keeps its strength; every cell uses the same seed.
    `interrupted()` is asked between cells.
    """
    if not x_name:
        raise SdloraError("pick the adapter to sweep")
    y_values = y_values if y_name else [None]
    if y_name == x_name:
        raise SdloraError("pick two different adapters for an X/Y grid")
    if len(x_values) * len(y_values) > MAX_CELLS:
        raise SdloraError(f"at most {MAX_CELLS} cells in one grid")
    settings.num_images = 1
    base_mix = dict(strengths or {})
    rows = []
    total, done = len(x_values) * len(y_values), 0
    for y in y_values:
        row = []
        for x in x_values:
            mix = base_mix | {x_name: x} | ({y_name: y} if y_name else {})
            if interrupted():
                raise Interrupted(f"interrupted after {done} of {total} images; no grid saved")
            cell = mix_files(ctx, mix)
            with ctx.engine.mixed(resolve_base(ctx, base), cell, blocks, "drawing a grid") as (
                pipe,
                _,
            ):
                row.append(generate(pipe, settings)[0])
            done += 1
            progress(done / total, f"image {done} of {total}")
        rows.append(row)
    grid = labelled_grid(
        rows,
        [f"{x_name} {x:g}" for x in x_values],
        [f"{y_name} {y:g}" if y_name else "" for y in y_values],
        title=f"{settings.prompt[:80]} · seed {settings.seed}",
    )
    settings.adapters = {n: s for n, (_, s) in mix_files(ctx, base_mix).items()}
    settings.blocks = {n: b for n, b in (blocks or {}).items() if n in settings.adapters and b}
    return save_png(grid, _free(ctx.outputs / "compare" / f"{_stamp()}.png"), settings)


# ---------------------------------------------------------------- train


def list_datasets(ctx: Context) -> list[str]:
    """Training-data folders in the datasets folder."""
    return paths.list_folders(ctx.datasets)
