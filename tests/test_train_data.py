"""Trainer data rules: captions, repeats, odd and broken images, buckets, batch order. No models."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.errors import SdloraError
from sdlora.train.config import TrainConfig
from sdlora.train.data import (
    BatchPlan,
    ImageItem,
    MicroBatches,
    discover,
    draw_caption,
    enlarged_items,
    load_rgb,
    make_buckets,
    nearest_bucket,
    possible_captions,
    to_bucket,
    with_trigger,
)


def save_png(path, color=(200, 30, 30), size=(64, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def config(data_dir, **kw):
    return TrainConfig(
        data_dir=str(data_dir), output=str(data_dir.parent / "out"), resolution=64, **kw
    )


def captions_of(data_dir, **kw):
    items, _, _ = discover(config(data_dir, **kw))
    return {item.path.name: item.caption for item in items}


# ---------------------------------------------------------------- captions


def test_caption_sources_in_order(tmp_path):
    data = tmp_path / "data"
    save_png(data / "a.png")
    (data / "a.txt").write_text("from the sidecar\n", encoding="utf-8")
    save_png(data / "b.png")
    save_png(data / "sub" / "c.png")
    (data / "sub" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "c.png", "text": "from metadata"}) + "\n", encoding="utf-8"
    )
    save_png(data / "red_circle_2.png")
    assert captions_of(data) == {
        "a.png": "from the sidecar",
        "b.png": "b",
        "c.png": "from metadata",
        "red_circle_2.png": "red circle 2",
    }
    with_default = captions_of(data, caption="a photo")
    assert with_default["b.png"] == "a photo" and with_default["a.png"] == "from the sidecar"


def test_trigger_is_put_in_front_once():
    assert with_trigger("a red circle", "sks") == "sks, a red circle"
    assert with_trigger("a red circle in sks style", "sks") == "a red circle in sks style"
    assert with_trigger("a red circle in sksx style", "sks") == "sks, a red circle in sksx style"
    assert with_trigger("", "sks") == "sks"
    assert with_trigger("plain", None) == "plain"


def test_trigger_survives_tag_shuffle_and_dropout_empties():
    item = ImageItem(path=None, caption="one, two, three, four", repeats=1, size=(64, 64))
    cfg = TrainConfig(trigger="sks", shuffle_tags=True, keep_tags=1)
    draws = {draw_caption(item, cfg, random.Random(i)) for i in range(20)}
    assert len(draws) > 1
    assert all(d.startswith("sks, one, ") for d in draws)
    assert all(sorted(d.split(", ")) == sorted("sks one two three four".split()) for d in draws)
    dropped = TrainConfig(trigger="sks", caption_dropout=0.999)
    assert draw_caption(item, dropped, random.Random(0)) == ""


def test_caption_not_utf8_is_an_error_naming_the_file(tmp_path):
    data = tmp_path / "data"
    save_png(data / "a.png")
    (data / "a.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(SdloraError, match=r"a\.txt.*not UTF-8"):
        discover(config(data))


def test_bad_metadata_line_is_an_error_naming_file_and_line(tmp_path):
    data = tmp_path / "data"
    save_png(data / "a.png")
    (data / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{oops\n')
    with pytest.raises(SdloraError, match=r"metadata\.jsonl:2"):
        discover(config(data))


# ---------------------------------------------------------------- folders and images


def test_repeats_from_kohya_folder_names(tmp_path):
    data = tmp_path / "data"
    save_png(data / "3_style" / "a.png")
    save_png(data / "b.png")
    items, _, _ = discover(config(data))
    repeats = {item.path.name: item.repeats for item in items}
    assert repeats == {"a.png": 3, "b.png": 1}
    assert BatchPlan(items, 1, seed=0).images_per_epoch == 4


def test_empty_and_unreadable_folders_are_errors(tmp_path):
    with pytest.raises(SdloraError, match="no such folder"):
        discover(config(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    with pytest.raises(SdloraError, match="no images found"):
        discover(config(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"")
    with pytest.raises(SdloraError, match="none of the 1 image files could be read"):
        discover(config(broken))


def odd_images(folder):
    """One of each awkward kind, good and bad; returns (good names, bad names)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_png(folder / "plain.png")
    rgba = Image.new("RGBA", (64, 64), (0, 0, 255, 0))  # fully transparent blue
    rgba.save(folder / "rgba.png")
    Image.new("RGB", (64, 64), (0, 200, 0)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        folder / "palette.png"
    )
    Image.new("L", (64, 64), 128).save(folder / "gray.png")
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((64, 64), 65535, dtype=np.uint16)).save(folder / "gray16.png")
    rotated = Image.new("RGB", (96, 64), (10, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    rotated.save(folder / "exif.jpg", exif=exif)
    Image.new("RGB", (64, 64), (90, 90, 90)).save(folder / "image.webp")
    Image.new("RGB", (64, 64), (90, 0, 90)).save(folder / "image.bmp")
    (folder / "zero.png").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buf, "PNG"
    )
    (folder / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "text.png").write_text("this is not a picture")
    (folder / "notes.md").write_text("ignored: not an image suffix")
    good = {
        "plain.png",
        "rgba.png",
        "palette.png",
        "gray.png",
        "cmyk.jpg",
        "gray16.png",
        "exif.jpg",
        "image.webp",
        "image.bmp",
    }
    return good, {"zero.png", "truncated.png", "text.png"}


def test_odd_images_are_read_as_rgb_and_broken_ones_skipped(tmp_path):
    good, bad = odd_images(tmp_path / "data")
    items, skipped, _ = discover(config(tmp_path / "data"))
    assert {item.path.name for item in items} == good
    assert {path.name for path, _ in skipped} == bad
    assert dict((p.name, r) for p, r in skipped)["zero.png"] == "empty file"
    sizes = {item.path.name: item.size for item in items}
    assert sizes["exif.jpg"] == (64, 96)  # EXIF rotation applied
    assert load_rgb(tmp_path / "data" / "exif.jpg").size == (64, 96)  # to the pixels too
    for item in items:
        img = load_rgb(item.path)
        assert img.mode == "RGB"
    px = {name: load_rgb(tmp_path / "data" / name).getpixel((5, 5)) for name in good}
    assert px["rgba.png"] == (255, 255, 255)  # transparent -> white, not black or blue
    assert px["gray16.png"] == (255, 255, 255)  # 16-bit white stays white, not clipped noise
    assert px["gray.png"] == (128, 128, 128)
    assert px["palette.png"] == (0, 200, 0)
    assert px["cmyk.jpg"][0] > 200 and px["cmyk.jpg"][1] < 60  # cyan-free magenta+yellow = red


def test_hidden_files_and_output_folder_inside_data_are_skipped(tmp_path):
    data = tmp_path / "data"
    save_png(data / "a.png")
    save_png(data / ".cache" / "b.png")
    save_png(data / "run" / "samples" / "step-000010.png")
    cfg = TrainConfig(data_dir=str(data), output=str(data / "run"), resolution=64)
    items, _, _ = discover(cfg)
    assert [item.path.name for item in items] == ["a.png"]


# ---------------------------------------------------------------- buckets and batches


def test_buckets_keep_area_and_sides_multiple_of_64():
    buckets = make_buckets(512)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert w * h <= 512 * 512
        assert w * h >= 512 * 512 * 0.7
    assert nearest_bucket((1600, 900), buckets) == (640, 384)
    assert nearest_bucket((900, 1600), buckets) == (384, 640)
    assert nearest_bucket((1000, 1000), buckets) == (512, 512)
    assert make_buckets(64) == [(64, 64)]


def test_to_bucket_covers_and_crops_without_squashing():
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 50, 100))  # blue left quarter
    pixels = to_bucket(img, (64, 64), "center", False, None)
    assert pixels.shape == (3, 64, 64)
    assert pixels.min() >= -1 and pixels.max() <= 1
    # the center crop of a 2:1 image drops the blue left quarter: all red
    assert pixels[0].mean() > 0.9 and pixels[2].mean() < -0.9


def items_for(n, buckets=((64, 64),)):
    return [
        ImageItem(
            path=None, caption=str(i), repeats=1, size=(64, 64), bucket=buckets[i % len(buckets)]
        )
        for i in range(n)
    ]


def test_batch_plan_is_deterministic_shards_processes_and_keeps_buckets():
    items = items_for(10, buckets=((64, 64), (128, 64)))
    one = BatchPlan(items, 2, seed=3)
    again = BatchPlan(items, 2, seed=3)
    assert [one.micro_batch(k) for k in range(12)] == [again.micro_batch(k) for k in range(12)]
    assert [one.micro_batch(k) for k in range(6)] != [
        BatchPlan(items, 2, 4).micro_batch(k) for k in range(6)
    ]
    for k in range(one.per_process):  # an epoch sees every image once, batches within a bucket
        _, batch = one.micro_batch(k)
        assert len({items[i].bucket for i in batch}) == 1
    seen = sorted(i for k in range(one.per_process) for i in one.micro_batch(k)[1])
    assert seen == list(range(10))
    ranks = [BatchPlan(items, 2, seed=3, world=2, rank=r) for r in (0, 1)]
    assert ranks[0].per_process == ranks[1].per_process == 3
    firsts = [set(r.micro_batch(0)[1]) for r in ranks]
    assert not firsts[0] & firsts[1]


def test_batch_size_that_cannot_work_is_an_error():
    with pytest.raises(SdloraError, match="--batch-size 8 is larger than the 3"):
        BatchPlan(items_for(3), 8, seed=0).check()
    with pytest.raises(SdloraError, match="processes"):
        BatchPlan(items_for(2), 2, seed=0, world=2, rank=0).check()


def test_micro_batches_draw_the_same_augmentation_for_the_same_step(tmp_path):
    data = tmp_path / "data"
    for i in range(4):
        save_png(data / f"{i}.png", color=(i * 60, 0, 0), size=(96, 64))
    cfg = config(data, crop="random", flip=True, buckets=False)
    items, _, _ = discover(cfg)
    dataset = MicroBatches(BatchPlan(items, 2, seed=0), cfg, with_pixels=True)
    a, b = dataset[5], dataset[5]
    assert a["pixels"].shape == (2, 3, 64, 64)
    assert (a["pixels"] == b["pixels"]).all() and a["captions"] == b["captions"]


def test_random_crop_and_flip_vary_between_draws(tmp_path):
    data = tmp_path / "data"
    img = Image.fromarray(np.tile(np.arange(128, dtype=np.uint8) * 2, (64, 1)))  # left dark
    img.convert("RGB").save(save_png(data / "ramp.png"))
    center = to_bucket(load_rgb(data / "ramp.png"), (64, 64), "center", False, None)
    for crop, flip in (("random", False), ("center", True)):
        cfg = config(data, crop=crop, flip=flip, buckets=False)
        items, _, _ = discover(cfg)
        dataset = MicroBatches(BatchPlan(items, 1, seed=0), cfg, with_pixels=True)
        draws = [dataset[k]["pixels"][0] for k in range(16)]
        assert any(not torch.equal(d, center) for d in draws), crop
        assert any(torch.equal(d, center) for d in draws) or crop == "random"
        if flip:  # a flipped draw is the mirror image, the dark side on the right
            flipped = [d for d in draws if not torch.equal(d, center)]
            assert all(torch.equal(d, center.flip(-1)) for d in flipped)


def test_caches_only_when_nothing_random_needs_fresh_encodes():
    assert TrainConfig().caches_latents and TrainConfig().caches_text
    for kw in (dict(crop="random"), dict(flip=True), dict(cache=False)):
        assert not TrainConfig(**kw).caches_latents, kw
    assert TrainConfig(crop="random", flip=True).caches_text
    for kw in (dict(train_text_encoder=True), dict(shuffle_tags=True), dict(cache=False)):
        assert not TrainConfig(**kw).caches_text, kw
    assert TrainConfig(train_text_encoder=True, caption_dropout=0.5).caches_latents
    # the text cache holds every caption a draw can give: trigger added, dropout's empty one
    items = [ImageItem(path=None, caption=c, repeats=1, size=(64, 64)) for c in ("a", "sks b")]
    cfg = TrainConfig(trigger="sks", caption_dropout=0.5)
    cached = set(possible_captions(items, cfg))
    assert cached == {"", "sks, a", "sks b"}
    draws = {draw_caption(i, cfg, random.Random(k)) for i in items for k in range(20)}
    assert draws == cached


def test_images_much_smaller_than_their_bucket_are_found():
    def item(size, bucket):
        return ImageItem(path=None, caption="", repeats=1, size=size, bucket=bucket)

    small, fits, wide = (
        item((128, 128), (512, 512)),
        item((300, 300), (512, 512)),
        item((1024, 100), (1024, 256)),
    )
    assert enlarged_items([small, fits, wide]) == [small, wide]
