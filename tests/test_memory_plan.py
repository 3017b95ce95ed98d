"""The memory planner (train/memory_plan.py, setup.fit_to_gpu): its choice for a table of runs,
the user's settings kept, the numbers it refuses with, and a run that cannot fit refused before
anything is loaded."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sdlora.errors import SdloraError
from sdlora.train import loop as loop_module
from sdlora.train import models as models_module
from sdlora.train.config import TrainConfig
from sdlora.train.memory_plan import (
    COSTS,
    USABLE,
    Candidate,
    MemoryRequest,
    candidates,
    latent_chunk_argument,
    plan_memory,
    step_gib,
)
from sdlora.train.setup import fit_to_gpu

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
NATIVE = {"sdxl": 1024, "sd1": 512}

# (family, free GiB, batch, compiled, the user's settings) ->
# (fp8, checkpointing, activation budget, blocks swapped, micro-batch, accumulation, workers)
# None for workers: not compiled. The policy: the fastest that fits, in this order: as given;
# fp8; lower activation budgets (compiled); micro-batches; checkpointing; swapping.
CASES = [
    (("sdxl", 80, 4, True, {"background": True}), (False, False, 1.0, 0, 4, 1, 8)),
    (("sdxl", 24, 1, True, {}), (False, False, 1.0, 0, 1, 1, 8)),
    (("sdxl", 24, 4, True, {}), (True, False, 1.0, 0, 4, 1, 6)),
    (("sdxl", 12, 1, True, {}), (True, False, 1.0, 0, 1, 1, 4)),
    (("sdxl", 12, 4, True, {}), (True, False, 0.5, 0, 2, 2, 3)),
    (("sdxl", 8, 4, True, {}), (True, False, 0.25, 0, 2, 2, 1)),
    (("sdxl", 8, 1, False, {}), (True, True, 1.0, 0, 1, 1, None)),
    (("sdxl", 6, 1, False, {}), (True, True, 1.0, 44, 1, 1, None)),
    (("sd1", 8, 8, True, {}), (False, False, 0.5, 0, 8, 1, 3)),
    (("sd1", 4, 4, False, {}), (False, False, 1.0, 0, 1, 4, None)),
    # the user's settings stay as given; the rest is chosen around them
    (("sdxl", 12, 4, True, {"base_precision": "full"}), (False, False, 0.25, 0, 2, 2, 2)),
    (("sdxl", 12, 4, True, {"grad_accum": 2}), (False, True, 1.0, 0, 4, 1, 1)),
    (("sdxl", 24, 4, True, {"gradient_checkpointing": True}), (False, True, 1.0, 0, 4, 1, 6)),
    (("sdxl", 24, 4, True, {"compile_workers": 2}), (True, False, 1.0, 0, 4, 1, 2)),
    (("sdxl", 12, 4, False, {"blocks_to_swap": 10}), (True, False, 1.0, 10, 1, 4, None)),
    (("sdxl", 8, 4, True, {"base_precision": "full"}), (False, True, 1.0, 32, 2, 2, None)),
]


def request(family, free, batch, compiled, settings) -> MemoryRequest:
    return MemoryRequest(
        family=family,
        resolution=NATIVE[family],
        batch=batch,
        free_gib=free,
        compiled=compiled,
        **settings,
    )


@pytest.mark.parametrize(
    "case, expected", CASES, ids=[f"{c[0]}-{c[1]}GiB-b{c[2]}-{c[4]}" for c, _ in CASES]
)
def test_the_planner_chooses_what_the_table_says(case, expected):
    choice = plan_memory(request(*case))
    got = (
        choice.fp8,
        choice.gradient_checkpointing,
        choice.activation_budget,
        choice.blocks_to_swap,
        choice.batch,
        choice.grad_accum,
        choice.compile_workers,
    )
    assert got == expected, choice.describe()
    assert choice.needs_gib * USABLE <= case[1] + 1e-9  # it fits what it was given
    assert choice.batch * choice.grad_accum == case[2]  # the same images per optimizer step


@pytest.mark.parametrize("family, batch, compiled", [("sdxl", 4, True), ("sdxl", 1, False),
                                                     ("sd1", 8, True)])  # fmt: skip
def test_more_memory_never_chooses_a_slower_setting(family, batch, compiled):
    """From 5 to 80 GiB free, the setting chosen only moves towards the front of the list of
    candidates (fastest first)."""
    order = candidates(request(family, 80, batch, compiled, {}), COSTS[family])
    last = len(order)
    for tenths in range(50, 800, 5):
        try:
            choice = plan_memory(request(family, tenths / 10, batch, compiled, {}))
        except SdloraError:
            assert last == len(order), f"refused at {tenths / 10} GiB after fitting with less"
            continue
        setting = Candidate(
            choice.fp8, choice.gradient_checkpointing, choice.activation_budget,
            choice.blocks_to_swap, choice.grad_accum,
        )  # fmt: skip
        assert order.index(setting) <= last, f"{tenths / 10} GiB: {choice.describe()}"
        last = order.index(setting)
    assert last == 0  # 80 GiB: everything as given


def test_fp8_and_swapping_lower_the_estimate_by_the_weights_they_move():
    costs, r = COSTS["sdxl"], request("sdxl", 24, 1, False, {})
    full = step_gib(costs, r, Candidate(False, True, 1.0, 0, 1))
    fp8 = step_gib(costs, r, Candidate(True, True, 1.0, 0, 1))
    assert full - fp8 == pytest.approx(costs.linear_m * 1e6 / 2**30, rel=1e-6)  # a byte each
    swapped = step_gib(costs, r, Candidate(True, True, 1.0, 10, 1))
    per_block = costs.block_m * 1e6 / costs.blocks / 2**30  # fp8: a byte a parameter
    assert fp8 - swapped == pytest.approx(8 * per_block, rel=1e-6)  # two stay resident


def test_a_run_that_fits_in_no_way_is_refused_with_the_numbers():
    with pytest.raises(SdloraError) as refused:
        plan_memory(request("sdxl", 4, 4, True, {}))
    message = str(refused.value)
    assert "needs about 5.1 GiB" in message and "4.0 GiB free" in message
    assert "--batch-size 1" in message and "--resolution" in message


def test_the_latent_chunk_follows_the_plan():
    choice = plan_memory(request("sdxl", 8, 1, False, {}))
    assert choice.latent_chunk == 1
    assert latent_chunk_argument(choice, 1024) == {"chunk": 4}  # 1 image of 4 × 512²
    assert latent_chunk_argument(None, 1024) == {}


def sdxl_folder(tmp_path: Path) -> Path:
    """A diffusers folder whose UNet config says SDXL (all fit_to_gpu reads of it)."""
    folder = tmp_path / "sdxl"
    (folder / "unet").mkdir(parents=True)
    unet = {"cross_attention_dim": 2048, "addition_embed_type": "text_time"}
    (folder / "unet" / "config.json").write_text(json.dumps(unet))
    return folder


def gpu():
    return SimpleNamespace(device=torch.device("cuda"), is_main_process=True)


def test_fit_to_gpu_writes_the_choice_into_the_settings(tmp_path, caplog):
    config = TrainConfig(
        data_dir="d", output="o", base=str(sdxl_folder(tmp_path)), resolution=1024,
        batch_size=4, compile="on",
    )  # fmt: skip
    with caplog.at_level("INFO", logger="sdlora"):
        planned, choice = fit_to_gpu(config, gpu(), free_gib=12)
    assert (planned.base_precision, planned.batch_size, planned.grad_accum) == ("fp8", 2, 2)
    assert planned.activation_budget == 0.5 and planned.compile_workers == 3
    assert config.base_precision == "auto"  # the user's config is left as it was
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory:")]
    assert lines == [choice.describe()]
    assert "fp8 base weights" in lines[0] and "batch 4 as 2 micro-batches of 2" in lines[0]


def test_fit_to_gpu_keeps_what_the_user_set(tmp_path):
    config = TrainConfig(
        data_dir="d", output="o", base=str(sdxl_folder(tmp_path)), resolution=1024,
        batch_size=4, compile="on", base_precision="full", grad_accum=2,
        gradient_checkpointing=True, compile_workers=1,
    )  # fmt: skip
    planned, _ = fit_to_gpu(config, gpu(), free_gib=12)
    assert planned.base_precision == "full" and planned.gradient_checkpointing
    assert (planned.batch_size, planned.grad_accum, planned.compile_workers) == (4, 2, 1)


def test_off_the_gpu_nothing_is_planned_and_swapping_turns_compiling_off():
    cpu = SimpleNamespace(device=torch.device("cpu"), is_main_process=True)
    config = TrainConfig(data_dir="d", output="o", blocks_to_swap=3, compile="auto")
    planned, choice = fit_to_gpu(config, cpu)
    assert choice is None
    assert (planned.base_precision, planned.blocks_to_swap, planned.compile) == ("full", 3, "off")


def test_swapping_with_compile_on_is_refused():
    config = TrainConfig(data_dir="d", output="o", blocks_to_swap=2, compile="on")
    with pytest.raises(SdloraError) as refused:
        config.check()
    assert refused.value.setting == "blocks_to_swap"


def test_a_run_that_cannot_fit_is_refused_before_loading_anything(tmp_path, monkeypatch):
    """train() on 0.2 GiB: refused with the numbers, before the base loads, before the data is
    looked at and before the output folder is made."""

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models_module, "load_base", no_loading)
    monkeypatch.setattr(loop_module, "load_models_beside_server", no_loading)
    monkeypatch.setattr(loop_module, "prepare_data", no_loading)
    output = tmp_path / "out"
    config = TrainConfig(
        data_dir=str(SAMPLES / "style"), output=str(output), base="toy", resolution=64,
        steps=2, compile="off", tensorboard=False, workers=0,
    )  # fmt: skip
    with pytest.raises(SdloraError, match=r"needs about [0-9.]+ GiB .* 0\.2 GiB free"):
        loop_module.train(config, gpu_free_gib=0.2)
    assert not output.exists()
