"""Compiling in worker processes (train/precompile.py): what is recorded, and a worker's run.

On the CPU the workers use the "eager" backend (it only traces), so this checks the workers
rebuild every region and run it with the recorded inputs; that the graphs they compile are the
training process's own (cache hits) is measured on the GPU (benchmarks/first_run.py).
"""

from __future__ import annotations

import pytest
import torch
from sdlora.train import precompile
from sdlora.train.speed import DEEP_REGIONS, REGIONS, regions_of

from sdlora.base import load_base
from sdlora.inject import UNET_TARGETS, add_trainable, target_names


def _unet_with_adapter(base="tiny"):
    unet = load_base(base).unet
    targets = target_names("attn", UNET_TARGETS)
    add_trainable(unet, "unet", targets, rank=4, nonlinearity="relu", name="training")
    adapter = precompile.Adapter(tuple(targets), 4, None, "relu", 0.0, "training")
    return unet.train(), adapter


def test_recorded_calls_cover_every_region_once_and_leave_no_gradient():
    unet, _ = _unet_with_adapter()
    shapes = [(2, 8), (1, 8), (2, 16)]  # (batch, latent side): two batch sizes, two buckets
    inputs = [
        (torch.randn(b, 4, s, s), torch.randint(0, 1000, (b,)), torch.randn(b, 77, 32))
        for b, s in shapes
    ]
    jobs = precompile.record_calls(unet, lambda *a: unet(*a).sample, inputs, REGIONS)
    names = precompile.region_names(unet, REGIONS)
    covered = [name for job in jobs for name in job["regions"]]
    # each region once per input shape; regions with the same parameters and inputs share a job
    assert sorted(covered) == sorted(names * len(shapes))
    assert len(jobs) < len(covered)
    first = jobs[0]["args"][0]
    assert first["__tensor__"] and len(first["shape"]) == 4
    assert all(p.grad is None for p in unet.parameters())  # forward only


def test_sdxl_compiles_attention_blocks_not_ten_block_transformers():
    assert regions_of(load_base("tiny").unet) == REGIONS
    assert regions_of(load_base("tiny-v2").unet) == REGIONS
    unet = load_base("tiny-xl").unet  # its last level holds 2 attention blocks per transformer
    assert regions_of(unet) == DEEP_REGIONS
    blocks = precompile.region_names(unet, DEEP_REGIONS)
    assert sum(".transformer_blocks." in name for name in blocks) == sum(
        len(m.transformer_blocks) for m in unet.modules() if hasattr(m, "transformer_blocks")
    )


@pytest.mark.parametrize(
    ("base", "checkpointing", "context"),
    [("tiny", False, 32), ("tiny", True, 32), ("tiny-xl", True, 80)],
)
def test_a_worker_rebuilds_and_runs_every_recorded_region(
    tmp_path, monkeypatch, base, checkpointing, context
):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # PyTorch's compile cache
    unet, adapter = _unet_with_adapter(base)
    regions = regions_of(unet)
    if checkpointing:  # blocks then run inside checkpoint wrappers; the worker does the same
        unet.enable_gradient_checkpointing()
    x = torch.randn(2, 4, 8, 8)
    kwargs = {}
    if base == "tiny-xl":
        pooled, ids = torch.randn(2, 48), torch.randn(2, 6)  # 48 + 6 ids × 8 = its 96 inputs
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": ids}

    def call(*args):
        return unet(*args, **kwargs).sample

    inputs = [(x, torch.randint(0, 1000, (2,)), torch.randn(2, 77, context))]
    jobs = precompile.record_calls(unet, call, inputs, regions)
    assert sorted(n for job in jobs for n in job["regions"]) == sorted(
        precompile.region_names(unet, regions)
    )
    options = dict(dynamic=False, backend="eager", mode=None)
    fill = precompile.fill_cache
    done = fill(unet, jobs, adapter, torch.float32, None, options, checkpointing, workers=1)
    assert done == {"workers": 1, "failed": 0, "seconds": done["seconds"]}
    # the same graphs again (a second run): the cache has them, no worker starts
    again = fill(unet, jobs, adapter, torch.float32, None, options, checkpointing, workers=1)
    assert again == {"workers": 0, "failed": 0, "seconds": 0.0}
    assert len(list((tmp_path / "sdlora-precompiled").iterdir())) == 1


def test_workers_get_the_largest_jobs_first_and_even_loads():
    jobs = [{"cost": c, "name": n} for n, c in zip("abcdef", [1, 9, 3, 5, 1, 4], strict=True)]
    shares = precompile.share_out(jobs, 3)
    loads = sorted(sum(j["cost"] for j in share) for share in shares)
    assert loads == [7, 7, 9]  # 9 | 5+1+1 | 4+3: largest first, each to the least loaded
    assert precompile.share_out(jobs[:2], 5) == [[jobs[1]], [jobs[0]]]  # no empty workers
