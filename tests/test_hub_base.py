"""Bases named by Hub id resolve through the Hugging Face cache; no network is ever touched."""

from __future__ import annotations

import pytest
import torch
from conftest import run_text, run_unet

from sdlora.bases.base import is_hub_id, load_base
from sdlora.bases.recommend import recommended
from sdlora.errors import SdloraError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding `sdlora-test/tiny-v2` (tiny-v2 saved with save_pretrained)."""
    cache = tmp_path / "hf" / "hub"
    repo = cache / "models--sdlora-test--tiny-v2"
    load_base("tiny-v2").save_pretrained(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_shapes():
    assert is_hub_id("stabilityai/stable-diffusion-2-1")
    assert is_hub_id("runwayml/stable-diffusion-v1-5")
    for spec in ("tiny", "./foo", "foo", "a/b/c", "/abs/path", "../x", "x/..", "model.safetensors"):
        assert not is_hub_id(spec), spec


def test_cached_hub_id_loads_offline(hub_cache, inputs):
    pipe = load_base("sdlora-test/tiny-v2")
    want = load_base("tiny-v2")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    hidden = torch.randn(2, 77, 64, generator=torch.Generator().manual_seed(0))
    x = dict(inputs, hidden=hidden)
    torch.testing.assert_close(run_unet(pipe, x), run_unet(want, x), atol=0, rtol=0)
    torch.testing.assert_close(run_text(pipe, x), run_text(want, x), atol=0, rtol=0)
    rec = recommended(pipe)  # the family's recommendation at the model's own size
    assert (rec.guidance, rec.steps, rec.size) == (7.5, 25, 64)


def test_hub_cache_named_by_hf_hub_cache(hub_cache, monkeypatch):
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    assert load_base("sdlora-test/tiny-v2").unet.config.cross_attention_dim == 64


def test_missing_hub_id_offline_says_how_to_fetch(hub_cache):
    with pytest.raises(SdloraError) as err:
        load_base("stabilityai/stable-diffusion-2-1")
    message = str(err.value)
    assert "\n" not in message
    assert "not in the Hugging Face cache and HF_HUB_OFFLINE=1" in message
    assert "huggingface-cli download stabilityai/stable-diffusion-2-1" in message


def test_typo_paths_keep_no_such_file(hub_cache, tmp_path):
    for spec in ("./foo", str(tmp_path / "missing" / "model"), "foo"):
        with pytest.raises(SdloraError, match="no such file or folder"):
            load_base(spec)


def test_local_folder_shaped_like_an_id_is_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    load_base("tiny").save_pretrained(tmp_path / "owner" / "name")
    pipe = load_base("owner/name")  # exists here: read as a folder, never looked up on the Hub
    assert pipe.unet.config.cross_attention_dim == 32


def test_single_file_described_by_a_cached_hub_id(hub_cache, tmp_path, inputs):
    from sdlora.io.single_file import save_pipeline_single_file

    want = load_base("tiny-v2")
    path = save_pipeline_single_file(want, tmp_path / "v2.safetensors", dtype="fp32")
    pipe = load_base(str(path), config="sdlora-test/tiny-v2")
    assert pipe.scheduler.config.prediction_type == "v_prediction"  # from the Hub configs
    hidden = torch.randn(2, 77, 64, generator=torch.Generator().manual_seed(0))
    x = dict(inputs, hidden=hidden)
    torch.testing.assert_close(run_unet(pipe, x), run_unet(want, x), atol=0, rtol=0)
    with pytest.raises(SdloraError, match=r"--config 'owner/absent' is not in the Hugging Face"):
        load_base(str(path), config="owner/absent")
