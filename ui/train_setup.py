"""From the Train form to a run: the dataset preview, the settings checked, messages in UI words.

Everything a visitor can get wrong is found here, in well under a second, with the trainer's own
checks (`TrainConfig.check`, `discover`, `BatchPlan.check`, the output-folder rules): a run that
starts has data to train on. The trainer's errors name the setting they are about
(`SdloraError.setting`) and mention others as placeholders (`sdlora.errors.fill`); `ui_words`
words them with the form's labels (the declarations' `label`) and without the server's paths.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field
from pathlib import Path

from PIL import Image

from sdlora.errors import SdloraError, fill
from sdlora.train import load_config
from sdlora.train.checkpoint import checkpoints
from sdlora.train.config import FIELDS, OPTIONS, TrainConfig, check_value, kind_of
from sdlora.train.data import ENLARGE_WARNING, BatchPlan, discover, enlarged_items
from sdlora.ui import paths
from sdlora.ui.handlers import Context

PREVIEW_IMAGES = 24  # thumbnails shown of a dataset (the count says how many there are)
THUMB_SIDE = 96  # thumbnail side in pixels: small ones are enlarged by a whole factor

# the Train form's labels, from the settings' declarations (train/config.py)
LABELS = {name: spec.label for name, spec in OPTIONS.items() if spec.label}
# settings the form's own controls give (Form's fields, the dataset picker, the output folder)
FORM_SETTINGS = (
    "data_dir", "name", "trigger", "rank", "nonlinearity", "steps", "lr", "resolution",
    "batch_size", "train_text_encoder", "sample_every", "sample_prompts", "seed", "resume",
    "overwrite",
)  # fmt: skip
# every other labelled setting is under "More settings", in declaration order: a new option
# reaches the form by its declaration's `label` alone
MORE_SETTINGS = tuple(name for name in LABELS if name not in FORM_SETTINGS)


def label_of(setting: str) -> str:
    """What the page calls a setting: its control's label, else its name in words."""
    if setting == "output":  # the form's adapter name picks outputs/train/<name>
        setting = "name"
    return LABELS.get(setting, setting.replace("_", " "))


def field_note(setting: str, value) -> str:
    """The note under a number's control on the Train form: its help and bounds as declared
    (train/config.py, the CLI's own), or, for a value out of them, why Start will refuse it.
    Nothing is clamped or rounded: the visitor sees the value they typed and what is wrong."""
    spec = OPTIONS[setting]
    info = f"{spec.help} ({spec.bounds()})"
    info = info[:1].upper() + info[1:]
    if value is None or value == "":
        return info
    if kind_of(FIELDS[setting])[0] == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        check_value(FIELDS[setting], value)
    except SdloraError as err:
        return f"⚠ {label_of(setting)} {err.message}: Start refuses it. {info}"
    return info


def again(setting: str) -> str:
    """How to run again with a switch on, in the form's words ("tick Resume and press Start")."""
    return f"tick {label_of(setting)} and press Start"


@dataclass
class DatasetPreview:
    """What a dataset folder holds, as the trainer will see it."""

    count: int  # readable images
    thumbnails: list[tuple[Image.Image, str]]  # (thumbnail, caption), the first PREVIEW_IMAGES
    sizes: list[tuple[int, int]]  # training buckets (width, height) in use
    notes: list[str]  # skipped files and the trainer's warnings, in UI words

    def summary(self) -> str:
        sides = ", ".join(f"{w}×{h}" for w, h in self.sizes)
        text = f"**{self.count} image{'s' if self.count != 1 else ''}**, trained at {sides}"
        return "\n\n".join([text, *self.notes])


def ui_words(said: SdloraError | str, ctx: Context, data: Path | None = None) -> str:
    """A trainer error or warning as the page should say it: the form's labels for settings,
    `dataset 'cats'` for the dataset folder `data`, short names for the server's folders."""
    if isinstance(said, SdloraError):
        message = said.worded(label_of, again)
    else:
        message = fill(said, label_of, again)
    if data is not None:
        message = message.replace(f"{data}:", f"dataset {data.name!r}:")
    for folder, name in [
        (ctx.datasets, "datasets"),
        (ctx.outputs, "outputs"),
        (ctx.adapters, "adapters"),
    ]:
        message = message.replace(f"{Path(folder).resolve()}/", f"{name}/")
        message = message.replace(f"{folder}/", f"{name}/")
    return message.strip()


def dataset_folder(datasets: Path, dataset: str) -> Path:
    if not dataset:
        raise SdloraError("pick a dataset folder first")
    data = paths.inside(datasets, dataset, "dataset")
    if not data.is_dir():
        raise SdloraError(f"dataset {dataset!r}: no such folder in the datasets folder; refresh")
    return data


def preview(ctx: Context, dataset: str, resolution: int) -> DatasetPreview:
    """The dataset's images with their captions, as `discover` finds them; SdloraError when it
    has none that can be trained on."""
    data = dataset_folder(ctx.datasets, dataset)
    config = TrainConfig(data_dir=str(data), resolution=int(resolution))
    try:
        items, skipped, warnings = discover(config)
    except SdloraError as err:
        raise SdloraError(ui_words(err, ctx, data)) from None
    notes = [ui_words(w, ctx, data) for w in warnings]
    if skipped:
        first, reason = skipped[0]
        notes.insert(
            0,
            f"{len(skipped)} file(s) cannot be read and are left out (e.g. {first.name}: {reason})",
        )
    enlarged = enlarged_items(items)
    if enlarged:
        first = enlarged[0]
        notes.append(
            f"{len(enlarged)} of {len(items)} images are enlarged {ENLARGE_WARNING:g}× or more "
            f"to reach the resolution (e.g. {first.path.name}, {first.size[0]}×{first.size[1]}): "
            "a lower resolution trains faster and loses no detail"
        )
    thumbs = [(thumbnail(item.path), item.caption) for item in items[:PREVIEW_IMAGES]]
    sizes = sorted({item.bucket for item in items})
    return DatasetPreview(len(items), thumbs, sizes, notes)


def thumbnail(path: Path, side: int = THUMB_SIDE) -> Image.Image:
    """`path` fitted in side x side: shrunk smoothly, or enlarged by a whole factor (crisp)."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        longest = max(image.size)
        if longest > side:
            image.thumbnail((side, side), Image.Resampling.LANCZOS)
            return image
        factor = max(1, side // longest)
        return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


@dataclass
class Form:
    """The Train form's values, in the form's order."""

    name: str = ""
    trigger: str = ""
    rank: int = 8
    nonlinearity: str = "identity"
    steps: int = 200
    lr: float = 1e-4
    resolution: int = 512
    batch_size: int = 1
    train_text_encoder: bool = False
    sample_every: int = 50
    sample_prompt: str = ""
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    more: dict = field(default_factory=dict)  # MORE_SETTINGS -> value; None, "" or absent: default

    def values(self) -> list:
        """The form's values in the order of its controls: the fields, then MORE_SETTINGS."""
        fixed = [getattr(self, name) for name in self.__dataclass_fields__ if name != "more"]
        return fixed + [shown_value(name, self.more.get(name)) for name in MORE_SETTINGS]

    @classmethod
    def of(cls, values: list) -> Form:
        """A Form from its controls' values (`values()`'s order)."""
        count = len(cls.__dataclass_fields__) - 1
        return cls(*values[:count], more=dict(zip(MORE_SETTINGS, values[count:], strict=True)))


def shown_value(name: str, value):
    """What a More-settings control shows for a setting's value (None: its default)."""
    if value is None and FIELDS[name].default is not MISSING:
        value = FIELDS[name].default
    if kind_of(FIELDS[name])[0] == "list[str]":
        return " ".join(value or [])
    return value


def more_settings(more: dict) -> dict:
    """The trainer's keywords for the More-settings values that differ from the defaults (a
    control left at its default, or emptied, gives nothing: the trainer's default stands)."""
    settings = {}
    for name, value in more.items():
        if name not in MORE_SETTINGS:
            raise SdloraError(f"the form has no setting {name!r}")
        kind, _ = kind_of(FIELDS[name])
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if kind == "list[str]":
            value = [value] if isinstance(value, str) else list(value)
        elif kind == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
        default = FIELDS[name].default
        if value != ([] if kind == "list[str]" else default):
            settings[name] = value
    return settings


@dataclass
class Run:
    """A checked run: the trainer's settings and where it writes."""

    settings: dict  # `load_config` keywords
    name: str  # the adapter's name
    output: Path  # outputs/train/<name>
    images: int  # training images found


def checked_run(ctx: Context, base: str, dataset: str, form: Form) -> Run:
    """The trainer's settings for this form; SdloraError in UI words for anything that would
    make the run fail before its first step."""
    data = dataset_folder(ctx.datasets, dataset)
    name = paths.clean_name(form.name or data.name, "adapter name")
    name = name.removesuffix(paths.ADAPTER_SUFFIX)
    output = paths.inside(ctx.outputs, f"train/{name}", "adapter name")
    for setting in ("steps", "rank", "batch_size", "resolution", "sample_every", "seed"):
        value = getattr(form, setting)
        if setting == "sample_every" and value is None:
            continue  # emptied: no samples
        if value is None or not math.isfinite(value) or int(value) != value:
            raise SdloraError(f"{label_of(setting)}: give a whole number")
    if form.lr is None:
        raise SdloraError(f"{label_of('lr')}: give a number such as 1e-4")
    if form.resume and form.overwrite:
        raise SdloraError("tick Resume or Overwrite, not both: pick one")
    if form.resume and not checkpoints(output):
        raise SdloraError(
            f"Resume: the run {name!r} has no checkpoint to continue from; untick Resume"
        )
    if not (form.resume or form.overwrite):
        if (ctx.adapters / f"{name}{paths.ADAPTER_SUFFIX}").exists():
            raise SdloraError(
                f"an adapter named {name!r} is already in the adapters folder; choose another "
                "name, tick Resume to continue its run, or tick Overwrite"
            )
        if checkpoints(output) or (output / f"{name}{paths.ADAPTER_SUFFIX}").exists():
            raise SdloraError(
                f"a run named {name!r} was started before; tick Resume to continue it, "
                "Overwrite to start over, or choose another adapter name"
            )
    steps = int(form.steps)
    settings = dict(
        data_dir=str(data),
        output=str(output),
        name=name,
        base=base,
        rank=int(form.rank),
        nonlinearity=form.nonlinearity,
        steps=steps,
        lr=float(form.lr),
        resolution=int(form.resolution),
        batch_size=int(form.batch_size),
        train_text_encoder=bool(form.train_text_encoder),
        trigger=form.trigger.strip() or None,
        sample_every=int(form.sample_every or 0),
        sample_prompts=[form.sample_prompt] if form.sample_prompt.strip() else [],
        seed=int(form.seed),
        save_every=max(1, steps // 10),
        resume="latest" if form.resume else None,
        overwrite=bool(form.overwrite),
        workers=0,
        tensorboard=False,
    )
    settings.update(more_settings(form.more))
    try:
        config = load_config(None, **settings)
        config.check()
        items, _, _ = discover(config)
        BatchPlan(items, config.batch_size, config.seed, 1, 0).check()
    except SdloraError as err:
        raise SdloraError(ui_words(err, ctx, data)) from None
    return Run(settings, name, output, len(items))


def form_of(settings: dict, ctx: Context) -> tuple[str, Form]:
    """The dataset and form that `checked_run` made `settings` from (to show a run's settings
    on a page that finds it running)."""
    dataset = Path(settings["data_dir"]).relative_to(ctx.datasets).as_posix()
    prompts = settings.get("sample_prompts") or [""]
    form = Form(
        name=settings["name"],
        trigger=settings.get("trigger") or "",
        rank=settings["rank"],
        nonlinearity=settings["nonlinearity"],
        steps=settings["steps"],
        lr=settings["lr"],
        resolution=settings["resolution"],
        batch_size=settings["batch_size"],
        train_text_encoder=settings["train_text_encoder"],
        sample_every=settings["sample_every"],
        sample_prompt=prompts[0],
        seed=settings["seed"],
        more={name: settings[name] for name in MORE_SETTINGS if name in settings},
    )
    return dataset, form


def caption_missing(ctx: Context, dataset: str, model: str, progress=None) -> str:
    """Write IMAGE.txt for the dataset's images that have no caption file, with the captioning
    model `model` (Hub id or folder; `sdlora caption`'s library); a one-line summary."""
    from sdlora.tools.caption import Captioner, caption_folder

    data = dataset_folder(ctx.datasets, dataset)
    if not model.strip():
        raise SdloraError("give a captioning model first (a Hub id or a folder)")
    try:
        captioner = Captioner(model.strip(), device=ctx.engine.device)
        report = caption_folder(data, captioner, progress=progress)
    except SdloraError as err:
        raise SdloraError(ui_words(err, ctx, data)) from None
    kept = f"; {len(report.kept)} already had one" if report.kept else ""
    empty = f"; the model gave no words for {len(report.empty)}" if report.empty else ""
    return f"Captioned {len(report.written)} image(s){kept}{empty}."
