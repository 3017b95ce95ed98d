"""Pivotal tuning (train/pivotal.py): new words trained with the LoRA, saved, reloaded, resumed."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_embeddings import draw
from test_train import cli_args, settings, shapes  # noqa: F401 (a fixture)

from sdlora.bases.base import load_base
from sdlora.errors import SdloraError
from sdlora.lora.blend import Mixer
from sdlora.lora.embeddings import TokenEmbedding
from sdlora.train import train
from sdlora.train.checkpoint import load as load_checkpoint
from sdlora.train.command import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a ohwx circle"


def word_settings(data, output, **kw):
    values = dict(new_tokens=["ohwx:2"], trigger="ohwx", init_token="circle", steps=3)
    return settings(data, output, **(values | kw))


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):  # noqa: F811
    """A run with the text encoder's LoRA and a two-vector word: (its pipe, its config)."""
    config = word_settings(shapes, tmp_path_factory.mktemp("run"), train_text_encoder=True)
    pipe = load_base("tiny")
    train(config, pipe=pipe)
    for model in (pipe.unet, pipe.text_encoder):
        model.eval()
    return pipe, config


def test_only_the_new_rows_learn(trained):
    pipe, _ = trained
    module = pipe.text_encoder.get_input_embeddings()
    assert isinstance(module, TokenEmbedding)
    base = load_base("tiny")
    assert torch.equal(module.base.weight, base.text_encoder.get_input_embeddings().weight)
    circle = base.tokenizer("circle", add_special_tokens=False).input_ids[0]
    start = base.text_encoder.get_input_embeddings().weight[circle]
    moved = (module.vectors.detach() - start).norm(dim=1)
    assert module.vectors.shape == (2, 32) and (moved > 1e-4).all()  # both vectors trained


def test_the_saved_word_and_lora_draw_what_training_drew(trained):
    pipe, config = trained
    path = config.adapter_path
    assert {k for k in load_file(path) if k.startswith("bundle_emb.")} == {
        "bundle_emb.ohwx.string_to_param.*"
    }
    assert set(load_file(path.parent / "embeddings" / "ohwx.safetensors")) == {"ohwx"}
    live = draw(pipe)
    fresh = load_base("tiny")
    mixer = Mixer(fresh)
    mixer.add(path, name="me")
    torch.testing.assert_close(draw(fresh), live, atol=1e-5, rtol=0)
    assert np.abs(draw(fresh) - draw(fresh, "a circle")).max() > 1e-3  # the word does something
    mixer.set_strength("me", 0.0)
    assert np.array_equal(draw(fresh), draw(load_base("tiny")))


def test_embedding_only_steps_then_lora_and_an_exact_resume(shapes, tmp_path):  # noqa: F811
    config = word_settings(
        shapes, tmp_path / "a", steps=3, embedding_only_steps=2, save_every=1, embedding_lr=5e-2
    )
    train(config)
    ckpt = tmp_path / "a" / "checkpoints"
    _, two = load_checkpoint(ckpt / "step-000002")
    _, three = load_checkpoint(ckpt / "step-000003")
    ups = lambda state: [f["up"] for f in state["lora"].values()]  # noqa: E731
    assert all(torch.count_nonzero(up) == 0 for up in ups(two))  # zero-init up: LoRA untouched
    assert any(torch.count_nonzero(up) > 0 for up in ups(three))
    _, one = load_checkpoint(ckpt / "step-000001")
    assert not torch.equal(one["embeddings"]["ohwx"], two["embeddings"]["ohwx"])
    # resume from step 1 in a new folder: the same final adapter, words included, bit for bit
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt / "step-000001", tmp_path / "b" / "checkpoints" / "step-000001")
    config_b = word_settings(
        shapes, tmp_path / "b", steps=3, embedding_only_steps=2, save_every=1, embedding_lr=5e-2
    )
    config_b.name, config_b.resume = config.adapter_name, "latest"
    train(config_b)
    first, again = load_file(config.adapter_path), load_file(config_b.adapter_path)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(new_tokens=["a b"]), "--new-token 'a b'"),
        (dict(new_tokens=["ohwx:0"]), "number of vectors"),
        (dict(new_tokens=["ohwx", "ohwx:2"]), "given twice"),
        (dict(new_tokens=[], init_token="circle"), "init_token starts new words"),
        (dict(embedding_only_steps=3), "leaves no step"),
        (dict(embedding_lr=0.0), "embedding_lr must be positive"),
        (dict(new_tokens=["pers"]), "'pers' is already in the base's vocabulary"),
        (dict(init_token="ohwxyz"), "--init-token 'ohwxyz' is 6 tokens"),
    ],
)
def test_bad_words_are_one_line_errors(shapes, tmp_path, change, message):  # noqa: F811
    with pytest.raises(SdloraError, match=message) as err:
        train(word_settings(shapes, tmp_path / "o", **change))
    assert "\n" not in str(err.value)


def test_the_cli_takes_words_and_refuses_bad_ones(shapes, tmp_path, capsys):  # noqa: F811
    config = settings(shapes, tmp_path / "o", steps=1)
    args = cli_args(config)
    code = train_main([*args, "--new-token", "pers", "--init-token", "circle"])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the run's own log lines
    assert code == 2 and last.startswith("sdlora: --new-token 'pers': 'pers' is already in")
    code = train_main(
        [*args, "--new-token", "ohwx", "--new-token", "zq:2", "--embedding-lr", "1e-2"]
    )
    assert code == 0
    saved = load_file(config.adapter_path)
    assert saved["bundle_emb.zq.string_to_param.*"].shape == (2, 32)
    assert saved["bundle_emb.ohwx.string_to_param.*"].shape == (1, 32)


def test_sd2_words_train_save_and_reload(shapes, tmp_path):  # noqa: F811
    config = word_settings(shapes, tmp_path / "v2", base="tiny-v2", init_token=None, steps=2)
    pipe = load_base("tiny-v2")
    train(config, pipe=pipe)
    pipe.unet.eval()
    vectors = load_file(config.adapter_path)["bundle_emb.ohwx.string_to_param.*"]
    assert vectors.shape == (2, 64)  # SD 2.x text encoder width (tiny-v2)
    fresh = load_base("tiny-v2")
    Mixer(fresh).add(config.adapter_path)
    torch.testing.assert_close(draw(fresh), draw(pipe), atol=1e-5, rtol=0)


def test_words_on_sdxl_are_refused_before_any_step(shapes, tmp_path):  # noqa: F811
    """SDXL has two text encoders; a word trained in one only would be half a word."""
    config = word_settings(shapes, tmp_path / "xl", base="tiny-xl", init_token=None)
    with pytest.raises(SdloraError, match="on SDXL .* not supported yet") as err:
        train(config)
    assert "\n" not in str(err.value)
    assert not config.adapter_path.exists()


def test_embedding_only_steps_that_cover_every_epoch_step_are_refused(shapes, tmp_path, capsys):  # noqa: F811
    """With --epochs the step count is known only from the data: 2 steps for 4 images in
    batches of 2; 2 word-only steps would write an all-zero LoRA without a word."""
    config = word_settings(shapes, tmp_path / "o", steps=None, epochs=1, embedding_only_steps=2)
    with pytest.raises(
        SdloraError,
        match=r"^embedding_only_steps 2 leaves no step of the 2 \(from --epochs 1\) for the LoRA; give fewer$",
    ) as err:
        train(config)
    assert err.value.setting == "embedding_only_steps"
    assert not (tmp_path / "o").exists()  # refused before the folder was made
    from sdlora.cli import main

    args = ["train", str(shapes), "-o", str(tmp_path / "o"), "--base", "tiny"]
    args += ["--resolution", "64", "--batch-size", "2", "--epochs", "1", "--no-tensorboard"]
    assert main([*args, "--new-token", "ohwx", "--embedding-only-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "sdlora: --embedding-only-steps 2 leaves no step of the 2 (from --epochs 1) for the "
        "LoRA; give fewer"
    )
