"""Shared fixtures: the tiny base (built from configs, no network) and fixed inputs."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # the suite runs in one process per core (pytest-xdist, pyproject's addopts): each, and
    # every process it starts, computes on one thread, so no core is asked for two
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread: the tiny model gains nothing from more, and loses much on a busy machine.

    Training test modules use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny():
    """A fresh tiny pipeline per test (builds in well under a second), fp32 on CPU."""
    from sdlora.bases.base import load_base

    return load_base("tiny")


@pytest.fixture(scope="session")
def inputs():
    """Fixed UNet and text-encoder inputs for the tiny base."""
    from sdlora.bases.tiny import make_tokenizer

    g = torch.Generator().manual_seed(1234)
    ids = make_tokenizer()(
        ["a red circle on the left", "a blue star"],
        padding="max_length",
        max_length=77,
        return_tensors="pt",
    ).input_ids
    return dict(
        latents=torch.randn(2, 4, 8, 8, generator=g),
        timesteps=torch.tensor([10, 700]),
        hidden=torch.randn(2, 77, 32, generator=g),
        ids=ids,
    )


def run_unet(pipe, inputs) -> torch.Tensor:
    with torch.no_grad():
        return pipe.unet(inputs["latents"], inputs["timesteps"], inputs["hidden"]).sample


def run_text(pipe, inputs) -> torch.Tensor:
    with torch.no_grad():
        return pipe.text_encoder(inputs["ids"])[0]


def make_adapter_file(
    pipe_factory,
    path,
    rank: int = 4,
    alpha: float | None = None,
    nonlinearity: str = "identity",
    seed: int = 0,
    text_encoder: bool = True,
    targets: str = "attn",
):
    """Inject a trainable adapter into a fresh tiny base, give B random values, save it.

    Returns (path, pipe with the live trained adapter).
    """
    from sdlora.io.files import save_adapter
    from sdlora.lora.inject import (
        TEXT_ENCODER_TARGETS,
        UNET_TARGETS,
        add_trainable,
        collect_adapter,
    )

    pipe = pipe_factory()
    g = torch.Generator().manual_seed(seed)
    injected = add_trainable(
        pipe.unet, "unet", UNET_TARGETS[targets], rank, alpha, nonlinearity, generator=g
    )
    if text_encoder:
        injected.update(
            add_trainable(
                pipe.text_encoder,
                "text_encoder",
                TEXT_ENCODER_TARGETS[targets],
                rank,
                alpha,
                nonlinearity,
                generator=g,
            )
        )
    for weights in injected.values():
        with torch.no_grad():
            weights.up.normal_(0.0, 0.2, generator=g)
    save_adapter(collect_adapter(injected, {"sdlora_base_model": "tiny"}), path, overwrite=True)
    return path, pipe


def draw_toy(pipe, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """(len(prompts), 3, 64, 64) in [0, 1]: the toy base's recommended settings (20 steps,
    guidance 2), prompt i drawn with seed i."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.inference_mode():
        return pipe(
            prompts,
            num_inference_steps=20,
            guidance_scale=2.0,
            generator=generators,
            height=64,
            width=64,
            output_type="pt",
        ).images
