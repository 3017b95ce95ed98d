"""`sdlora caption` (issue 35) with a tiny random BLIP built here from a config, its processor
from files this test writes (no network): captions written, existing ones kept, and the files
feed `sdlora train`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from sdlora.cli import main
from sdlora.tools.caption import caption_folder, caption_text

WORDS = "a red blue green circle square star on white background small big shape".split()


@pytest.fixture(scope="module")
def blip(tmp_path_factory) -> Path:
    """A folder holding a 1-layer BLIP captioner (32 px) and its BERT-vocabulary processor."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder = tmp_path_factory.mktemp("blip")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=BertTokenizer(str(folder / "vocab.txt")),
    )
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = BlipConfig(
        vision_config=dict(**small, image_size=32, patch_size=8),
        text_config=dict(
            **small, vocab_size=len(vocab), max_position_embeddings=64,
            bos_token_id=2, sep_token_id=3, eos_token_id=3, pad_token_id=0,
        ),
    )  # fmt: skip
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():  # words, not special tokens: the random model never stops early
        model.text_decoder.cls.predictions.bias[:5] = -1e4
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def data(tmp_path) -> Path:
    """Five shapes in two folders; one already has a caption."""
    folder = tmp_path / "shapes"
    (folder / "5_more").mkdir(parents=True)
    colours = ["red", "blue", "green", "white", "black"]
    for i, colour in enumerate(colours):
        where = folder if i < 3 else folder / "5_more"
        Image.new("RGB", (48 + 16 * i, 48), colour).save(where / f"{colour}.png")
    (folder / "red.txt").write_text("my own caption\n", encoding="utf-8")
    return folder


def captions(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text("utf-8") for p in sorted(folder.rglob("*.txt"))}


def test_caption_writes_missing_captions_and_keeps_existing_ones(blip, data, capsys):
    argv = ["caption", str(data), "--model", str(blip), "--trigger", "sks", "--batch-size", "2"]
    assert main([*argv, "--max-tokens", "6"]) == 0
    assert "wrote 4 caption(s); kept 1 existing" in capsys.readouterr().out
    written = captions(data)
    assert sorted(written) == [
        "5_more/black.txt", "5_more/white.txt", "blue.txt", "green.txt", "red.txt",
    ]  # fmt: skip
    assert written["red.txt"] == "my own caption\n"
    for name, text in written.items():
        if name != "red.txt":
            assert text.startswith("sks, ") and text.endswith("\n") and text.count("\n") == 1
            words = text.removeprefix("sks, ").split()
            assert 1 <= len(words) <= 6 and set(words) <= set(WORDS), text
    # a second run writes nothing; --overwrite replaces every caption, the user's too
    assert main(argv) == 0 and captions(data) == written
    assert "wrote 0 caption(s); kept 5 existing" in capsys.readouterr().out
    assert main([*argv, "--overwrite", "--prefix", "a photo of "]) == 0
    again = captions(data)
    assert all(text.startswith("sks, a photo of ") for text in again.values())


def test_the_library_batches_and_leaves_empty_answers_unwritten(data):
    calls = []

    def fake(images):
        calls.append(len(images))
        return ["" if image.getpixel((0, 0)) == (0, 0, 0) else "a shape" for image in images]

    report = caption_folder(data, fake, batch_size=3, progress=list)
    assert calls == [3, 1]  # four images without a caption, three a call
    assert [p.name for p in report.kept] == ["red.png"]
    assert [p.name for p in report.empty] == ["black.png"]
    assert sorted(p.name for p in report.written) == ["blue.png", "green.png", "white.png"]
    assert not (data / "5_more" / "black.txt").exists()
    assert caption_text("  a  cat\n", "photo of ", "sks") == "sks, photo of a cat"
    assert caption_text("sks cat", "", "sks") == "sks cat"  # already holds the trigger


def test_mistakes_are_one_line(blip, data, tmp_path, capsys):
    assert main(["caption", str(tmp_path / "none"), "--model", str(blip)]) == 2
    err = capsys.readouterr().err
    assert err == f"sdlora: {tmp_path / 'none'}: no such folder; give the folder of images\n"
    assert main(["caption", str(data), "--model", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be loaded as an image-to-text model" in err
    assert main(["caption", str(data), "--model", str(blip), "--batch-size", "0"]) == 2
    assert capsys.readouterr().err == "sdlora: --batch-size must be at least 1 (got 0)\n"


def test_the_written_captions_feed_sdlora_train(blip, data, tmp_path):
    from sdlora.io.formats import load_adapter
    from sdlora.train.config import TrainConfig
    from sdlora.train.data import discover

    assert main(["caption", str(data), "--model", str(blip), "--max-tokens", "5"]) == 0
    config = TrainConfig(
        data_dir=str(data), output=str(tmp_path / "out"), base="tiny", resolution=64, steps=1,
        save_every=0, tensorboard=False, workers=0,
    )  # fmt: skip
    items, _, _ = discover(config)
    want = {
        p.with_suffix(".png").name: t.strip() for p in data.rglob("*.txt") for t in [p.read_text()]
    }
    assert {item.path.name: item.caption for item in items} == want
    assert main(
        ["train", str(data), "-o", str(tmp_path / "out"), "--base", "tiny", "--resolution", "64",
         "--steps", "1", "--save-every", "0", "--no-tensorboard", "--workers", "0"]
    ) == 0  # fmt: skip
    assert load_adapter(tmp_path / "out" / "shapes.safetensors").modules


def test_the_web_uis_button_captions_missing_images(blip, data, tmp_path):
    """The dataset preview's "Caption missing images": the images without a caption get one."""
    from sdlora.errors import SdloraError
    from sdlora.ui import handlers as h
    from sdlora.ui import train_setup

    ctx = h.Context("toy", tmp_path / "a", data.parent, tmp_path / "o")
    said = train_setup.caption_missing(ctx, data.name, str(blip))
    assert said == "Captioned 4 image(s); 1 already had one."
    assert (data / "5_more" / "white.txt").is_file()
    assert (data / "red.txt").read_text("utf-8") == "my own caption\n"
    preview = train_setup.preview(ctx, data.name, 64)
    assert all(caption for _, caption in preview.thumbnails)
    with pytest.raises(SdloraError, match="give a captioning model first"):
        train_setup.caption_missing(ctx, data.name, " ")
