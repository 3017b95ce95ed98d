"""The compile plan (train/compile_plan.py), on the CPU: compile or not and how, which graphs."""

from __future__ import annotations

import pytest
import torch

from sdlora.bases.base import load_base
from sdlora.errors import SdloraError
from sdlora.lora.inject import UNET_TARGETS, add_trainable, target_names
from sdlora.train import TrainConfig
from sdlora.train.compile_plan import (
    AdapterSettings,
    CompilePlan,
    batch_shapes,
    default_workers,
    describe,
    plan_compile,
    rebuild,
    record_calls,
    region_names,
    share_out,
)
from sdlora.train.data import BatchPlan, ImageItem
from sdlora.train.speed import DEEP_REGIONS, REGIONS, regions_of

CUDA, CPU = torch.device("cuda"), torch.device("cpu")  # a CUDA device object needs no GPU


def plan(device=CUDA, steps=1000, buckets=1, family="sd1", wanted=True, gib=80.0, **settings):
    return plan_compile(
        TrainConfig(**settings),
        device,
        steps=steps,
        buckets=buckets,
        family=family,
        workers_wanted=wanted,
        gpu_gib=gib,
    )


def test_off_never_compiles_and_on_always_does():
    assert plan(compile="off") == CompilePlan(compile=False)
    assert not plan(compile="off", steps=10**6).compile
    on_cpu = plan(CPU, steps=1, compile="on", gib=None)
    assert on_cpu.compile and not on_cpu.cuda_graphs  # CUDA graphs only on CUDA
    assert not on_cpu.workers and not on_cpu.background  # workers only on CUDA, and only for auto
    on_gpu = plan(steps=1, compile="on")
    assert on_gpu.compile and on_gpu.cuda_graphs and on_gpu.workers and not on_gpu.background


@pytest.mark.parametrize(
    ("family", "steps", "buckets", "compiled"),
    [
        ("sd1", 599, 1, False),
        ("sd1", 600, 1, True),  # COMPILE_MIN_STEPS per bucket
        ("sd1", 1199, 2, False),
        ("sd2", 600, 1, True),
        ("sdxl", 199, 1, False),
        ("sdxl", 200, 1, True),  # SDXL pays the compile back sooner
        ("sdxl", 300, 2, False),
    ],
)
def test_auto_compiles_on_a_gpu_when_the_run_pays_it_back(family, steps, buckets, compiled):
    chosen = plan(steps=steps, buckets=buckets, family=family, compile="auto")
    assert chosen.compile == compiled
    assert chosen.background == compiled  # an 80 GiB GPU: the workers beside the first steps
    assert not plan(CPU, steps=10**6, family=family, compile="auto", gib=None).compile


def test_auto_compiles_before_the_first_step_on_a_small_gpu():
    assert plan(compile="auto", gib=80.0).background
    assert plan(compile="auto", gib=32.0).background
    small = plan(compile="auto", gib=24.0)
    assert small.compile and small.workers and not small.background


def test_workers_only_where_wanted_on_cuda():
    assert not plan(compile="on", wanted=False).workers  # SDLORA_COMPILE_WORKERS=0
    assert not plan(CPU, compile="on", gib=None).workers


def test_no_cuda_graphs_when_gradients_accumulate_or_blocks_checkpoint():
    assert plan(compile="on").cuda_graphs
    assert not plan(compile="on", grad_accum=2).cuda_graphs
    assert not plan(compile="on", gradient_checkpointing=True).cuda_graphs


def test_an_activation_budget_without_compiling_is_warned_about():
    compiled = plan(compile="on", activation_budget=0.5)
    assert compiled.activation_budget == 0.5 and compiled.warning is None
    eager = plan(compile="off", activation_budget=0.5)
    assert "--activation-budget" in eager.warning and "--compile off" in eager.warning
    assert plan(compile="off").warning is None


def test_an_unknown_compile_mode_is_refused():
    with pytest.raises(SdloraError, match="--compile must be one of"):
        plan(compile="sometimes")


def _plan_of(buckets: dict[tuple[int, int], int], batch_size: int) -> BatchPlan:
    items = [
        ImageItem(path=None, caption="", repeats=count, size=bucket, bucket=bucket)
        for bucket, count in buckets.items()
    ]
    return BatchPlan(items, batch_size=batch_size, seed=0)


def test_batch_shapes_include_each_buckets_last_smaller_batch():
    sd1 = _plan_of({(512, 512): 5}, batch_size=2)  # 2 + 2 + 1
    assert batch_shapes(sd1) == [(1, 512, 512), (2, 512, 512)]
    sdxl = _plan_of({(1024, 1024): 4, (896, 1152): 3, (1152, 896): 1}, batch_size=4)
    assert batch_shapes(sdxl) == [(1, 1152, 896), (3, 896, 1152), (4, 1024, 1024)]
    assert batch_shapes(_plan_of({(768, 768): 8}, batch_size=4)) == [(4, 768, 768)]


def _adapted(base: str) -> torch.nn.Module:
    unet = load_base(base).unet
    add_trainable(unet, "unet", target_names("attn", UNET_TARGETS), rank=4, name="training")
    return unet.train()


@pytest.mark.parametrize(
    ("base", "regions", "context"), [("tiny", REGIONS, 32), ("tiny-xl", DEEP_REGIONS, 80)]
)
def test_one_job_per_graph_for_each_batch_shape(base, regions, context):
    """SD 1.x compiles its transformers whole, SDXL each attention block; regions alike share
    a job, and a second bucket adds the jobs of its own shapes."""
    unet = _adapted(base)
    assert regions_of(unet) == regions
    kwargs = {}
    if base == "tiny-xl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 48),
            "time_ids": torch.randn(2, 6),
        }

    def call(*args):
        return unet(*args, **kwargs).sample

    def inputs(side):
        return (
            torch.randn(2, 4, side, side),
            torch.randint(0, 1000, (2,)),
            torch.randn(2, 77, context),
        )

    one = record_calls(unet, call, [inputs(8)], regions)
    two = record_calls(unet, call, [inputs(8), inputs(16)], regions)
    names = region_names(unet, regions)
    assert {type(unet.get_submodule(n)).__name__ for n in names} == set(regions)
    assert sorted(n for job in one for n in job["regions"]) == sorted(names)
    assert len(one) < len(names)  # alike regions share their graph
    # every region sees another shape in the second bucket: more graphs, each region twice
    assert sorted(n for job in two for n in job["regions"]) == sorted(names * 2)
    assert len(one) < len(two) <= 2 * len(one)
    for job in one:  # a job's regions are of one class
        assert len({type(unet.get_submodule(n)).__name__ for n in job["regions"]}) == 1


def test_recorded_arguments_rebuild_with_their_shape_stride_dtype_and_gradient():
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_(True)
    record = describe([x, {"scale": 1.0, "ids": torch.zeros(2, dtype=torch.long)}, None])
    back = rebuild(record, CPU)
    assert back[0].shape == x.shape and back[0].stride() == x.stride()
    assert back[0].dtype == x.dtype and back[0].requires_grad
    assert back[1]["scale"] == 1.0 and back[1]["ids"].dtype == torch.long and back[2] is None
    with pytest.raises(TypeError, match="cannot record"):
        describe(object())


def test_jobs_are_shared_out_to_at_most_one_worker_per_two_cores(monkeypatch):
    jobs = [{"cost": c} for c in (5, 4, 3, 3)]
    shares = share_out(jobs, 2)
    assert sorted(sum(j["cost"] for j in share) for share in shares) == [7, 8]
    assert sorted(id(j) for share in shares for j in share) == sorted(map(id, jobs))
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert default_workers(3) == 3 and default_workers(40) == 8
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert default_workers(40) == 1


def test_adapter_settings_are_named_not_positional():
    settings = AdapterSettings(
        targets=("to_q",), rank=4, alpha=None, nonlinearity="relu", dropout=0.0, name="training"
    )
    assert settings.__dict__["rank"] == 4 and settings.conv_rank is None
    with pytest.raises(TypeError):
        AdapterSettings(("to_q",), 4, None, "relu", 0.0, "training")
