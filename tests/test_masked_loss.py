"""--masked-loss (issue 35): the mask follows the image through bucket, crop and flip, cached
latents keep it, and a masked image trains as the unmasked one with the masked pixels' loss
removed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.errors import SdloraError
from sdlora.train import step
from sdlora.train.config import TrainConfig
from sdlora.train.data import BatchPlan, MicroBatches, discover


def pattern_rgba(width: int, height: int) -> Image.Image:
    """Opaque red where x + 2y is a multiple-of-7 stripe pattern, transparent elsewhere."""
    y, x = np.mgrid[0:height, 0:width]
    opaque = ((x + 2 * y) // 7) % 2 == 0
    rgba = np.zeros((height, width, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = np.where(opaque, 255, 0)
    return Image.fromarray(rgba, "RGBA")


def batches(tmp_path: Path, with_pixels: bool, **kw) -> MicroBatches:
    config = TrainConfig(
        data_dir=str(tmp_path / "data"), output=str(tmp_path / "out"), resolution=64,
        buckets=False, masked_loss=True, seed=1, **kw,
    )  # fmt: skip
    items, _, _ = discover(config)
    return MicroBatches(BatchPlan(items, 1, config.seed), config, with_pixels=with_pixels)


def test_the_mask_is_cropped_and_flipped_with_the_pixels(tmp_path):
    (tmp_path / "data").mkdir()
    pattern_rgba(64, 112).save(tmp_path / "data" / "a.png")  # taller: random crops move
    dataset = batches(tmp_path, True, crop="random", flip=True)
    tops = set()
    for k in range(12):
        batch = dataset[k]
        pixels, mask = batch["pixels"][0], batch["masks"][0]
        assert mask.shape == (1, 64, 64)
        white = (pixels > 0.99).all(dim=0)  # transparent pixels were put on white
        torch.testing.assert_close(mask[0], (~white).float(), rtol=0, atol=0)
        tops.add(int(batch["crops"][0, 0]))
    assert len(tops) > 3  # the crops differed, and the masks followed them
    # the same draws as without --masked-loss: the pixels do not change
    unmasked = TrainConfig(**{**vars(dataset.config), "masked_loss": False})
    plain = MicroBatches(dataset.plan, unmasked, with_pixels=True)
    assert torch.equal(plain[5]["pixels"], dataset[5]["pixels"]) and "masks" not in plain[5]


def test_a_mask_folder_gives_the_same_masks_as_the_alpha_channel(tmp_path):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "masks" / "sub").mkdir(parents=True)
    rgba = pattern_rgba(80, 64)
    rgba.save(tmp_path / "data" / "sub" / "a.png")
    rgba.getchannel("A").save(tmp_path / "masks" / "sub" / "a.png")
    rgba.convert("RGB").save(tmp_path / "data" / "sub" / "b.png")  # no alpha channel
    rgba.getchannel("A").save(tmp_path / "masks" / "sub" / "b.jpg", quality=100)
    by_alpha = batches(tmp_path, True, crop="random", flip=True)
    by_file = batches(tmp_path, True, crop="random", flip=True, mask_data=str(tmp_path / "masks"))
    assert [p.name for p in by_file.mask_files.values()] == ["a.png", "b.jpg"]
    for k in range(6):
        a, b = by_alpha[k], by_file[k]
        assert torch.equal(a["pixels"], b["pixels"])
        if a["indices"].item() == 0:  # a.png: its alpha channel and its mask file agree exactly
            torch.testing.assert_close(b["masks"], a["masks"], rtol=0, atol=0)
        else:  # b.png: no alpha, so all of it trains, unless its mask file says otherwise
            assert torch.equal(a["masks"], torch.ones_like(a["masks"]))
            assert 0.3 < b["masks"].mean() < 0.7 and b["masks"].min() >= 0
    # cached latents: the center crop's mask, read once and kept
    cached = batches(tmp_path, False, mask_data=str(tmp_path / "masks"))
    first = cached[0]
    want = cached.masked(first["indices"].item(), None)[1]
    torch.testing.assert_close(first["masks"][0], want, rtol=0, atol=0)
    assert first["pixels"] is None and cached._center_masks
    # a missing mask is named before training
    (tmp_path / "masks" / "sub" / "b.jpg").unlink()
    with pytest.raises(SdloraError, match=r"has no mask for 1 of the 2 images .*b\.png"):
        batches(tmp_path, True, mask_data=str(tmp_path / "masks"))


def test_masked_mean_averages_over_the_mask_at_latent_size():
    loss = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).view(2, 4, 4, 4)
    masks = torch.zeros(1, 1, 32, 32)
    masks[..., :, :16] = 1  # left half of the first image; the second (a class image) whole
    got = step.masked_mean(loss, masks)
    assert got[0] == pytest.approx(loss[0, :, :, :2].mean().item())
    assert got[1] == pytest.approx(loss[1].mean().item())
    # a mask of 0.5 everywhere is the plain mean; an all-black mask gives 0, not NaN
    half = step.masked_mean(loss[:1], torch.full((1, 1, 32, 32), 0.5))
    assert half.item() == pytest.approx(loss[0].mean().item())
    assert step.masked_mean(loss[:1], torch.zeros(1, 1, 32, 32)).item() == 0


def test_refused_without_masked_loss():
    with pytest.raises(SdloraError, match="holds the masks of"):
        TrainConfig(data_dir="d", output="o", mask_data="m").check()


@pytest.mark.parametrize("cache", [True, False])
def test_a_masked_image_trains_as_the_unmasked_one_without_the_masked_pixels(
    tmp_path, monkeypatch, cache
):
    """Two runs of one step on the tiny base: a two-region image whose right half is
    transparent with --masked-loss, and the same pixels without a mask. Same latents, noise
    and prediction; the masked loss is the unmasked per-element loss over the left half only
    (the 32 px boundary falls on a latent column), so its gradient leaves the right half out."""
    from sdlora.train import train

    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[:, :32] = (220, 40, 40, 255)  # left: opaque red
    rgba[:, 32:] = (20, 90, 200, 0)  # right: transparent (trained as white, then masked)
    for name in ("masked", "plain"):
        (tmp_path / name).mkdir()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "masked" / "img.png")
    white = Image.new("RGBA", (64, 64), (255, 255, 255, 255))
    composite = Image.alpha_composite(white, Image.fromarray(rgba, "RGBA")).convert("RGB")
    composite.save(tmp_path / "plain" / "img.png")  # the pixels the masked run trains on
    seen = []
    call = step.TrainStep.__call__

    def watch(self, batch, k):
        held = {}
        add_noise = self.noise_scheduler.add_noise

        def keep_noise(latents, noise, timesteps):
            held.update(noise=noise, latents=latents)
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
        seen.append((loss, held))
        return loss

    monkeypatch.setattr(step.TrainStep, "__call__", watch)
    for name in ("masked", "plain"):
        train(
            TrainConfig(
                data_dir=str(tmp_path / name), output=str(tmp_path / f"out-{name}"), base="tiny",
                resolution=64, steps=1, save_every=0, tensorboard=False, workers=0, caption="a",
                masked_loss=name == "masked", cache=cache,
            )
        )  # fmt: skip
    (masked_loss, masked), (plain_loss, plain) = seen
    for key in ("latents", "noise", "pred"):
        torch.testing.assert_close(masked[key], plain[key], rtol=0, atol=0)
    per_element = (plain["pred"].float() - plain["noise"].float()) ** 2  # (1, 4, 8, 8)
    torch.testing.assert_close(plain_loss, per_element.mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(masked_loss, per_element[..., :4].mean(), rtol=1e-5, atol=1e-7)
    assert abs(masked_loss.item() - plain_loss.item()) > 1e-4
