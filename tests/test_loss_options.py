"""Loss and noise options (issue 35): each against its formula on fixed tensors and seeds."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from sdlora.errors import SdloraError
from sdlora.errors import flag as flag_of
from sdlora.train import step
from sdlora.train.config import TrainConfig

SCHEDULER = DDPMScheduler(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)
TIMESTEPS = torch.tensor([0, 1, 250, 999])


def fixed(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def alphas_bar(t: int) -> float:
    return float(SCHEDULER.alphas_cumprod[t])


def test_huber_thresholds_follow_each_schedule():
    c = 0.1
    constant = step.huber_threshold(c, "constant", SCHEDULER, TIMESTEPS)
    assert constant.tolist() == pytest.approx([c] * 4, abs=1e-7)
    exponential = step.huber_threshold(c, "exponential", SCHEDULER, TIMESTEPS)
    want = [math.exp(t * math.log(c) / 1000) for t in TIMESTEPS.tolist()]
    assert exponential.tolist() == pytest.approx(want, abs=1e-6)
    assert exponential[0] == 1  # 1 at t = 0, falling towards c at t = T
    snr = step.huber_threshold(c, "snr", SCHEDULER, TIMESTEPS)
    sigma = [math.sqrt((1 - alphas_bar(t)) / alphas_bar(t)) for t in TIMESTEPS.tolist()]
    assert snr.tolist() == pytest.approx([(1 - c) / (1 + s) ** 2 + c for s in sigma], abs=1e-6)


@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
def test_pseudo_huber_losses_match_their_formulas(loss_type):
    pred, target = fixed((4, 2, 3, 3), 1), fixed((4, 2, 3, 3), 2)
    c = torch.tensor([0.1, 0.5, 1.0, 0.01])
    got = step.pseudo_huber(pred, target, c, loss_type)
    for i in range(4):
        diffs = (pred[i] - target[i]).flatten().tolist()
        for d, value in zip(diffs, got[i].flatten().tolist(), strict=True):
            ci = float(c[i])
            smooth = 2 * (math.sqrt(d * d + ci * ci) - ci)
            assert value == pytest.approx(ci * smooth if loss_type == "huber" else smooth, abs=1e-6)
    # far from 0 huber grows like 2c·|d| (L1), near 0 like d² (L2)
    d, one = torch.tensor([1e-3, 1e3], dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    near, far = step.pseudo_huber(d, torch.zeros(2, dtype=torch.float64), one, "huber").tolist()
    assert near == pytest.approx(1e-6, rel=1e-5) and far == pytest.approx(2e3, rel=1e-2)


def test_debiased_weight_is_one_over_the_root_of_the_clipped_snr():
    snr = [alphas_bar(t) / (1 - alphas_bar(t)) for t in TIMESTEPS.tolist()]
    got = step.debiased_weight(SCHEDULER, TIMESTEPS, v_prediction=False)
    assert got.tolist() == pytest.approx([1 / math.sqrt(min(s, 1000)) for s in snr], rel=1e-5)
    assert snr[0] > 1000  # t = 0 is clipped
    got = step.debiased_weight(SCHEDULER, TIMESTEPS, v_prediction=True)
    assert got.tolist() == pytest.approx([1 / (min(s, 1000) + 1) for s in snr], rel=1e-5)


def test_input_perturbation_adds_gamma_times_a_fresh_draw():
    noise = fixed((2, 4, 8, 8), 3)
    got = step.perturb(noise, 0.1, torch.Generator().manual_seed(5))
    extra = torch.randn(noise.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, noise + 0.1 * extra, rtol=0, atol=1e-6)


def test_pyramid_noise_sums_upsampled_levels_and_normalises():
    noise = fixed((2, 4, 16, 16), 4)
    got = step.pyramid_noise(
        noise, 3, 0.3, torch.Generator().manual_seed(8), torch.Generator().manual_seed(9)
    )
    # the formula, level by level: r_i uniform in [2, 4), level i at (16/r**i) px, weight 0.3**i
    draws, sizes = torch.Generator().manual_seed(8), torch.Generator().manual_seed(9)
    want = noise.clone()
    for i in range(3):
        r = 2 + 2 * float(torch.rand((), generator=sizes))
        side = max(1, int(16 / r**i))
        level = torch.randn((2, 4, side, side), generator=draws)
        want += F.interpolate(level, size=(16, 16), mode="bilinear") * 0.3**i
        if side == 1:
            break
    want /= want.std()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert float(got.std()) == pytest.approx(1.0, abs=1e-6)
    # one level is the full-size draw added once: (ε + ε0) / std
    one = step.pyramid_noise(
        noise, 1, 0.3, torch.Generator().manual_seed(8), torch.Generator().manual_seed(9)
    )
    level0 = noise + torch.randn(noise.shape, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(one, level0 / level0.std(), rtol=0, atol=1e-6)


def refusal(**kw) -> str:
    with pytest.raises(SdloraError) as err:
        TrainConfig(data_dir="d", output="o", **kw).check()
    return err.value.worded(flag_of)


def test_options_that_would_do_nothing_are_refused_by_name():
    assert refusal(huber_c=0.2) == (
        "--huber-c is the threshold of --loss-type huber or smooth_l1 (got l2); "
        "give one of them, or leave --huber-c out"
    )
    assert "--huber-schedule" in refusal(huber_schedule="constant")
    assert "--loss-type" in refusal(huber_schedule="constant")
    assert refusal(multires_noise_discount=0.5).startswith(
        "--multires-noise-discount weights the levels of --multires-noise-iterations"
    )
    assert "must be positive" in refusal(loss_type="huber", huber_c=0.0)
    assert "--loss-type" in refusal(loss_type="l1")
    assert "--ip-noise-gamma" in refusal(ip_noise_gamma=-0.1)
    # accepted with what they act on
    TrainConfig(data_dir="d", output="o", loss_type="smooth_l1", huber_c=0.2).check()
    TrainConfig(
        data_dir="d", output="o", multires_noise_iterations=6, multires_noise_discount=0.5
    ).check()


def test_loraplus_puts_each_up_factor_at_ratio_times_the_rate():
    from types import SimpleNamespace

    from sdlora.train import models

    def weights():
        down, up = torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(3, 2))
        return SimpleNamespace(down=down, up=up, params=lambda: [down, up])

    injected = {"lora_unet_a": weights(), "lora_te_b": weights(), "lora_unet_c": weights()}
    config = TrainConfig(lr=1e-4, text_encoder_lr=5e-5, loraplus_lr_ratio=16)
    groups = models.make_optimizer(config, injected, torch.device("cpu")).param_groups
    rates = {g["name"]: (g["lr"], [id(p) for p in g["params"]]) for g in groups}
    ups = [id(injected[k].up) for k in ("lora_unet_a", "lora_unet_c")]
    downs = [id(injected[k].down) for k in ("lora_unet_a", "lora_unet_c")]
    assert rates["unet"] == (1e-4, downs)
    assert rates["unet_up"][0] == pytest.approx(16e-4, rel=1e-12) and rates["unet_up"][1] == ups
    assert rates["text_encoder"] == (5e-5, [id(injected["lora_te_b"].down)])
    assert rates["text_encoder_up"][0] == pytest.approx(80e-5, rel=1e-12)
    assert rates["text_encoder_up"][1] == [id(injected["lora_te_b"].up)]
    assert "must be from 1 to 1000" in refusal(loraplus_lr_ratio=0.5)
    # the text encoders' own ratio (kohya's loraplus_text_encoder_lr_ratio), with and without
    # the UNet's
    for unet_ratio, te_ratio in ((16, 4), (None, 4)):
        config = TrainConfig(
            lr=1e-4,
            text_encoder_lr=5e-5,
            loraplus_lr_ratio=unet_ratio,
            loraplus_text_encoder_lr_ratio=te_ratio,
        )
        groups = models.make_optimizer(config, injected, torch.device("cpu")).param_groups
        rates = {g["name"]: (g["lr"], [id(p) for p in g["params"]]) for g in groups}
        assert rates["text_encoder_up"][0] == pytest.approx(20e-5, rel=1e-12)
        assert rates["text_encoder"] == (5e-5, [id(injected["lora_te_b"].down)])
        if unet_ratio is None:
            assert "unet_up" not in rates and rates["unet"][0] == 1e-4
        else:
            assert rates["unet_up"][0] == pytest.approx(16e-4, rel=1e-12)


def test_a_run_with_every_new_option_trains_and_records_them(tmp_path, monkeypatch):
    """huber loss on the exponential schedule, input perturbation, pyramid noise, debiased
    weighting and LoRA+ (with the text encoder) in one short run of the tiny base."""
    from pathlib import Path

    from sdlora.io.formats import load_adapter
    from sdlora.train import models, train

    held = {}
    make = models.make_optimizer

    def keep(*args, **kwargs):
        held["optimizer"] = make(*args, **kwargs)
        return held["optimizer"]

    monkeypatch.setattr(models, "make_optimizer", keep)
    samples = Path(__file__).resolve().parent.parent / "samples" / "style"
    config = TrainConfig(
        data_dir=str(samples), output=str(tmp_path / "out"), base="tiny", resolution=64,
        batch_size=2, steps=2, lr=1e-3, save_every=0, tensorboard=False, workers=0, seed=3,
        loss_type="huber", huber_c=0.2, huber_schedule="exponential", ip_noise_gamma=0.1,
        multires_noise_iterations=4, multires_noise_discount=0.4, debiased_estimation=True,
        loraplus_lr_ratio=8, train_text_encoder=True,
    )  # fmt: skip
    adapter = load_adapter(train(config))
    rates = {g["name"]: g["lr"] for g in held["optimizer"].param_groups}
    assert rates["unet_up"] == pytest.approx(8e-3) and rates["unet"] == pytest.approx(1e-3)
    assert rates["text_encoder_up"] == pytest.approx(8e-3)
    recorded = json.loads(adapter.metadata["sdlora_training"])
    assert recorded["loss_type"] == "huber" and recorded["huber_c"] == 0.2
    assert recorded["huber_schedule"] == "exponential" and recorded["ip_noise_gamma"] == 0.1
    assert recorded["multires_noise_iterations"] == 4 and recorded["debiased_estimation"]
    assert recorded["loraplus_lr_ratio"] == 8 and adapter.metadata["ss_loraplus_lr_ratio"] == "8"
    assert any(name.startswith("lora_te") for name in adapter.modules)
    for name, factors in adapter.modules.items():
        assert torch.isfinite(factors.down).all() and torch.isfinite(factors.up).all(), name
    assert any(bool(factors.up.abs().sum()) for factors in adapter.modules.values())  # it learned


def test_the_flags_and_toml_keys_come_from_the_declarations(tmp_path):
    import argparse

    from sdlora.train.command import config_from_args, register
    from sdlora.train.config import load_config

    parser = argparse.ArgumentParser(prog="sdlora")
    register(parser.add_subparsers(dest="command"))
    flags = ["--loss-type", "smooth_l1", "--huber-c", "0.3", "--huber-schedule", "constant"]
    flags += ["--ip-noise-gamma", "0.05", "--multires-noise-iterations", "6"]
    flags += ["--debiased-estimation", "--loraplus-lr-ratio", "4"]
    args = parser.parse_args(["train", "d", "-o", "o", *flags])
    toml = tmp_path / "run.toml"
    toml.write_text(
        'data_dir = "d"\noutput = "o"\nloss-type = "smooth_l1"\nhuber_c = 0.3\n'
        'huber_schedule = "constant"\nip_noise_gamma = 0.05\nmultires_noise_iterations = 6\n'
        "debiased_estimation = true\nloraplus_lr_ratio = 4\n",
        encoding="utf-8",
    )
    for config in (config_from_args(args), load_config(toml)):
        config.check()
        assert (config.loss_type, config.huber_c, config.huber_schedule) == (
            "smooth_l1",
            0.3,
            "constant",
        )
        assert (config.ip_noise_gamma, config.multires_noise_iterations) == (0.05, 6)
        assert config.debiased_estimation and config.loraplus_lr_ratio == 4


@pytest.mark.parametrize("loss_type", ["l2", "huber"])
def test_the_step_takes_the_loss_of_its_own_prediction_and_noise(tmp_path, monkeypatch, loss_type):
    """l2 is exactly (torch.equal) the mean squared error of the step's own prediction and
    noise; huber the mean of the per-element formula at each image's scheduled threshold."""
    from pathlib import Path

    from sdlora.train import train

    seen = []
    call = step.TrainStep.__call__

    def watch(self, batch, k):
        held = {}
        add_noise = self.noise_scheduler.add_noise

        def keep_noise(latents, noise, timesteps):
            held.update(noise=noise, timesteps=timesteps)
            return add_noise(latents, noise, timesteps)

        def keep_pred(module, args, output):
            held["pred"] = output.sample.detach()

        self.noise_scheduler.add_noise = keep_noise
        hook = self.unet.register_forward_hook(keep_pred)
        try:
            loss = call(self, batch, k)
        finally:
            hook.remove()
            del self.noise_scheduler.add_noise
        seen.append((loss, held, self.noise_scheduler))
        return loss

    monkeypatch.setattr(step.TrainStep, "__call__", watch)
    samples = Path(__file__).resolve().parent.parent / "samples" / "style"
    huber = dict(loss_type="huber", huber_schedule="exponential") if loss_type == "huber" else {}
    train(
        TrainConfig(
            data_dir=str(samples), output=str(tmp_path / "out"), base="tiny", resolution=64,
            batch_size=2, steps=1, save_every=0, tensorboard=False, workers=0, **huber,
        )
    )  # fmt: skip
    [(loss, held, scheduler)] = seen
    pred, noise = held["pred"].float(), held["noise"].float()
    if loss_type == "l2":
        assert torch.equal(loss, F.mse_loss(pred, noise))
    else:
        c = [math.exp(t * math.log(0.1) / 1000) for t in held["timesteps"].tolist()]
        d = pred - noise
        want = torch.stack(
            [(2 * ci * ((d[i] ** 2 + ci**2).sqrt() - ci)).mean() for i, ci in enumerate(c)]
        ).mean()
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_zero_terminal_snr_rescales_the_betas_as_algorithm_1():
    """Lin et al. 2024, Algorithm 1, in float64 from the original betas: sqrt(ᾱ_t) shifted to
    0 at t = T and scaled back to its value at t = 1."""
    rescaled = step.zero_terminal_snr_scheduler(SCHEDULER, "v_prediction")
    root = SCHEDULER.alphas_cumprod.double().sqrt()
    first, last = root[0].item(), root[-1].item()
    want = ((root - last) * first / (first - last)) ** 2
    torch.testing.assert_close(rescaled.alphas_cumprod.double(), want, rtol=1e-5, atol=1e-9)
    assert rescaled.alphas_cumprod[-1].item() == pytest.approx(0, abs=1e-12)
    assert rescaled.alphas_cumprod[0].item() == pytest.approx(alphas_bar(0), rel=1e-6)
    assert SCHEDULER.alphas_cumprod[-1] > 1e-3  # the scheduler given is left as it was
    with pytest.raises(SdloraError) as err:
        step.zero_terminal_snr_scheduler(SCHEDULER, "epsilon")
    assert err.value.worded(flag_of).startswith(
        "--zero-terminal-snr needs v-prediction, and the base predicts epsilon"
    )
    assert "--prediction-type v_prediction" in refusal(
        zero_terminal_snr=True, prediction_type="epsilon"
    )
    TrainConfig(
        data_dir="d", output="o", zero_terminal_snr=True, prediction_type="v_prediction"
    ).check()
