"""Merged export reproduces the live blend: diffusers folder, single file, diffusers' loaders."""

import pytest
import torch
from conftest import make_adapter_file, run_text, run_unet
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from sdlora.bases.base import load_base
from sdlora.errors import SdloraError
from sdlora.lora.blend import Mixer
from sdlora.tools.export import export_diffusers, export_single_file


@pytest.fixture
def blend(tmp_path):
    a, _ = make_adapter_file(lambda: load_base("tiny"), tmp_path / "a.safetensors", seed=1)
    b, _ = make_adapter_file(
        lambda: load_base("tiny"), tmp_path / "b.safetensors", rank=2, alpha=1.0, seed=2
    )
    pipe = load_base("tiny")
    mixer = Mixer(pipe)
    mixer.add(a, strength=0.6)
    mixer.add(b, strength=1.3)
    return pipe, mixer


def test_diffusers_folder_reproduces_blend(blend, inputs, tmp_path):
    pipe, _ = blend
    out = export_diffusers(pipe, tmp_path / "merged", dtype="fp32")
    loaded = load_base(str(out))
    torch.testing.assert_close(
        run_unet(loaded, inputs), run_unet(pipe, inputs), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        run_text(loaded, inputs), run_text(pipe, inputs), atol=1e-5, rtol=1e-5
    )
    assert not any(".base." in k or "adapters" in k for k in loaded.unet.state_dict())
    # diffusers' own loader agrees
    theirs = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    torch.testing.assert_close(
        run_unet(theirs, inputs), run_unet(pipe, inputs), atol=1e-5, rtol=1e-5
    )


def test_single_file_reproduces_blend(blend, inputs, tmp_path):
    pipe, _ = blend
    out = export_single_file(pipe, tmp_path / "merged.safetensors", dtype="fp32")
    config = tmp_path / "config"
    load_base("tiny").save_pretrained(config)
    theirs = StableDiffusionPipeline.from_single_file(
        str(out), config=str(config), local_files_only=True
    )
    torch.testing.assert_close(
        run_unet(theirs, inputs), run_unet(pipe, inputs), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        run_text(theirs, inputs), run_text(pipe, inputs), atol=1e-5, rtol=1e-5
    )
    ours = load_base(str(out))
    torch.testing.assert_close(run_unet(ours, inputs), run_unet(pipe, inputs), atol=1e-5, rtol=1e-5)


def test_fp16_export_is_close(blend, inputs, tmp_path):
    pipe, _ = blend
    out = export_diffusers(pipe, tmp_path / "half", dtype="fp16")
    stored = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float16 for v in stored.values())
    loaded = load_base(str(out), dtype=torch.float32)
    torch.testing.assert_close(
        run_unet(loaded, inputs), run_unet(pipe, inputs), atol=2e-2, rtol=2e-2
    )


def test_export_does_not_disturb_live_blend(blend, inputs, tmp_path):
    pipe, mixer = blend
    before = run_unet(pipe, inputs)
    export_diffusers(pipe, tmp_path / "m", dtype="bf16")
    torch.testing.assert_close(run_unet(pipe, inputs), before, atol=0, rtol=0)
    mixer.set_strength("a", 0.0)  # the live mix keeps working
    assert not torch.equal(run_unet(pipe, inputs), before)


def test_nonlinear_adapter_is_refused_by_name(tiny, tmp_path):
    path, _ = make_adapter_file(
        lambda: load_base("tiny"), tmp_path / "curvy.safetensors", nonlinearity="gelu"
    )
    mixer = Mixer(tiny)
    mixer.add(path)
    with pytest.raises(SdloraError, match="nonlinear adapters cannot be merged.*curvy \\(gelu\\)"):
        export_diffusers(tiny, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    mixer.set_strength("curvy", 0.0)
    export_diffusers(tiny, tmp_path / "out")  # at strength 0 it contributes nothing: allowed


def test_existing_output_is_kept(tiny, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SdloraError, match="already exists"):
        export_diffusers(tiny, out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(SdloraError, match=r"holds 1 file that is not part of a diffusers model"):
        export_diffusers(tiny, out, overwrite=True)  # issue 18: not a model folder, not replaced
    assert (out / "keep.txt").read_text() == "mine"
    (out / "model_index.json").write_text("{}")  # a model folder: --overwrite replaces it
    export_diffusers(tiny, out, overwrite=True)
    assert (out / "model_index.json").read_text() != "{}" and not (out / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp folders left behind
