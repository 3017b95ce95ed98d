"""Regularization (prior-preservation) images: class images trained beside the instance images.

DreamBooth (Ruiz et al. 2023, eq. 2) adds λ·‖ε̂(x_pr, c_pr) − ε‖² over images of the class
(`a photo of a dog`) to the loss on the user's images, so the adapter learns the subject without
turning every dog into it; kohya sd-scripts calls them regularization images, in folders named
`N_class` (N repeats). Here every micro-batch of B instance images gets B class images, drawn in a
seeded order that cycles through all of them, resized and center-cropped into the instance
batch's bucket. One UNet forward runs on the 2B images, and the step's loss is
instance + prior_loss_weight × prior, each the mean over its half (train/step.py).

A class image's caption: its .txt or metadata.jsonl entry, else --class-prompt, else the name
of its `N_class` folder (kohya's rule), else its file name.

With --reg-generate N, a folder holding fewer than N class images is filled up before training
with images the base itself draws from --class-prompt (`generate_missing`): image i is
`sdlora-generated/class-<i>.png`, drawn with a seed derived from i at the base's recommended
settings and written whole or not at all, so a second run finds them and draws nothing.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sdlora.bases.generate import SCHEDULERS, GenerateSettings, generate, save_png
from sdlora.errors import SdloraError
from sdlora.train.config import TrainConfig
from sdlora.train.data import (
    REPEATS_FOLDER,
    ImageItem,
    derived_seed,
    discover,
    find_image_files,
    load_rgb,
    size_ids,
    to_bucket_cropped,
)

GENERATED = "sdlora-generated"  # the subfolder of --reg-data holding class images the base drew
logger = logging.getLogger(__name__)


def check_reg_folder(config: TrainConfig) -> None:
    """Refuse a --reg-data folder that is DATA_DIR or holds it: its training images would be
    drawn as class images too. (One inside DATA_DIR is left out of the training images:
    data.set_apart.)"""
    if not config.reg_data or not config.data_dir:
        return
    reg = os.path.realpath(config.reg_data)
    if Path(os.path.realpath(config.data_dir)).is_relative_to(reg):
        raise SdloraError(
            f"{config.reg_data} holds the training images of {config.data_dir}, which would "
            "train as class images too; give the class images a folder of their own (one "
            "inside DATA_DIR is fine: its images then train only as class images)",
            setting="reg_data",
        )


class PriorImages:
    """The class images of a run and which of them go with micro-batch k."""

    def __init__(
        self, items: list[ImageItem], captions: list[str], seed: int, world: int, rank: int
    ):
        # each image as often as its folder's repeat count, like the instance images
        self.images = [(item, caption) for item, caption in zip(items, captions, strict=True)]
        self.order = [i for i, (item, _) in enumerate(self.images) for _ in range(item.repeats)]
        self.seed, self.world, self.rank = seed, world, rank
        self._cycle: tuple[int, list[int]] | None = None  # (pass, its shuffled order)

    @classmethod
    def find(cls, config: TrainConfig, world: int = 1, rank: int = 0) -> PriorImages:
        """The images of --reg-data, checked like the training images."""
        folder = Path(config.reg_data)
        try:
            items, _, _ = discover(replace(config, data_dir=str(folder), caption=None))
        except SdloraError as err:
            raise SdloraError(f"--reg-data: {err}") from None
        captions = [class_caption(item, folder, config.class_prompt) for item in items]
        return cls(items, captions, config.seed, world, rank)

    @property
    def captions(self) -> list[str]:
        """Every caption a class image trains with (for the text cache)."""
        return sorted({caption for _, caption in self.images})

    def cycle_order(self, cycle: int) -> list[int]:
        """The seeded order of pass `cycle` through the class images (kept for the current one)."""
        if self._cycle is None or self._cycle[0] != cycle:
            order = list(self.order)
            random.Random(derived_seed(self.seed, "prior order", cycle)).shuffle(order)
            self._cycle = (cycle, order)
        return self._cycle[1]

    def draw(self, k: int, bucket: tuple[int, int], count: int) -> Drawn:
        """The `count` class images of micro-batch k, center-cropped into `bucket`."""
        pixels, captions, sizes, crops = [], [], [], []
        for j in range(count):
            position = (k * self.world + self.rank) * count + j
            cycle, offset = divmod(position, len(self.order))
            item, caption = self.images[self.cycle_order(cycle)[offset]]
            image, crop = to_bucket_cropped(load_rgb(item.path), bucket, "center", False, None)
            pixels.append(image)
            captions.append(caption)
            sizes.append(size_ids(item))
            crops.append(crop)
        return Drawn(torch.stack(pixels), captions, torch.tensor(sizes), torch.tensor(crops))


@dataclass
class Drawn:
    """Class images for one micro-batch: (B, 3, H, W) pixels in [-1, 1], captions, and each
    image's original (height, width) and crop (top, left) for SDXL's size ids."""

    pixels: torch.Tensor
    captions: list[str]
    sizes: torch.Tensor  # (B, 2)
    crops: torch.Tensor  # (B, 2)


def class_caption(item: ImageItem, folder: Path, class_prompt: str | None) -> str:
    """Caption of a class image (see the module docstring for the order of the rules)."""
    if item.caption != " ".join(item.path.stem.replace("_", " ").split()):
        return item.caption  # from its .txt or metadata.jsonl
    if class_prompt:
        return class_prompt
    for part in reversed(item.path.relative_to(folder).parts[:-1]):
        match = REPEATS_FOLDER.match(part)
        if match:
            return match.group(2).replace("_", " ")
    return item.caption


def generate_missing(pipe, config: TrainConfig, accelerator) -> int:
    """Draw class images with the base `pipe` until --reg-data holds --reg-generate of them;
    return how many were drawn (see the module docstring). The main process draws, the
    others wait."""
    folder = Path(config.reg_data)
    if folder.exists() and not folder.is_dir():
        raise SdloraError(f"--reg-data {folder} is a file; give a folder of class images")
    have = len(find_image_files(folder).images) if folder.is_dir() else 0
    missing = max(0, config.reg_generate - have)
    if missing and accelerator.is_main_process:
        out = folder / GENERATED
        out.mkdir(parents=True, exist_ok=True)
        todo = [i for i in range(config.reg_generate) if not class_image(out, i).exists()]
        todo = todo[:missing]
        logger.info(
            "drawing %d class image(s) of %r with the base into %s",
            len(todo),
            config.class_prompt,
            out,
        )
        scheduler = pipe.scheduler  # generate() may switch it; the run's stays as it was
        name = next((n for n, c in SCHEDULERS.items() if type(scheduler) is c), "pndm")
        try:
            for i in todo:
                settings = GenerateSettings(
                    prompt=config.class_prompt,
                    seed=derived_seed(config.seed, "class image", i),
                    scheduler=name,
                )
                (image,) = generate(pipe, settings)
                save_png(image, class_image(out, i), settings)
        finally:
            pipe.scheduler = scheduler
    accelerator.wait_for_everyone()
    return len(todo) if missing and accelerator.is_main_process else 0


def class_image(folder: Path, index: int) -> Path:
    """Where generated class image `index` lives."""
    return folder / f"class-{index:05d}.png"
