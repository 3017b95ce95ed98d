"""Caption a folder of training images with an image-to-text model: IMAGE.txt beside each image.

The model is any transformers image-to-text model its Auto classes load with a processor:
BLIP (Salesforce/blip-image-captioning-base/-large), BLIP-2 (Salesforce/blip2-opt-2.7b) and
other `AutoModelForImageTextToText` models, named by Hub id or local folder. Florence-2's
original repositories (microsoft/Florence-2-*) ship their own code: they load only with
`trust_remote_code=True` and want a task prompt such as "<MORE_DETAILED_CAPTION>".

The images are those `sdlora train` would read (same suffixes, subfolders, hidden files left
out); the caption file is the one it reads first (IMAGE.txt). Existing captions are kept unless
`overwrite`; each file is written whole or not at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sdlora.errors import SdloraError

DEFAULT_MAX_TOKENS = 40  # BLIP's captions are 10-20 tokens; detailed ones run longer


@dataclass
class CaptionReport:
    """What `caption_folder` did: files written, images whose caption was kept, images the
    model gave no words for (no file written)."""

    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    empty: list[Path] = field(default_factory=list)


def caption_path(image: Path) -> Path:
    """Where `sdlora train` reads an image's caption first: IMAGE.txt beside it."""
    return image.with_suffix(".txt")


def find_images(data_dir: str | Path) -> list[Path]:
    """The images `sdlora train DATA_DIR` would read, sorted; SdloraError if none."""
    from sdlora.train.data import IMAGE_SUFFIXES, find_image_files

    folder = Path(data_dir)
    if not folder.is_dir():
        raise SdloraError(f"{folder}: no such folder; give the folder of images")
    images = [p for p in find_image_files(folder).images if p.is_file()]
    if not images:
        raise SdloraError(
            f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, in "
            "subfolders too)"
        )
    return images


def caption_text(words: str, prefix: str = "", trigger: str | None = None) -> str:
    """The caption file's text: `prefix` + the model's words, the trigger word in front
    (as `sdlora train --trigger` puts it), on one line."""
    from sdlora.train.data import with_trigger

    return with_trigger(" ".join(f"{prefix}{words.strip()}".split()), trigger)


class Captioner:
    """A loaded image-to-text model: `captioner(images) -> [text]` for PIL images."""

    def __init__(
        self,
        model: str,
        *,
        device: str = "cpu",
        prompt: str | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        trust_remote_code: bool = False,
    ):
        import torch
        import transformers

        self.prompt, self.max_tokens, self.device = prompt, max_tokens, device
        local = Path(model).is_dir()
        if not local and (Path(model).exists() or model.count("/") != 1):
            raise SdloraError(
                f"{model!r} is neither a model folder nor a Hub id (owner/name)", setting="model"
            )
        kw = {"trust_remote_code": trust_remote_code}
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(model, **kw)
            auto = [transformers.AutoModelForImageTextToText]
            if trust_remote_code:  # Florence-2's own code registers itself as a causal LM
                auto.append(transformers.AutoModelForCausalLM)
            errors = []
            for cls in auto:
                try:
                    self.model = cls.from_pretrained(model, **kw)
                    break
                except ValueError as err:  # this Auto class has no entry for the model
                    errors.append(err)
            else:
                raise errors[-1]
        except (OSError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            hint = "" if trust_remote_code else " (models with their own code: --trust-remote-code)"
            raise SdloraError(
                f"{model!r} cannot be loaded as an image-to-text model with a processor: "
                f"{first[:200]}{hint}",
                setting="model",
            ) from None
        self.model.to(device).eval()
        self.dtype = next(self.model.parameters()).dtype
        self._no_grad = torch.no_grad

    def __call__(self, images: list) -> list[str]:
        """Captions of PIL images, in order."""
        with self._no_grad():
            kw = {"images": images, "return_tensors": "pt"}
            if self.prompt:
                kw["text"] = [self.prompt] * len(images)
            inputs = self.processor(**kw).to(self.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            out = self.model.generate(**inputs, max_new_tokens=self.max_tokens)
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        if self.prompt:  # decoder-only models repeat the prompt before their answer
            texts = [t.removeprefix(self.prompt) for t in texts]
        return [" ".join(t.split()) for t in texts]


def caption_folder(
    data_dir: str | Path,
    captioner: Callable[[list], list[str]],
    *,
    prefix: str = "",
    trigger: str | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> CaptionReport:
    """Write IMAGE.txt for each image in `data_dir` that has none (all of them with
    `overwrite`), `batch_size` images per model call; `progress` wraps the batches (a tqdm)."""
    from sdlora.io.writing import written_file
    from sdlora.train.data import load_rgb

    if batch_size < 1:
        raise SdloraError(f"must be at least 1 (got {batch_size})", setting="batch_size")
    report = CaptionReport()
    todo = []
    for image in find_images(data_dir):
        if caption_path(image).exists() and not overwrite:
            report.kept.append(image)
        else:
            todo.append(image)
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    for batch in progress(batches) if progress else batches:
        pictures = []
        for image in batch:
            try:
                pictures.append(load_rgb(image))
            except (OSError, ValueError, SyntaxError) as err:
                raise SdloraError(f"{image}: not an image PIL can read ({err})") from None
        for image, words in zip(batch, captioner(pictures), strict=True):
            if not words.strip():
                report.empty.append(image)
                continue
            with written_file(caption_path(image)) as tmp:
                tmp.write_text(caption_text(words, prefix, trigger) + "\n", encoding="utf-8")
            report.written.append(image)
    return report
