"""Files other tools read: the family labels every writer sets, A1111's hashes, ComfyUI's own
layouts (`diffusion_model.` / `text_encoders.` keys, `.diff` / `.diff_b`)."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import make_adapter_file
from safetensors.torch import load_file, save, save_file

from sdlora.bases.base import load_base
from sdlora.bases.pipelines import adaptable_models
from sdlora.io.convert import convert_adapter
from sdlora.io.files import read_safetensors, save_adapter
from sdlora.io.formats import load_adapter
from sdlora.io.labels import a1111_hashes
from sdlora.lora.blend import Mixer
from sdlora.lora.inject import add_trainable, collect_adapter
from sdlora.tools.distill import distill_adapter
from sdlora.tools.extract import extract_adapter
from sdlora.tools.inspect import inspect_file
from sdlora.tools.merge import merge_adapters

pytestmark = pytest.mark.usefixtures("one_thread")

# family base -> (ss_base_model_version, ss_v2, modelspec.architecture, resolution) as kohya
# writes them; the tiny bases predict as their real families' native models (tiny-v2: v).
EXPECTED = {
    "tiny": ("sd_v1", "False", "stable-diffusion-v1/lora"),
    "tiny-v2": ("sd_v2_v", "True", "stable-diffusion-v2-768-v/lora"),
    "tiny-xl": ("sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora"),
}
BASES = list(EXPECTED)


def header(path) -> dict[str, str]:
    return read_safetensors(path)[1]


def check_labels(path, base: str) -> dict[str, str]:
    """The family labels A1111, kohya and SwarmUI read, and hashes that match the file."""
    meta = header(path)
    version, v2, architecture = EXPECTED[base]
    assert meta["ss_base_model_version"] == version
    assert meta["ss_v2"] == v2
    assert meta["modelspec.architecture"] == architecture
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.title"] == path.stem
    assert meta["modelspec.date"][:2] == "20"
    assert meta["modelspec.resolution"].count("x") == 1
    # A1111's hash: sha256 of the bytes after the header, as its hashes.py computes it
    data = path.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[start:]).hexdigest()
    assert len(meta["sshs_legacy_hash"]) == 8
    if base == "tiny-xl":  # kohya's SDXL names for both text encoders and the SGM UNet
        keys = {k.split(".")[0] for k in load_file(path)}
        assert not any(k.startswith("lora_te_") for k in keys)
    return meta


def module(model: torch.nn.Module, tail: str) -> torch.nn.Module:
    """The module whose path ends in `tail` (transformers 4 and 5 nest CLIP differently)."""
    return next(m for n, m in model.named_modules() if n.endswith(tail))


def nonlinear_adapter(base: str, nonlinearity: str = "relu", seed: int = 3):
    """A nonlinear adapter on the UNet's attention of `base`, up non-zero."""
    pipe = load_base(base)
    g = torch.Generator().manual_seed(seed)
    injected = add_trainable(
        pipe.unet, "unet", ("to_q", "to_v"), 2, None, nonlinearity, generator=g
    )
    for weights in injected.values():
        with torch.no_grad():
            weights.up.normal_(0.0, 0.2, generator=g)
    return collect_adapter(injected, {"sdlora_base_model": base})


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One linear adapter file per family, written as the trainer's tests write theirs."""
    folder = tmp_path_factory.mktemp("made")
    return {
        base: make_adapter_file(lambda b=base: load_base(b), folder / f"{base}.safetensors")[0]
        for base in BASES
    }


@pytest.mark.parametrize("base", BASES)
def test_saved_file_is_labelled(made, base):
    check_labels(made[base], base)


@pytest.mark.parametrize("base", BASES)
def test_merge_labels(made, base, tmp_path):
    adapter = load_adapter(made[base])
    adapter.metadata = {}  # nothing to copy: the family comes from the adapter itself
    merged, _ = merge_adapters([(adapter, 0.5), (load_adapter(made[base]), 1.0)])
    check_labels(save_adapter(merged, tmp_path / "merged.safetensors"), base)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("to", ["kohya", "diffusers"])
def test_convert_labels(made, base, to, tmp_path):
    models = adaptable_models(load_base(base))  # SDXL's SGM names need the base to convert
    out = convert_adapter(load_adapter(made[base]), to, tmp_path / f"{to}.safetensors", models)
    check_labels(out, base)


@pytest.mark.parametrize("base", BASES)
def test_extract_labels(base, tmp_path):
    """The family comes from the base: on tiny-xl a change in the first text encoder alone (no
    UNet attention, no second encoder to show SDXL) still makes an SDXL file, lora_te1_ keys."""
    pipe, tuned = load_base(base), load_base(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer = module(tuned.text_encoder, "layers.0.self_attn.q_proj")
        layer.weight.add_(torch.randn(layer.weight.shape, generator=g))
    adapter, _ = extract_adapter(pipe, tuned, rank=2)
    out = save_adapter(adapter, tmp_path / "extracted.safetensors")
    check_labels(out, base)
    keys = set(load_file(out))
    prefix = "lora_te1_" if base == "tiny-xl" else "lora_te_"
    assert keys and all(k.startswith(prefix) for k in keys), sorted(keys)[:3]


def test_extract_sdxl_both_text_encoders(tmp_path):
    pipe, tuned = load_base("tiny-xl"), load_base("tiny-xl")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for encoder in (tuned.text_encoder, tuned.text_encoder_2):
            layer = module(encoder, "layers.0.self_attn.k_proj")
            layer.weight.add_(torch.randn(layer.weight.shape, generator=g))
    adapter, _ = extract_adapter(pipe, tuned, rank=2)
    out = save_adapter(adapter, tmp_path / "both.safetensors")
    check_labels(out, "tiny-xl")
    assert {k.split("_")[1] for k in load_file(out)} == {"te1", "te2"}


@pytest.mark.parametrize("base", BASES)
def test_distill_labels(base, tmp_path):
    """distill on every family (SDXL: pooled text and size ids through the family's
    conditioning); the tiny-xl file is one diffusers loads, and changes its UNet."""
    adapter = nonlinear_adapter(base)
    adapter.metadata["sdlora_trigger_words"] = json.dumps(["zxq"])
    pipe = load_base(base)
    linear, report = distill_adapter(pipe, adapter, 2, prompts=["a red circle"], samples=2)
    out = save_adapter(linear, tmp_path / "distilled.safetensors")
    meta = check_labels(out, base)
    assert meta["modelspec.trigger_phrase"] == "zxq"
    assert report.overall < 1.0
    if base != "tiny-xl":
        return
    from diffusers import StableDiffusionXLPipeline

    theirs = StableDiffusionXLPipeline(**load_base("tiny-xl").components)
    base_out = xl_unet(theirs)
    theirs.load_lora_weights(str(out))
    ours = load_base("tiny-xl")
    Mixer(ours).add(out)
    loaded = xl_unet(theirs)
    assert (loaded - base_out).abs().max() > 1e-4  # the adapter changes the UNet there
    torch.testing.assert_close(loaded, xl_unet(ours), rtol=0, atol=1e-5)


def xl_unet(pipe) -> torch.Tensor:
    """The tiny-xl UNet on fixed inputs, with its pooled text and size ids."""
    g = torch.Generator().manual_seed(4)
    unet = pipe.unet
    extra = {
        "text_embeds": torch.randn(2, 48, generator=g),  # the second encoder's pooled width
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
    }
    latents = torch.randn(2, 4, 8, 8, generator=g)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 700]), hidden, added_cond_kwargs=extra).sample


def trainer_metadata(base: str, pipe, data_dir):
    """The trainer's metadata (`adapter_metadata`) for a run on `data_dir` with two folders."""
    from sdlora.bases.families import family_of_pipeline
    from sdlora.train.config import TrainConfig
    from sdlora.train.data import BatchPlan, ImageItem
    from sdlora.train.finish import adapter_metadata

    items = [
        ImageItem(data_dir / "10_circles" / "a.png", "red circle, flat", 10, (64, 64), (64, 64)),
        ImageItem(data_dir / "10_circles" / "b.png", "blue circle", 10, (64, 64), (64, 64)),
        ImageItem(data_dir / "c.png", "green star, flat", 1, (64, 64), (64, 64)),
    ]
    config = TrainConfig(base=base, resolution=64, trigger="zxq", data_dir=str(data_dir))
    return adapter_metadata(
        config,
        BatchPlan(items, batch_size=1, seed=0),
        step=2,
        total_steps=4,
        targets={},
        accelerator=SimpleNamespace(mixed_precision="no"),
        family=family_of_pipeline(pipe),
        prediction_type=pipe.scheduler.config.prediction_type,
    )


@pytest.mark.parametrize("base", BASES)
def test_trainer_metadata_labels(base, tmp_path):
    """The trainer's metadata through the writer: the same labels, the training resolution and
    trigger word in the model spec, kohya's dataset keys."""
    pipe = load_base(base)
    meta = trainer_metadata(base, pipe, tmp_path / "data")
    adapter = load_adapter(make_adapter_file(lambda: pipe, tmp_path / "a.safetensors")[0])
    adapter.metadata = meta
    written = check_labels(save_adapter(adapter, tmp_path / "trained.safetensors"), base)
    assert written["modelspec.resolution"] == "64x64"
    assert written["modelspec.trigger_phrase"] == "zxq"
    assert json.loads(written["ss_tag_frequency"]) == {
        "10_circles": {"zxq": 2, "red circle": 1, "flat": 1, "blue circle": 1},
        "data": {"zxq": 1, "green star": 1, "flat": 1},
    }
    assert json.loads(written["ss_dataset_dirs"]) == {
        "10_circles": {"n_repeats": 10, "img_count": 2},
        "data": {"n_repeats": 1, "img_count": 1},
    }
    assert written["ss_num_train_images"] == "21"  # images × repeats, as kohya counts them
    assert written["ss_max_train_steps"] == "4" and written["ss_steps"] == "2"


def test_distill_finds_the_trained_tags_without_prompts(tmp_path):
    """A trained adapter's recorded tags are distill's prompts when none are given."""
    from sdlora.tools.distill import prompts_from_metadata

    pipe = load_base("tiny")
    adapter = nonlinear_adapter("tiny")
    adapter.metadata = trainer_metadata("tiny", pipe, tmp_path / "data")
    path = save_adapter(adapter, tmp_path / "relu.safetensors")
    loaded = load_adapter(path)
    found = prompts_from_metadata(loaded.metadata)
    assert "zxq, red circle, flat, blue circle" in found and "zxq, green star, flat" in found
    linear, report = distill_adapter(pipe, loaded, 2, prompts=None, samples=1)
    assert report.prompts == found
    assert json.loads(linear.metadata["sdlora_distill_prompts"]) == found


def test_hashes_are_kohyas():
    """`sshs_legacy_hash` reads 64 KiB at 1 MiB of the file with only its ss_ metadata, and the
    model hash does not depend on the metadata (kohya's precalculate_safetensors_hashes)."""
    g = torch.Generator().manual_seed(0)
    tensors = {"a.lora_down.weight": torch.randn(300, 1000, generator=g)}  # > 1.1 MiB
    meta = {"ss_network_dim": "300", "other": "x" * 500}
    labels = a1111_hashes(tensors, meta)
    data = save(tensors, metadata={"ss_network_dim": "300"})
    assert labels["sshs_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    again = a1111_hashes(tensors, {"ss_other": "y"})
    assert again["sshs_model_hash"] == labels["sshs_model_hash"]
    assert again["sshs_legacy_hash"] != labels["sshs_legacy_hash"]  # the header moved the bytes


def test_stale_hashes_from_a_source_file_are_replaced(made, tmp_path):
    adapter = load_adapter(made["tiny"])
    adapter.metadata["sshs_model_hash"] = "0" * 64
    out = save_adapter(adapter, tmp_path / "copy.safetensors")
    assert header(out)["sshs_model_hash"] != "0" * 64
    check_labels(out, "tiny")


# ------------------------------------------------------------------------ ComfyUI's own layouts
# Built from ComfyUI's key rules: its trainer (comfy_extras/nodes_train.py) saves
# `<module path>.lora_up.weight` / `.lora_down.weight` (no alpha: scale 1) for 2-D and 4-D
# weights, `<path>.diff` for 1-D weights (norms) and `<path>.diff_b` for every bias, with paths
# of ComfyUI's model: `diffusion_model.<original UNet path>`; its extract node
# (nodes_lora_extract.py) writes the same names in fp16, `.diff` for full differences of 2-D/4-D
# weights, and `text_encoders.clip_l.transformer.<CLIP path>` for the text encoder.

UNET_MODULES = (  # diffusers path tails in the tiny UNet: Linear, Linear+bias, conv 1x1, conv 3x3
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.0.attentions.0.proj_in",
    "down_blocks.0.resnets.0.conv1",
    "up_blocks.1.resnets.0.conv2",
)
UNET_NORMS = ("down_blocks.0.resnets.0.norm1", "down_blocks.0.attentions.0.norm")
TEXT_MODULES = ("layers.0.self_attn.q_proj", "layers.1.mlp.fc1")
TEXT_NORMS = ("layers.0.layer_norm1",)


def comfy_file(path, layout: str, dtype=torch.float32):
    """(file, {(component, module path, "weight"|"bias"): exact ΔP}) in ComfyUI's `layout`
    ("train" or "extract") for the tiny base."""
    from sdlora.io.ldm_names import original_module_paths

    pipe = load_base("tiny")
    unet_paths = [p for p, _ in pipe.unet.named_modules()]
    original = original_module_paths(pipe.unet.config, unet_paths)
    g = torch.Generator().manual_seed(11)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.1).to(dtype)

    tensors, deltas = {}, {}

    def add(comp, path, prefix, module, full: bool):
        w = module.weight
        if w.dim() == 1:  # a norm: its weight difference, 1-D .diff
            tensors[f"{prefix}.diff"] = d = rnd(*w.shape)
            deltas[(comp, path, "weight")] = d.float()
        elif full:  # the extract node's full difference
            tensors[f"{prefix}.diff"] = d = rnd(*w.shape)
            deltas[(comp, path, "weight")] = d.float()
        else:
            rank = 2
            down = rnd(rank, *w.shape[1:])
            up = rnd(w.shape[0], rank, *([1, 1] if w.dim() == 4 else []))
            tensors[f"{prefix}.lora_down.weight"], tensors[f"{prefix}.lora_up.weight"] = down, up
            delta = up.float().flatten(1) @ down.float().flatten(1)
            deltas[(comp, path, "weight")] = delta.reshape(w.shape)
        if module.bias is not None:
            tensors[f"{prefix}.diff_b"] = b = rnd(*module.bias.shape)
            deltas[(comp, path, "bias")] = b.float()

    for i, tail in enumerate(UNET_MODULES + UNET_NORMS):
        full = layout == "extract" and i % 2 == 1
        module = pipe.unet.get_submodule(tail)
        add("unet", tail, f"diffusion_model.{original[tail]}", module, full)
    for i, tail in enumerate(TEXT_MODULES + TEXT_NORMS):
        name = next(n for n, _ in pipe.text_encoder.named_modules() if n.endswith(tail))
        clip = "text_model." + name.removeprefix("text_model.")  # ComfyUI keeps text_model.
        prefix = f"text_encoders.clip_l.transformer.{clip}"
        add("text_encoder", name, prefix, pipe.text_encoder.get_submodule(name), i == 1)
    save_file(tensors, path)
    return path, deltas


def by_hand(deltas, strength: float):
    """The tiny base with every ΔP added at `strength`, in fp32."""
    pipe = load_base("tiny")
    with torch.no_grad():
        for (comp, path, kind), delta in deltas.items():
            getattr(getattr(pipe, comp).get_submodule(path), kind).add_(strength * delta)
    return pipe


def outputs(pipe, inputs) -> dict[str, torch.Tensor]:
    from conftest import run_text, run_unet

    return {"unet": run_unet(pipe, inputs), "text": run_text(pipe, inputs)}


@pytest.mark.parametrize("layout", ["train", "extract"])
def test_comfyui_layouts_load_as_their_deltas_by_hand(layout, tmp_path, inputs):
    """ComfyUI trainer / extract-node files (LoRA factors, full .diff, .diff_b, norm .diff) give
    the outputs of adding those differences by hand, fused and unfused, at two strengths; the
    last strength change equals one fresh load; removing the adapter gives the base back."""
    dtype = torch.float16 if layout == "extract" else torch.float32
    path, deltas = comfy_file(tmp_path / f"{layout}.safetensors", layout, dtype)
    adapter = load_adapter(path)
    assert adapter.metadata["sdlora_detected_format"] == "comfyui-full+locon+lora"
    assert adapter.metadata["ss_base_model_version"] == "sd_v1"  # original names, SD 1.x
    base = outputs(load_base("tiny"), inputs)
    for fuse in (True, False):
        ours = load_base("tiny")
        mixer = Mixer(ours)
        mixer.add(path, name="c", strength=0.3, fuse=fuse)
        mixer.set_strength("c", 0.7)
        got, expected = outputs(ours, inputs), outputs(by_hand(deltas, 0.7), inputs)
        for name in got:
            assert (expected[name] - base[name]).abs().max() > 1e-3, name
            torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-6, msg=name)
        mixer.set_strength("c", 0.0)
        for name, value in outputs(ours, inputs).items():
            torch.testing.assert_close(value, base[name], rtol=0, atol=0)
        mixer.remove("c")
        fresh = load_base("tiny")
        for (comp, module_path, kind), _ in deltas.items():
            theirs = getattr(getattr(fresh, comp).get_submodule(module_path), kind)
            mine = getattr(getattr(ours, comp).get_submodule(module_path), kind)
            assert torch.equal(mine, theirs)  # bit for bit
    info = inspect_file(path)
    biases = sum(kind == "bias" for _, _, kind in deltas)
    norms = sum(kind == "weight" and d.dim() == 1 for (_, _, kind), d in deltas.items())
    assert info["differences"] == {"bias": biases, "norm weight": norms}


def test_comfyui_file_exports_and_saves_exactly(tmp_path, inputs):
    """Export merges the differences exactly (biases and norms in the checkpoint), and a file
    written back (kohya names, .diff_b / .diff beside the factors) loads to the same outputs."""
    from sdlora.tools.export import merged_components

    path, deltas = comfy_file(tmp_path / "c.safetensors", "train")
    ours = load_base("tiny")
    Mixer(ours).add(path, strength=0.5)
    merged = merged_components(ours, torch.float32)
    expected = by_hand(deltas, 0.5)
    for (comp, module_path, kind), _ in deltas.items():
        value = getattr(getattr(expected, comp).get_submodule(module_path), kind)
        torch.testing.assert_close(merged[comp][f"{module_path}.{kind}"], value, rtol=0, atol=1e-6)
    again = save_adapter(load_adapter(path), tmp_path / "again.safetensors")
    assert any(k.endswith(".diff_b") for k in load_file(again))
    check_labels(again, "tiny")
    reloaded = load_base("tiny")
    Mixer(reloaded).add(again, strength=0.5)
    for name, value in outputs(reloaded, inputs).items():
        torch.testing.assert_close(value, outputs(expected, inputs)[name], rtol=0, atol=1e-6)


def test_comfyui_differences_merge_exactly_and_refuse_what_cannot_hold_them(tmp_path, inputs):
    """merge (sum) adds the bias/norm differences exactly; methods that trim deltas and the
    diffusers layout, which have no place for them, refuse in one line, writing nothing."""
    from sdlora.errors import SdloraError

    path, deltas = comfy_file(tmp_path / "c.safetensors", "train")
    adapter = load_adapter(path)
    merged, _ = merge_adapters([(adapter, 0.25), (load_adapter(path), 0.5)], rank=2)
    assert merged.diffs.keys() == adapter.diffs.keys()
    for key, delta in adapter.diffs.items():
        torch.testing.assert_close(merged.diffs[key], 0.75 * delta, rtol=0, atol=1e-7)
    with pytest.raises(SdloraError, match=r"c\.safetensors: holds bias/norm differences"):
        merge_adapters([(adapter, 1.0)], method="ties", density=0.5)
    out = tmp_path / "d.safetensors"
    with pytest.raises(SdloraError, match="--to kohya"):
        convert_adapter(adapter, "diffusers", out)
    assert not out.exists()
