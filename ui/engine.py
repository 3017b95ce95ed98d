"""One base pipeline shared by every visitor; each job applies its visitor's mix under a lock.

A pipeline per visitor would cost a full model's memory per browser tab. Instead the engine
keeps one pipeline (the base last asked for) with a `Mixer` holding every adapter anyone has
loaded. A job takes the lock, enables exactly the adapters of its own mix at their strengths
(every other loaded adapter is disabled, i.e. strength 0 = the base's exact weights), runs, and
releases the lock. Strength changes are exact and touch no file, so switching between two
visitors' mixes costs only re-fusing the changed layers. The Gradio queue already runs GPU jobs
one at a time; the lock keeps that true for any caller.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from sdlora.bases.base import load_base
from sdlora.bases.fast_sample import UI_IMAGES, expect_images
from sdlora.lora.blend import Mixer

MAX_LOADED = 16  # adapters kept attached; beyond this, ones outside the current mix are dropped


@dataclass
class Loaded:
    """Which file an attached adapter came from, to notice when it changes on disk."""

    path: Path
    stamp: tuple[float, int]  # (mtime, size)


def _stamp(path: Path) -> tuple[float, int]:
    stat = path.stat()
    return stat.st_mtime, stat.st_size


class Engine:
    """The shared base pipeline and the adapters attached to it."""

    def __init__(self, device: str | None = None, dtype: torch.dtype | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = (
            dtype
            if dtype is not None
            else (torch.float16 if self.device.startswith("cuda") else None)
        )
        self.lock = threading.RLock()
        self.base: str | None = None  # spec of the loaded base
        self.pipe: StableDiffusionPipeline | None = None
        self.mixer: Mixer | None = None
        self.loaded: dict[str, Loaded] = {}
        self.doing: str | None = None  # what the job holding the lock does, for waiting pages

    def _use_base(self, spec: str) -> None:
        """Load `spec` unless it is the current base; only one base is held at a time."""
        if self.base == spec and self.pipe is not None:
            return
        self.pipe = self.mixer = self.base = None
        self.loaded.clear()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        self.pipe = load_base(spec, device=self.device, dtype=self.dtype)
        self.mixer = Mixer(self.pipe)
        expect_images(self.pipe, UI_IMAGES)  # --compile auto: the UI draws many, so it compiles
        self.base = spec

    def _attach(self, name: str, path: Path) -> None:
        """Attach the file as adapter `name`, reloading it when the file changed on disk."""
        known = self.loaded.get(name)
        if known is not None and known.path == path and known.stamp == _stamp(path):
            return
        if name in self.mixer.entries:
            self.mixer.remove(name)
            self.loaded.pop(name, None)
        stamp = _stamp(path)
        self.mixer.add(path, name=name, strength=0.0)
        self.loaded[name] = Loaded(path, stamp)

    @contextmanager
    def mixed(
        self,
        base: str,
        mix: dict[str, tuple[Path, float]],
        blocks: dict[str, str] | None = None,
        doing: str = "generating",
    ) -> Iterator[tuple[StableDiffusionPipeline, Mixer]]:
        """Hold the lock with `base` loaded and exactly `mix` (name -> (file, strength)) active,
        each adapter with its per-block strengths from `blocks` (name -> spec; absent = all 1).
        `doing` says what the job does, for pages that wait meanwhile."""
        blocks = blocks or {}
        with self.lock, self._doing(doing):
            self._use_base(base)
            for name, (path, _) in mix.items():
                self._attach(name, path)
            extra = [n for n in self.mixer.entries if n not in mix]
            for name in extra[: max(0, len(self.mixer.entries) - MAX_LOADED)]:
                self.mixer.remove(name)
                self.loaded.pop(name, None)
            for name in self.mixer.entries:
                if name in mix:
                    self.mixer.set_blocks(name, blocks.get(name))
                    self.mixer.set_strength(name, mix[name][1])
                    self.mixer.enable(name, True)
                else:
                    self.mixer.enable(name, False)
            yield self.pipe, self.mixer

    def check(self, base: str, name: str, path: Path) -> None:
        """Attach one adapter to `base` now, so a file that does not fit is refused at once."""
        with self.lock, self._doing("loading an adapter"):
            self._use_base(base)
            self._attach(name, path)
            self.mixer.enable(name, False)

    @contextmanager
    def bare(self, base: str, doing: str) -> Iterator[StableDiffusionPipeline]:
        """Hold the lock with `base` loaded and no adapter attached at all (for distilling);
        adapters are attached again from their files by the next `mixed`."""
        with self.lock, self._doing(doing):
            self._use_base(base)
            self.mixer.clear()
            self.loaded.clear()
            yield self.pipe

    @contextmanager
    def _doing(self, what: str) -> Iterator[None]:
        previous, self.doing = self.doing, what
        try:
            yield
        finally:
            self.doing = previous

    def parameters(self, base: str) -> int | None:
        """Parameters of `base`'s UNet, text encoder and VAE if it is the loaded base, else None."""
        pipe = self.pipe if self.base == base else None
        if pipe is None:
            return None
        return sum(
            p.numel()
            for comp in ("unet", "text_encoder", "vae")
            for name, p in getattr(pipe, comp).named_parameters()
            if ".adapters." not in name
        )
