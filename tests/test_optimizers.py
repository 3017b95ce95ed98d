"""--optimizer prodigy / adafactor / schedulefree and --optimizer-args: each trains the toy
sample to a lower held-out loss than at step 0, a missing package names its extra, the arguments
reach the constructor and the metadata, and Prodigy's adapted rate (d × lr) is what is logged."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sdlora.errors import SdloraError
from sdlora.errors import flag as flag_of
from sdlora.io.formats import load_adapter
from sdlora.lora.layer import LoRAWeights
from sdlora.train import loop as loop_module
from sdlora.train.config import TrainConfig
from sdlora.train.models import effective_lrs, make_optimizer

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
VALIDATION = re.compile(r"step (\d+): validation loss ([0-9.e+-]+)")


def toy(tmp_path: Path, **settings) -> TrainConfig:
    defaults = dict(
        data_dir=str(SAMPLES / "style"),
        output=str(tmp_path / "out"),
        base="toy",
        resolution=64,
        batch_size=4,
        steps=4,
        validation_split=0.25,
        validate_every=4,
        save_every=0,
        log_every=1,
        compile="off",
        tensorboard=False,
        workers=0,
        seed=1,
    )
    return TrainConfig(**(defaults | settings))


def run(config: TrainConfig, monkeypatch, caplog) -> dict[int, float]:
    """Train; return the validation loss by step, step 0 included (validated before the loop)."""
    looped = loop_module.loop

    def validated_first(run, on_step):
        loop_module.validate(run)
        return looped(run, on_step)

    monkeypatch.setattr(loop_module, "loop", validated_first)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="sdlora"):
        loop_module.train(config)
    found = [VALIDATION.search(r.getMessage()) for r in caplog.records]
    return {int(m[1]): float(m[2]) for m in found if m}


def logged_lrs(caplog) -> list[float]:
    lines = [r.getMessage() for r in caplog.records if re.match(r"step \d+: loss", r.getMessage())]
    return [float(line.rsplit("lr ", 1)[1]) for line in lines]


@pytest.mark.parametrize(
    "optimizer, settings",
    [
        ("prodigy", dict(lr=1.0, optimizer_args=["d0=1e-3"])),
        ("adafactor", dict(lr=3e-3)),
        ("schedulefree", dict(lr=3e-3)),
    ],
)
def test_each_optimizer_lowers_the_held_out_loss(
    tmp_path, monkeypatch, caplog, optimizer, settings
):
    config = toy(tmp_path, optimizer=optimizer, **settings)
    losses = run(config, monkeypatch, caplog)
    assert set(losses) == {0, 4}
    assert losses[4] < losses[0] * 0.999, losses
    recorded = json.loads(load_adapter(config.adapter_path).metadata["sdlora_training"])
    assert recorded["optimizer"] == optimizer
    assert recorded["optimizer_args"] == config.optimizer_args
    if optimizer == "prodigy":  # d × lr: d starts at d0 (1e-3 here) and only grows; lr is 1
        lrs = logged_lrs(caplog)
        assert len(lrs) == 4 and lrs[0] == pytest.approx(1e-3, rel=1e-6), lrs
        assert lrs == sorted(lrs) and lrs[-1] < 1.0, lrs


def weights() -> dict[str, LoRAWeights]:
    torch.manual_seed(0)
    down = torch.nn.Parameter(torch.randn(2, 4))
    up = torch.nn.Parameter(torch.zeros(4, 2))
    return {"lora_unet_x": LoRAWeights(down=down, up=up, trainable=True)}


def test_prodigy_rate_logged_is_d_times_lr():
    """effective_lrs reads d from Prodigy's groups: d0 (given here) times the scheduled lr,
    then d as it adapts."""
    config = TrainConfig(
        data_dir="d", output="o", optimizer="prodigy", lr=0.5, optimizer_args=["d0=0.01"]
    ).check()
    injected = weights()
    optimizer = make_optimizer(config, injected, torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    models = SimpleNamespace(optimizer=optimizer, lr_scheduler=scheduler)
    assert effective_lrs(models) == pytest.approx([0.5 * 0.01])
    for _ in range(3):
        w = injected["lora_unet_x"]
        ((w.up @ w.down) - 1).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    d = optimizer.param_groups[0]["d"]
    assert d >= 0.01
    assert effective_lrs(models) == pytest.approx([0.5 / 4 * d])


def test_optimizer_args_reach_the_constructor_and_the_metadata(tmp_path):
    config = TrainConfig(
        data_dir="d",
        output="o",
        optimizer="prodigy",
        lr=1.0,
        optimizer_args=["d_coef=2 safeguard_warmup=false", "betas=0.9", "growth_rate=inf"],
    )
    assert config.check().optimizer_kwargs() == {
        "d_coef": 2,
        "safeguard_warmup": False,
        "betas": 0.9,
        "growth_rate": float("inf"),
    }
    config.optimizer_args = ["d_coef=2.5", "safeguard_warmup=False", "slice_p=1"]
    group = make_optimizer(config, weights(), torch.device("cpu")).param_groups[0]
    assert group["d_coef"] == 2.5 and group["safeguard_warmup"] is False
    assert group["use_bias_correction"] is True  # the LoRA defaults stay where not given
    adafactor = TrainConfig(
        data_dir="d",
        output="o",
        optimizer="adafactor",
        lr=1e-3,
        optimizer_args=["clip_threshold=2"],
    )
    group = make_optimizer(adafactor, weights(), torch.device("cpu")).param_groups[0]
    assert group["clip_threshold"] == 2 and group["relative_step"] is False
    assert group["lr"] == pytest.approx(1e-3)
    # recorded in the adapter's metadata with the other settings
    assert config.settings()["optimizer_args"] == [
        "d_coef=2.5",
        "safeguard_warmup=False",
        "slice_p=1",
    ]


def test_unknown_or_malformed_optimizer_args_are_refused():
    config = TrainConfig(
        data_dir="d", output="o", optimizer="schedulefree", optimizer_args=["d_coef=2"]
    )
    with pytest.raises(SdloraError) as err:
        make_optimizer(config.check(), weights(), torch.device("cpu"))
    assert err.value.worded(flag_of) == (
        "--optimizer-args d_coef is not a setting of --optimizer schedulefree; check its spelling"
    )
    assert "\n" not in str(err.value)
    with pytest.raises(SdloraError, match="takes KEY=VALUE, e.g. d_coef=2 \\(got 'd_coef'\\)"):
        TrainConfig(data_dir="d", output="o", optimizer_args=["d_coef"]).check()


def test_schedulefree_refuses_another_lr_scheduler():
    config = TrainConfig(data_dir="d", output="o", optimizer="schedulefree", lr_scheduler="cosine")
    with pytest.raises(SdloraError) as err:
        config.check()
    assert err.value.worded(flag_of).startswith(
        "--lr-scheduler must be constant with --optimizer schedulefree (got cosine)"
    )


@pytest.mark.parametrize(
    "optimizer, package, extra",
    [("prodigy", "prodigyopt", "prodigy"), ("schedulefree", "schedulefree", "schedulefree")],
)
def test_a_missing_package_names_its_extra(monkeypatch, optimizer, package, extra):
    monkeypatch.setitem(sys.modules, package, None)  # import then raises ImportError
    config = TrainConfig(data_dir="d", output="o", optimizer=optimizer).check()
    with pytest.raises(SdloraError) as err:
        make_optimizer(config, weights(), torch.device("cpu"))
    assert err.value.setting == "optimizer"
    assert err.value.worded(flag_of) == (
        f"--optimizer {optimizer} needs {package}: pip install 'sdlora[{extra}]' "
        "(or use --optimizer adamw)"
    )
