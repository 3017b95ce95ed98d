"""kohya sd-scripts' dataset TOML (`--dataset_config`), read onto sdlora's dataset options.

kohya's file has three levels, each key taken from the lowest that gives it: `[general]`, then
`[[datasets]]` (resolution, batch_size, buckets), then `[[datasets.subsets]]` (one image folder
each: image_dir, num_repeats, class_tokens, is_reg, caption and augmentation settings). sdlora
trains one dataset of one image folder, with at most one folder of class images, and applies
its caption and augmentation settings to every image, so this reads

  one [[datasets]]                       resolution -> resolution, batch_size -> batch_size,
                                         enable_bucket -> buckets (kohya's default: off)
  one subset without is_reg              image_dir -> DATA_DIR, num_repeats -> repeats,
                                         class_tokens -> caption (for images without a .txt),
                                         keep_tokens -> keep_tags, shuffle_caption ->
                                         shuffle_tags, flip_aug -> flip, caption_dropout_rate ->
                                         caption_dropout, random_crop -> crop random
  at most one subset with is_reg = true  image_dir -> reg_data, class_tokens -> class_prompt

and refuses, naming the key and the file, what it cannot honour: a second dataset or training
folder, caption files other than .txt, metadata_file, bucket limits, color_aug, and so on.
Relative paths are taken from the file's folder (as sdlora's own TOML), not the working folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sdlora.errors import SdloraError

# kohya key -> sdlora setting, for the training subset (taken from subset, dataset or general)
SUBSET_KEYS = {
    "num_repeats": "repeats",
    "keep_tokens": "keep_tags",
    "shuffle_caption": "shuffle_tags",
    "flip_aug": "flip",
    "caption_dropout_rate": "caption_dropout",
    "random_crop": "crop",
}
DATASET_KEYS = {"resolution": "resolution", "batch_size": "batch_size", "enable_bucket": "buckets"}
# keys that change nothing at these values (kohya's defaults), and keys that only speed kohya up
NEUTRAL = {
    "color_aug": False,
    "caption_tag_dropout_rate": 0,
    "caption_dropout_every_n_epochs": 0,
    "caption_prefix": "",
    "caption_suffix": "",
    "bucket_reso_steps": 64,  # sdlora's sides are multiples of 64
}
SPEED_ONLY = ("cache_info",)
# kohya's values where a file gives none (sdlora's own defaults differ for these)
KOHYA_DEFAULTS = {"keep_tags": 0, "buckets": False}
# on the class-image subset: what sdlora reads there
REG_KEYS = ("image_dir", "is_reg", "class_tokens", "num_repeats", "caption_extension")


def read_dataset_config(path: str | Path) -> dict[str, Any]:
    """kohya's dataset TOML at `path` as sdlora settings (TrainConfig field -> value);
    SdloraError(setting="dataset_config") naming the key and the file for anything else."""
    from sdlora.train.config import read_toml_file

    path = Path(path)
    raw = read_toml_file(path, "--dataset-config")
    folder = path.resolve().parent

    def refuse(message: str) -> SdloraError:
        return SdloraError(f"{path}: {message}", setting="dataset_config")

    for key in raw:
        if key not in ("general", "datasets"):
            raise refuse(
                f"unknown table or key {key!r}; kohya's file has [general] and [[datasets]]"
            )
    general = raw.get("general", {})
    datasets = raw.get("datasets", [])
    if not isinstance(general, dict) or not isinstance(datasets, list):
        raise refuse("[general] must be a table and [[datasets]] an array of tables")
    if len(datasets) != 1:
        raise refuse(
            f"has {len(datasets)} [[datasets]]; sdlora trains one dataset a run (one resolution "
            "and batch size): keep one"
        )
    dataset = datasets[0]
    subsets = dataset.get("subsets", [])
    if not subsets:
        raise refuse("[[datasets.subsets]] is missing; give one with image_dir")
    train = [s for s in subsets if not s.get("is_reg", False)]
    reg = [s for s in subsets if s.get("is_reg", False)]
    if len(train) != 1:
        dirs = ", ".join(str(s.get("image_dir")) for s in train) or "none"
        raise refuse(
            f"has {len(train)} training subsets ({dirs}) in [[datasets.subsets]]; sdlora trains "
            "one image folder: put the images under one folder (N_name subfolders repeat theirs "
            "N times) and give it as image_dir"
        )
    if len(reg) > 1:
        raise refuse(f"has {len(reg)} is_reg subsets; sdlora takes one folder of class images")

    def level_of(key: str, subset: dict) -> tuple[str, Any] | None:
        for where, table in (("[[datasets.subsets]]", subset), ("[[datasets]]", dataset)):
            if key in table:
                return where, table[key]
        return ("[general]", general[key]) if key in general else None

    subset = train[0]
    values: dict[str, Any] = dict(KOHYA_DEFAULTS)
    keys = {k for table in (general, dataset, subset) for k in table} - {"subsets"}
    for key in sorted(keys):
        where, value = level_of(key, subset)
        if key in DATASET_KEYS:
            if where == "[[datasets.subsets]]":
                raise refuse(f"{key} is a [[datasets]] setting; move it out of the subset")
            values[DATASET_KEYS[key]] = dataset_value(key, value, refuse)
        elif key in SUBSET_KEYS:
            values[SUBSET_KEYS[key]] = (
                "random"
                if key == "random_crop" and value
                else ("center" if key == "random_crop" else value)
            )
        elif key == "image_dir":
            if where != "[[datasets.subsets]]":
                raise refuse(f"image_dir belongs in [[datasets.subsets]] (found in {where})")
            values["data_dir"] = local_path(value, folder, "image_dir", refuse)
        elif key == "class_tokens":
            values["caption"] = text_value(key, value, refuse)
        elif key == "caption_extension":
            check_caption_extension(value, where, refuse)
        elif key in ("is_reg", *SPEED_ONLY):
            pass
        elif key in NEUTRAL and value == NEUTRAL[key]:
            pass
        else:
            raise refuse(f"{key} ({where}) is not supported by sdlora; remove it")
    if reg:
        subset = reg[0]
        for key in subset:
            if key not in REG_KEYS:
                raise refuse(
                    f"{key} on the is_reg subset is not supported: sdlora trains class images "
                    "center-cropped, unflipped, with their captions as written; remove it"
                )
        if "image_dir" not in subset:
            raise refuse("the is_reg subset has no image_dir; give the class images' folder")
        values["reg_data"] = local_path(subset["image_dir"], folder, "image_dir", refuse)
        if "class_tokens" in subset:
            values["class_prompt"] = text_value("class_tokens", subset["class_tokens"], refuse)
        if subset.get("num_repeats", 1) != 1:
            raise refuse(
                "num_repeats on the is_reg subset: sdlora draws class images beside every "
                "batch, so they need no repeats; remove it"
            )
        where = level_of("caption_extension", subset)
        if where is not None:
            check_caption_extension(where[1], where[0], refuse)
    return values


def dataset_value(key: str, value: Any, refuse) -> Any:
    """A [[datasets]] value in sdlora's terms: resolution [w, h] must be square."""
    if key == "resolution" and isinstance(value, list):
        if len(value) != 2 or value[0] != value[1]:
            raise refuse(
                f"resolution {value} is not square; sdlora takes one side (about N² pixels, "
                "buckets keep each image's aspect ratio): give resolution = N"
            )
        return value[0]
    return value


def text_value(key: str, value: Any, refuse) -> str:
    if not isinstance(value, str):
        raise refuse(f"{key} must be text (got {value!r})")
    return value


def local_path(value: Any, folder: Path, key: str, refuse) -> str:
    if not isinstance(value, str) or not value:
        raise refuse(f"{key} must be a folder (got {value!r})")
    return os.path.normpath(folder / value)


def check_caption_extension(value: Any, where: str, refuse) -> None:
    if value not in (".txt", "txt"):
        raise refuse(
            f"caption_extension {value!r} ({where}) is not supported: sdlora reads captions "
            "from IMAGE.txt; rename the caption files and give '.txt'"
        )
