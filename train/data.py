"""Training data: find images, read captions, group by aspect ratio, plan the batch order.

Everything random here is derived from (seed, what, where) rather than drawn from a shared
generator, so the batch at micro-step k is the same whether a run got there in one go or was
resumed from a checkpoint, and the same in a worker process as in the main one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePath, PureWindowsPath

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from sdlora.errors import SdloraError
from sdlora.train.config import SIDE_MULTIPLE, TrainConfig

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
MAX_REPEATS = 10_000  # kohya users write 1-100; far beyond this an epoch never ends
REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")  # kohya: "10_mystyle" repeats its images 10 times
METADATA_FILE = "metadata.jsonl"  # Hugging Face imagefolder: {"file_name": ..., "text": ...}
# images scaled up by this factor or more to fill their bucket are named in a warning: they
# cost the time of full-size images and add no detail (e.g. 128 px pictures at --resolution 512)
ENLARGE_WARNING = 2.0


@dataclass
class ImageItem:
    """One training image: where it is, its caption, how often it repeats, its bucket."""

    path: Path
    caption: str  # without the trigger word, which is added per draw
    repeats: int
    size: tuple[int, int]  # (width, height) after EXIF rotation
    bucket: tuple[int, int] = (0, 0)  # (width, height) it is trained at


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, stable across processes and Python runs."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---------------------------------------------------------------- images


def load_rgb(path: Path) -> Image.Image:
    """Open an image as 8-bit RGB: EXIF rotation applied, alpha put on white, 16-bit scaled."""
    return load_rgb_alpha(path)[0]


def load_rgb_alpha(path: Path) -> tuple[Image.Image, Image.Image | None]:
    """`load_rgb`, and the image's alpha channel as an 8-bit "L" image (None without one)."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit grayscale: PIL's convert() would clip at 255, so scale by the range
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F" and arr.max() <= 1.0:
            top = 1.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    alpha = None
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        alpha = rgba.getchannel("A")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB"), alpha


def check_image(path: Path) -> tuple[int, int]:
    """Decode the whole file (truncation shows only then); return (width, height) upright.

    JPEGs decode at 1/8 scale, which still reads every byte, only faster.
    """
    with Image.open(path) as img:
        width, height = img.size
        turned = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientation: 90° turns
        img.draft("RGB", (1, 1))
        img.load()
    return (height, width) if turned else (width, height)


def read_check(path: Path) -> tuple[int, int] | str:
    """(width, height) of a readable image, else why it cannot be used."""
    if not path.exists():
        return f"a link to {os.readlink(path)}, which does not exist"
    try:
        return check_image(path)
    except UnidentifiedImageError:
        return "empty file" if path.stat().st_size == 0 else "not an image PIL can read"
    except Exception as err:  # truncated or damaged data: PIL raises many kinds
        first = str(err).splitlines()[0] if str(err) else "damaged"
        return f"{type(err).__name__}: {first}"


@dataclass
class Found:
    """What a walk over the data folder found."""

    images: list[Path]  # files with an image suffix, sorted (links to missing files included)
    metadata: list[Path]  # every metadata.jsonl, sorted
    skipped_links: list[tuple[Path, str]]  # folder links not followed, and why


def find_image_files(data_dir: Path, exclude: tuple[Path, ...] = ()) -> Found:
    """Image and metadata files under `data_dir`; hidden files/folders and the real folders
    `exclude` (resolved paths) skipped.

    Links to folders are followed, and each real folder is read once: a link to a folder that is
    read anyway (under its own name, through an earlier link, or one holding the link: a loop)
    is skipped and listed. Real folders keep their own names, so they are walked first.
    """

    def wanted(path: str) -> bool:
        if os.path.basename(path).startswith("."):
            return False
        real = Path(os.path.realpath(path))
        return not any(real.is_relative_to(folder) for folder in exclude)

    home: dict[str, str] = {}  # real folder -> the path it is read under
    for root, dirs, _ in os.walk(data_dir):  # does not enter links
        dirs[:] = [d for d in dirs if wanted(os.path.join(root, d))]
        home[os.path.realpath(root)] = root
    images, metadata, skipped = [], [], []
    for root, dirs, files in os.walk(data_dir, followlinks=True):
        here = os.path.realpath(root)
        kept = []
        for name in sorted(dirs):
            path = os.path.join(root, name)
            if not wanted(path):
                continue
            real = os.path.realpath(path)
            if Path(here).is_relative_to(real):
                skipped.append((Path(path), f"leads to {real}, which holds it (a loop)"))
            elif home.setdefault(real, path) != path:
                skipped.append((Path(path), f"leads to {real}, read already as {home[real]}"))
            else:
                kept.append(name)
        dirs[:] = kept
        for name in files:
            path = os.path.join(root, name)
            if name.startswith("."):
                continue
            if name == METADATA_FILE:
                metadata.append(Path(path))
            elif os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES and (
                os.path.isfile(path) or os.path.islink(path)
            ):
                images.append(Path(path))
    return Found(sorted(images), sorted(metadata), skipped)


def repeats_for(path: Path, data_dir: Path) -> int:
    """N from the nearest folder named `N_name` between `data_dir` and the image, else 1."""
    folders = path.relative_to(data_dir).parts[:-1]
    for depth in range(len(folders), 0, -1):
        match = REPEATS_FOLDER.match(folders[depth - 1])
        if match:
            repeats = int(match.group(1))
            if repeats > MAX_REPEATS:
                raise SdloraError(
                    f"{data_dir.joinpath(*folders[:depth])}: the folder name asks for {repeats} "
                    f"repeats; use at most {MAX_REPEATS} (e.g. 10_{match.group(2)})"
                )
            return max(1, repeats)
    return 1


# ---------------------------------------------------------------- captions


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise SdloraError(f"{path}: caption file is not UTF-8 text; save it as UTF-8") from None


def read_metadata(files: list[Path], data_dir: Path) -> dict[Path, tuple[str, str]]:
    """Real image path -> (caption, "metadata.jsonl:line") from Hugging Face imagefolder files.

    file_name is relative to its metadata.jsonl and must stay inside `data_dir`; the caption is
    "text" (or "caption") and must be a string. Lines that break these rules are errors, as in
    Hugging Face datasets, rather than captions quietly lost.
    """
    captions: dict[Path, tuple[str, str]] = {}
    for meta in files:
        for number, line in enumerate(read_text(meta).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise SdloraError(f"{meta}:{number}: not a JSON object; fix the line") from None
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                raise SdloraError(f'{meta}:{number}: each line needs a "file_name" string')
            name = row["file_name"]
            target = os.path.abspath(meta.parent / name)  # ".." taken away as written
            if (
                os.path.isabs(name)
                or PureWindowsPath(name).anchor
                or not Path(target).is_relative_to(os.path.abspath(data_dir))
            ):
                raise SdloraError(
                    f"{meta}:{number}: file_name {name!r} is outside the data folder; give the "
                    f"image's path relative to {meta.parent}, e.g. {PurePath(name).name!r}"
                )
            key = "text" if "text" in row else "caption" if "caption" in row else None
            if key is None:
                raise SdloraError(
                    f'{meta}:{number}: no "text" on this line (it has {", ".join(row)}); '
                    'give the caption as "text": "..."'
                )
            if not isinstance(row[key], str):
                raise SdloraError(
                    f'{meta}:{number}: "{key}" is {json.dumps(row[key])[:40]}, not a string; '
                    f'write the caption in quotes, e.g. "{key}": "a red circle"'
                )
            captions[Path(os.path.realpath(target))] = (row[key].strip(), f"{meta}:{number}")
    return captions


def caption_for(path: Path, metadata: dict[Path, tuple[str, str]], default: str | None) -> str:
    """<image>.txt, else metadata.jsonl, else `default`, else the file name (underscores as spaces)."""
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        return " ".join(read_text(sidecar).split())
    if path.resolve() in metadata:
        return metadata[path.resolve()][0]
    if default is not None:
        return default
    return " ".join(path.stem.replace("_", " ").split())


def with_trigger(caption: str, trigger: str | None) -> str:
    """Put the trigger word in front, unless the caption already holds it as a word."""
    if not trigger or re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def draw_caption(item: ImageItem, config: TrainConfig, rng: random.Random) -> str:
    """The caption one draw of `item` trains with: dropout, tag shuffle, then the trigger."""
    if config.caption_dropout and rng.random() < config.caption_dropout:
        return ""
    caption = item.caption
    if config.shuffle_tags:
        tags = [t.strip() for t in caption.split(",") if t.strip()]
        kept, rest = tags[: config.keep_tags], tags[config.keep_tags :]
        rng.shuffle(rest)
        caption = ", ".join(kept + rest)
    return with_trigger(caption, config.trigger)


def dataset_folders(
    items: list[ImageItem], data_dir: Path, trigger: str | None
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """kohya's dataset metadata: per image folder (relative to `data_dir`; its own name for the
    images at the top) the caption tags with their counts (`ss_tag_frequency`: each caption
    split at commas, trigger word included, once per image) and `{"n_repeats", "img_count"}`
    (`ss_dataset_dirs`)."""
    tags: dict[str, dict[str, int]] = {}
    dirs: dict[str, dict[str, int]] = {}
    for item in items:
        name = folder_name(item.path.parent, data_dir)
        counts = tags.setdefault(name, {})
        for tag in with_trigger(item.caption, trigger).split(","):
            if tag.strip():
                counts[tag.strip()] = counts.get(tag.strip(), 0) + 1
        folder = dirs.setdefault(name, {"n_repeats": item.repeats, "img_count": 0})
        folder["img_count"] += 1
    return tags, dirs


def folder_name(folder: Path, data_dir: Path) -> str:
    """`folder` relative to `data_dir` (as given or resolved), `data_dir`'s own name for itself;
    the folder's name where it lies elsewhere (a link out of the data folder)."""
    for root in (data_dir, data_dir.resolve()):
        if folder == root:
            return root.name
        if folder.is_relative_to(root):
            return folder.relative_to(root).as_posix()
    return folder.name


def possible_captions(items: list[ImageItem], config: TrainConfig) -> list[str]:
    """Every caption a draw can give when tags are not shuffled (for the text cache)."""
    captions = {with_trigger(item.caption, config.trigger) for item in items}
    if config.caption_dropout:
        captions.add("")
    return sorted(captions)


# ---------------------------------------------------------------- buckets


def make_buckets(resolution: int, multiple: int = SIDE_MULTIPLE) -> list[tuple[int, int]]:
    """(width, height) pairs with sides multiples of `multiple` and about resolution² pixels.

    Sides run from half to twice the resolution (aspect ratios up to 4:1), as kohya's buckets.
    """
    area = resolution * resolution
    low = max(multiple, resolution // 2 // multiple * multiple)
    high = resolution * 2
    buckets = {(resolution, resolution)}
    for width in range(low, high + 1, multiple):
        height = min(high, area // width // multiple * multiple)
        if height >= low:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log space)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def enlargement(item: ImageItem) -> float:
    """How much `item` is scaled to cover its bucket (> 1: enlarged)."""
    return max(item.bucket[0] / item.size[0], item.bucket[1] / item.size[1])


def enlarged_items(items: list[ImageItem], factor: float = ENLARGE_WARNING) -> list[ImageItem]:
    """Items scaled up by `factor` or more to fill their bucket."""
    return [item for item in items if enlargement(item) >= factor]


def placement(
    size: tuple[int, int], bucket: tuple[int, int], crop: str, rng: random.Random | None
) -> tuple[tuple[int, int], int, int]:
    """(scaled (width, height), left, top): the image scaled to cover the bucket, and where the
    bucket's window sits in it (center, or drawn from `rng` for a random crop)."""
    width, height = bucket
    scale = max(width / size[0], height / size[1])
    scaled = (max(width, round(size[0] * scale)), max(height, round(size[1] * scale)))
    if crop == "random" and rng is not None:
        left, top = rng.randint(0, scaled[0] - width), rng.randint(0, scaled[1] - height)
    else:
        left, top = (scaled[0] - width) // 2, (scaled[1] - height) // 2
    return scaled, left, top


def to_bucket(
    img: Image.Image, bucket: tuple[int, int], crop: str, flip: bool, rng: random.Random | None
) -> torch.Tensor:
    """Resize to cover the bucket, crop, maybe flip; return (3, H, W) in [-1, 1]."""
    return to_bucket_cropped(img, bucket, crop, flip, rng)[0]


def to_bucket_cropped(
    img: Image.Image, bucket: tuple[int, int], crop: str, flip: bool, rng: random.Random | None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """`to_bucket`, and the (top, left) of the crop in the scaled image as the pixels show it:
    mirrored when the image was flipped (SDXL's crop conditioning, train/condition.py)."""
    pixels, _, crop_at = to_bucket_masked(img, None, bucket, crop, flip, rng)
    return pixels, crop_at


def to_bucket_masked(
    img: Image.Image,
    mask: Image.Image | None,
    bucket: tuple[int, int],
    crop: str,
    flip: bool,
    rng: random.Random | None,
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
    """`to_bucket_cropped`, and the mask ("L", the image's size) given the same resize, crop
    and flip: (3, H, W) pixels in [-1, 1], (1, H, W) mask in [0, 1] or None, (top, left)."""
    width, height = bucket
    size, left, top = placement(img.size, bucket, crop, rng)
    flipped = flip and rng is not None and rng.random() < 0.5
    box = (left, top, left + width, top + height)

    def place(image: Image.Image) -> Image.Image:
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS)
        image = image.crop(box)
        return ImageOps.mirror(image) if flipped else image

    if flipped:
        left = size[0] - width - left
    pixels = torch.from_numpy(np.asarray(place(img), dtype=np.float32).copy())  # (H, W, 3)
    weights = None
    if mask is not None:
        weights = torch.from_numpy(np.asarray(place(mask), dtype=np.float32).copy())[None] / 255
    return pixels.permute(2, 0, 1) / 127.5 - 1.0, weights, (top, left)


def mask_file(path: Path, data_dir: Path, mask_dir: Path) -> Path | None:
    """The mask of image `path` in `mask_dir`: the same relative path and name, any image
    suffix (its own first); None if there is none."""
    relative = path.relative_to(data_dir)
    for suffix in (path.suffix, *sorted(IMAGE_SUFFIXES)):
        candidate = mask_dir / relative.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def load_mask(path: Path, size: tuple[int, int]) -> Image.Image:
    """A mask image as 8-bit "L" (EXIF rotation applied); it must have the image's `size`."""
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError) as err:
        raise SdloraError(f"{path}: the mask cannot be read ({err})", setting="mask_data") from None
    if img.size != size:
        raise SdloraError(
            f"{path}: the mask is {img.size[0]}x{img.size[1]} and its image {size[0]}x{size[1]}; "
            "give each mask its image's size",
            setting="mask_data",
        )
    return img.convert("L")


def size_ids(item: ImageItem) -> tuple[int, int]:
    """(height, width) of the image before scaling: SDXL's "original size" condition."""
    return item.size[1], item.size[0]


def center_crop(item: ImageItem) -> tuple[int, int]:
    """(top, left) of a center crop into the item's bucket, without reading the image."""
    _, left, top = placement(item.size, item.bucket, "center", None)
    return top, left


# ---------------------------------------------------------------- discovery


def discover(
    config: TrainConfig,
) -> tuple[list[ImageItem], list[tuple[Path, str]], list[str]]:
    """Readable images with captions and buckets, (path, reason) for every skipped file, and
    warnings about data that is not used as it is (one sentence per kind, with a first example).

    Raises SdloraError when the folder is missing, holds no image, or no readable one.
    `config.resolution` must be set (`train()` fills a None from the base: setup.base_resolution).
    """
    if config.resolution is None:
        raise SdloraError("the training resolution is not set; give --resolution (e.g. 512)")
    data_dir = Path(config.data_dir)
    if not data_dir.is_dir():
        raise SdloraError(f"{data_dir}: no such folder; give the folder of training images")
    exclude = [Path(config.output).resolve()] if config.output else []
    exclude += [Path(os.path.realpath(f)) for f in set_apart(config)]
    found = find_image_files(data_dir, exclude=tuple(exclude))
    files = found.images
    if not files:
        raise SdloraError(
            f"{data_dir}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, "
            "in subfolders too)"
        )
    metadata = read_metadata(found.metadata, data_dir)
    buckets = make_buckets(config.resolution) if config.buckets else [(config.resolution,) * 2]
    items, skipped = [], []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL frees the GIL
        checks = pool.map(read_check, files)
        for path, size in zip(files, checks, strict=True):
            if isinstance(size, str):
                skipped.append((path, size))
                continue
            items.append(
                ImageItem(
                    path=path,
                    caption=caption_for(path, metadata, config.caption),
                    repeats=repeats_for(path, data_dir) * config.repeats,
                    size=size,
                    bucket=nearest_bucket(size, buckets),
                )
            )
    if not items:
        raise SdloraError(
            f"{data_dir}: none of the {len(files)} image files could be read "
            f"(e.g. {skipped[0][0].name}: {skipped[0][1]})"
        )
    return items, skipped, data_warnings(found, metadata)


def set_apart(config: TrainConfig) -> list[str]:
    """--reg-data and --validation-data folders inside DATA_DIR: their images are class images
    or held-out images, so the training images leave them out (an image trained on both ways
    would teach the class the subject, or validate on what was trained)."""
    data_dir = os.path.realpath(config.data_dir)
    return [
        folder
        for folder in (config.reg_data, config.validation_data)
        if folder
        and os.path.realpath(folder) != data_dir
        and Path(os.path.realpath(folder)).is_relative_to(data_dir)
    ]


def data_warnings(found: Found, metadata: dict[Path, tuple[str, str]]) -> list[str]:
    """One warning per kind of data left out: folder links not followed, unused metadata lines."""
    warnings = []
    if found.skipped_links:
        path, why = found.skipped_links[0]
        warnings.append(
            f"{len(found.skipped_links)} linked folder(s) not read again, so that each folder "
            f"is read once (first: {path}: {why})"
        )
    images = {path.resolve() for path in found.images}
    unused = [(where, path) for path, (_, where) in metadata.items() if path not in images]
    if unused:
        where, path = unused[0]
        warnings.append(
            f"{len(unused)} {METADATA_FILE} line(s) name no image in the data folder, so their "
            f"captions are unused (first: {where}: {path.name} not found)"
        )
    return warnings


# ---------------------------------------------------------------- batch order


class BatchPlan:
    """Which items form micro-batch k on process `rank` of `world`.

    Each epoch: every item `repeats` times, shuffled within its bucket, cut into batches of
    `batch_size` (a bucket's last batch may be smaller), batches shuffled, then dealt out to
    processes in turn. Every process gets the same number of batches per epoch.
    """

    def __init__(
        self, items: list[ImageItem], batch_size: int, seed: int, world: int = 1, rank: int = 0
    ):
        self.items, self.batch_size, self.seed = items, batch_size, seed
        self.world, self.rank = world, rank
        self.by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(items):
            self.by_bucket.setdefault(item.bucket, []).extend([index] * item.repeats)
        self.images_per_epoch = sum(len(v) for v in self.by_bucket.values())
        batches = sum(math.ceil(len(v) / batch_size) for v in self.by_bucket.values())
        self.per_process = batches // world  # micro-batches per process per epoch
        self._epoch: tuple[int, list[list[int]]] | None = None

    def check(self) -> None:
        """Raise when the batch size or process count cannot work with this data."""
        if self.batch_size > self.images_per_epoch:
            raise SdloraError(
                f"{{batch_size}} {self.batch_size} is larger than the {self.images_per_epoch} "
                "training images (with repeats); lower it"
            )
        if self.per_process < 1:
            raise SdloraError(
                f"{self.images_per_epoch} images in batches of {self.batch_size} do not give "
                f"one batch to each of {self.world} processes; lower --batch-size or add images"
            )

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = random.Random(derived_seed(self.seed, "order", epoch))
            batches = []
            for bucket in sorted(self.by_bucket):
                indices = list(self.by_bucket[bucket])
                rng.shuffle(indices)
                batches += [
                    indices[i : i + self.batch_size]
                    for i in range(0, len(indices), self.batch_size)
                ]
            rng.shuffle(batches)
            self._epoch = (epoch, batches)
        return self._epoch[1]

    def micro_batch(self, k: int) -> tuple[int, list[int]]:
        """(epoch, item indices) of this process's k-th micro-batch since the start."""
        epoch, position = divmod(k, self.per_process)
        return epoch, self.epoch_batches(epoch)[position * self.world + self.rank]


class MicroBatches(torch.utils.data.Dataset):
    """Map-style view of the plan for a DataLoader: index k -> micro-batch k.

    Returns {"indices": (B,) item indices, "captions": [str] * B, "pixels": (B, 3, H, W) or None,
    "sizes": (B, 2) original (height, width), "crops": (B, 2) (top, left) of each crop}.
    Pixels are left out when latents come from the cache.
    """

    def __init__(self, plan: BatchPlan, config: TrainConfig, with_pixels: bool):
        self.plan, self.config, self.with_pixels = plan, config, with_pixels
        # --masked-loss: item index -> its mask file (--mask-data), each image checked now
        self.mask_files: dict[int, Path] = {}
        self._center_masks: dict[int, torch.Tensor] = {}  # cached latents: their masks, uint8
        if config.masked_loss and config.mask_data:
            data_dir, mask_dir = Path(config.data_dir), Path(config.mask_data)
            if not mask_dir.is_dir():
                raise SdloraError(f"{mask_dir}: no such folder", setting="mask_data")
            missing = []
            for index, item in enumerate(plan.items):
                found = mask_file(item.path, data_dir, mask_dir)
                if found is None:
                    missing.append(item.path)
                else:
                    self.mask_files[index] = found
            if missing:
                first = mask_dir / missing[0].relative_to(data_dir)
                raise SdloraError(
                    f"has no mask for {len(missing)} of the {len(plan.items)} images (first: "
                    f"{first.with_suffix('.png')}); give every image one",
                    setting="mask_data",
                )

    def __len__(self) -> int:
        return 2**62  # the stream of micro-batches is endless; the sampler picks the range

    def __getitem__(self, k: int) -> dict:
        _, indices = self.plan.micro_batch(k)
        rng = random.Random(derived_seed(self.config.seed, "augment", self.plan.rank, k))
        items = [self.plan.items[i] for i in indices]
        captions = [draw_caption(item, self.config, rng) for item in items]
        pixels, masks = None, None
        if self.with_pixels:
            loaded = [self.masked(i, rng) for i in indices]
            pixels = torch.stack([p for p, _, _ in loaded])
            crops = [crop for _, _, crop in loaded]
            if self.config.masked_loss:
                masks = torch.stack([m for _, m, _ in loaded])
        else:  # cached latents: center crops, no flips
            crops = [center_crop(item) for item in items]
            if self.config.masked_loss:  # the masks of the cached latents, kept after one read
                masks = torch.stack([self.center_mask(i) for i in indices])
        batch = {
            "indices": torch.tensor(indices),
            "captions": captions,
            "pixels": pixels,
            "sizes": torch.tensor([size_ids(item) for item in items]),
            "crops": torch.tensor(crops),
        }
        if masks is not None:
            batch["masks"] = masks  # (B, 1, H, W) in [0, 1]
        return batch

    def masked(
        self, index: int, rng: random.Random | None
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Item `index` in its bucket: (3, H, W) pixels, (1, H, W) mask (all ones without
        --masked-loss or an alpha channel), (top, left) of the crop; one draw of `rng` as
        `cropped` makes."""
        item = self.plan.items[index]
        try:
            img, alpha = load_rgb_alpha(item.path)
        except (OSError, ValueError, SyntaxError) as err:
            raise SdloraError(f"{item.path}: could not be read any more ({err})") from None
        mask = None
        if self.config.masked_loss:
            mask = alpha
            if index in self.mask_files:
                mask = load_mask(self.mask_files[index], img.size)
            if mask is None:
                mask = Image.new("L", img.size, 255)
        pixels, weights, crop = to_bucket_masked(
            img, mask, item.bucket, self.config.crop, self.config.flip, rng
        )
        if weights is None:
            weights = torch.ones((1, *pixels.shape[1:]))
        return pixels, weights, crop

    def center_mask(self, index: int) -> torch.Tensor:
        """(1, H, W) mask of item `index` center-cropped, unflipped (as its cached latent)."""
        if index not in self._center_masks:
            weights = self.masked(index, None)[1]
            self._center_masks[index] = (weights * 255).round().to(torch.uint8)  # 1 byte/pixel
        return self._center_masks[index].float() / 255

    def pixels(self, item: ImageItem, rng: random.Random | None) -> torch.Tensor:
        return self.cropped(item, rng)[0]

    def cropped(
        self, item: ImageItem, rng: random.Random | None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """(3, H, W) pixels of `item` in its bucket and the (top, left) of the crop."""
        try:
            img = load_rgb(item.path)
        except (OSError, ValueError, SyntaxError) as err:
            raise SdloraError(f"{item.path}: could not be read any more ({err})") from None
        return to_bucket_cropped(img, item.bucket, self.config.crop, self.config.flip, rng)
