"""SDXL: the built-in tiny-xl, bases from a folder, a Hub id and an SGM single file, the mixer,
adapter files in kohya's SDXL layout that diffusers reads as we do, and exports."""

from __future__ import annotations

import pytest
import torch
from conftest import make_adapter_file
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors import safe_open

from sdlora.bases.base import load_base
from sdlora.bases.families import SDXL, family_of_pipeline, width_label
from sdlora.bases.recommend import recommended
from sdlora.cli import main
from sdlora.errors import SdloraError
from sdlora.io.single_file import load_single_file, save_pipeline_single_file
from sdlora.lora.blend import Mixer

pytestmark = pytest.mark.usefixtures("one_thread")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tiny_xl():
    return load_base("tiny-xl")


@pytest.fixture(scope="module")
def xl_inputs(inputs):
    """UNet inputs as SDXL takes them (80-wide context, pooled 48-wide text, six time ids)."""
    g = torch.Generator().manual_seed(7)
    return dict(
        inputs,
        hidden=torch.randn(2, 77, 80, generator=g),
        text_embeds=torch.randn(2, 48, generator=g),
        time_ids=torch.tensor(
            [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [96.0, 80.0, 8.0, 0.0, 64.0, 64.0]]
        ),
    )


def run_unet(pipe, x) -> torch.Tensor:
    extra = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
    with torch.no_grad():
        return pipe.unet(x["latents"], x["timesteps"], x["hidden"], added_cond_kwargs=extra).sample


def run_text(pipe, x) -> torch.Tensor:
    with torch.no_grad():
        return pipe.text_encoder(x["ids"])[0]


def run_text_2(pipe, x) -> torch.Tensor:
    """The second encoder's penultimate hidden states and pooled projection, side by side."""
    with torch.no_grad():
        out = pipe.text_encoder_2(x["ids"], output_hidden_states=True)
    return torch.cat([out.hidden_states[-2].flatten(1), out.text_embeds], dim=1)


RUNS = (run_unet, run_text, run_text_2)


def assert_same_outputs(a, b, x, atol=1e-5):
    for run in RUNS:
        torch.testing.assert_close(run(a, x), run(b, x), atol=atol, rtol=0, msg=run.__name__)


def draw(pipe, seed=0) -> torch.Tensor:
    with torch.inference_mode():
        return pipe(
            "a red circle",
            num_inference_steps=2,
            output_type="pt",
            generator=torch.Generator().manual_seed(seed),
        ).images


def test_tiny_xl_is_sdxl_shaped():
    pipe = tiny_xl()
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert family_of_pipeline(pipe) is SDXL
    te1, te2, unet = pipe.text_encoder.config, pipe.text_encoder_2.config, pipe.unet.config
    assert (te1.hidden_size, te2.hidden_size, unet.cross_attention_dim) == (32, 48, 80)
    assert (te1.hidden_act, te2.hidden_act) == ("quick_gelu", "gelu")
    assert unet.addition_embed_type == "text_time"
    assert unet.projection_class_embeddings_input_dim == 6 * 8 + te2.projection_dim
    assert width_label(80) == "SDXL (tiny-xl, sdlora built-in)"
    assert width_label(2048) == "SDXL"
    rec = recommended(pipe)
    assert (rec.guidance, rec.steps, rec.size) == (5.0, 30, 64)
    again = tiny_xl()
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        mine, theirs = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in mine.items()), name


def test_tiny_xl_draws_and_the_time_ids_matter(xl_inputs):
    pipe = tiny_xl()
    image = draw(pipe)
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    other = dict(xl_inputs, time_ids=xl_inputs["time_ids"].flip(0))
    assert (run_unet(pipe, xl_inputs) - run_unet(pipe, other)).abs().max() > 1e-4


@pytest.fixture(scope="module")
def xl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl") / "tiny-xl"
    tiny_xl().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def xl_file(tmp_path_factory):
    return save_pipeline_single_file(
        tiny_xl(), tmp_path_factory.mktemp("xlfile") / "tiny-xl.safetensors", dtype="fp32"
    )


def test_folder_and_single_file_load_as_sdxl(xl_folder, xl_file):
    want = tiny_xl()
    for pipe in (
        load_base(str(xl_folder)),
        load_base(str(xl_file)),  # no config: recognised as tiny-xl by its shapes
        load_base(str(xl_file), config=xl_folder),
    ):
        assert isinstance(pipe, StableDiffusionXLPipeline)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            got, mine = getattr(pipe, name).state_dict(), getattr(want, name).state_dict()
            assert got.keys() == mine.keys(), name
            assert all(torch.equal(got[k], v) for k, v in mine.items()), name


def test_cached_hub_id_loads_offline_as_sdxl(tmp_path, monkeypatch, xl_inputs):
    """A Hub id (from a cache built here) as a base, and as the --config of a single file."""
    repo = tmp_path / "hf" / "hub" / "models--sdlora-test--tiny-xl"
    tiny_xl().save_pretrained(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_base("sdlora-test/tiny-xl")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert_same_outputs(pipe, tiny_xl(), xl_inputs, atol=0)
    file = save_pipeline_single_file(pipe, tmp_path / "xl.safetensors", dtype="fp32")
    described = load_base(str(file), config="sdlora-test/tiny-xl")  # configs from the Hub cache
    assert isinstance(described, StableDiffusionXLPipeline)
    assert (
        described.tokenizer_2("a red circle").input_ids
        == pipe.tokenizer_2("a red circle").input_ids
    )


def make_xl_adapter(path, **kwargs):
    """A random rank-4 adapter on tiny-xl's UNet and both text encoders, saved at `path`."""
    from sdlora.io.files import save_adapter
    from sdlora.lora.inject import (
        TEXT_ENCODER_TARGETS,
        UNET_TARGETS,
        add_trainable,
        collect_adapter,
    )

    pipe = tiny_xl()
    g = torch.Generator().manual_seed(kwargs.get("seed", 0))
    injected = add_trainable(pipe.unet, "unet", UNET_TARGETS["attn"], 4, 8.0, generator=g)
    for comp in ("text_encoder", "text_encoder_2"):
        model = getattr(pipe, comp)
        injected.update(add_trainable(model, comp, TEXT_ENCODER_TARGETS["attn"], 4, generator=g))
    for weights in injected.values():
        with torch.no_grad():
            weights.up.normal_(0.0, 0.2, generator=g)
    save_adapter(collect_adapter(injected), path, overwrite=True)
    return path, pipe


def test_mixer_on_tiny_xl_equals_the_trained_adapter(tmp_path, xl_inputs):
    path, trained = make_xl_adapter(tmp_path / "xl.safetensors")
    pipe = tiny_xl()
    mixer = Mixer(pipe)
    mixer.add(path)
    assert mixer.describe()[0]["modules"] == {"unet": 136, "text_encoder": 8, "text_encoder_2": 8}
    base = tiny_xl()
    for run in RUNS:
        assert (run(pipe, xl_inputs) - run(base, xl_inputs)).abs().max() > 1e-4, run.__name__
    assert_same_outputs(pipe, trained, xl_inputs)
    torch.testing.assert_close(draw(pipe), draw(trained), atol=1e-5, rtol=0)
    mixer.set_strength("xl", 0.0)
    assert_same_outputs(pipe, base, xl_inputs)


def test_ui_mix_merge_on_tiny_xl_writes_kohya_names_and_equals_the_blend(tmp_path, xl_inputs):
    """The web UI's "save the mix as one LoRA" keeps SDXL's SGM names, and the file is exact."""
    from sdlora.io.files import save_adapter
    from sdlora.io.formats import load_adapter
    from sdlora.tools.merge import merge_exact

    a, _ = make_xl_adapter(tmp_path / "a.safetensors", seed=1)
    b, _ = make_xl_adapter(tmp_path / "b.safetensors", seed=2)
    live = tiny_xl()
    mixer = Mixer(live)
    mixer.add(a, strength=0.7)
    mixer.add(b, strength=0.4)
    items = [(load_adapter(a), 0.7), (load_adapter(b), 0.4)]
    merged = merge_exact(items, mixer.models)
    assert set(merged.modules) == set(load_adapter(a).modules)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in merged.modules
    save_adapter(merged, tmp_path / "mix.safetensors")
    ours = tiny_xl()
    Mixer(ours).add(tmp_path / "mix.safetensors")
    assert_same_outputs(ours, live, xl_inputs)


def test_generate_cli_on_tiny_xl(tmp_path):
    import json

    path, _ = make_xl_adapter(tmp_path / "xl.safetensors")
    out = tmp_path / "xl.png"
    argv = ["generate", "--base", "tiny-xl", "--prompt", "a red circle", "--steps", "2"]
    assert main([*argv, "--out", str(out), "--device", "cpu", "--lora", str(path)]) == 0
    image = Image.open(out)
    assert image.size == (64, 64)
    assert json.loads(image.text["sdlora"])["guidance"] == 5.0


def test_saved_adapter_is_in_kohya_sdxl_layout_and_diffusers_reads_it(tmp_path, xl_inputs):
    path, trained = make_xl_adapter(tmp_path / "xl.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert alphas == {4.0}  # alpha = rank: the training scale is folded into the factors
    for name in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_8_1_transformer_blocks_1_attn2_to_k",
        "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0",
        "lora_unet_output_blocks_0_1_transformer_blocks_1_attn2_to_v",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_1_self_attn_out_proj",
    ):
        assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= keys
    assert not any(k.startswith(("lora_te_", "lora_unet_down_blocks")) for k in keys)

    ours, theirs = tiny_xl(), tiny_xl()
    mixer = Mixer(ours)
    mixer.add(path)
    theirs.load_lora_weights(str(path), adapter_name="xl")
    assert_same_outputs(ours, trained, xl_inputs)
    assert_same_outputs(theirs, ours, xl_inputs)
    mixer.set_strength("xl", 0.3)
    theirs.set_adapters(["xl"], [0.3])
    assert_same_outputs(theirs, ours, xl_inputs)


# kohya SDXL module names beside the tiny-xl modules they name, written out by hand: two layers
# per block, so input_blocks 1-2 are down block 0 (no attention), 3 its downsampler, 4-5 down
# block 1, 7-8 down block 2; output_blocks 0-2 up block 0, ..., 6-8 up block 2 (no attention).
# (diffusers 0.42 tells a text encoder's key convention by its out_proj keys, which kohya's files
# always have: without one, it cannot read the file.)
HAND_WRITTEN = (
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "unet",
     "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("lora_unet_input_blocks_8_1_transformer_blocks_1_attn2_to_k", "unet",
     "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k"),
    ("lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj", "unet",
     "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"),
    ("lora_unet_output_blocks_2_1_proj_out", "unet", "up_blocks.0.attentions.2.proj_out"),
    ("lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_out_0", "unet",
     "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0"),
    ("lora_unet_input_blocks_1_0_in_layers_2", "unet", "down_blocks.0.resnets.0.conv1"),
    ("lora_unet_output_blocks_8_0_emb_layers_1", "unet", "up_blocks.2.resnets.2.time_emb_proj"),
    ("lora_te1_text_model_encoder_layers_1_self_attn_v_proj", "text_encoder",
     "encoder.layers.1.self_attn.v_proj"),
    ("lora_te1_text_model_encoder_layers_1_self_attn_out_proj", "text_encoder",
     "encoder.layers.1.self_attn.out_proj"),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1", "text_encoder", "encoder.layers.0.mlp.fc1"),
    ("lora_te2_text_model_encoder_layers_1_self_attn_out_proj", "text_encoder_2",
     "text_model.encoder.layers.1.self_attn.out_proj"),
    ("lora_te2_text_model_encoder_layers_0_mlp_fc2", "text_encoder_2",
     "text_model.encoder.layers.0.mlp.fc2"),
)  # fmt: skip


def hand_written_file(path):
    """A kohya SDXL file from the names above: rank 4, alpha 2, a 3x3 LoCon on the conv."""
    from safetensors.torch import save_file

    pipe, g, tensors = tiny_xl(), torch.Generator().manual_seed(3), {}
    for name, component, module in HAND_WRITTEN:
        weight = getattr(pipe, component).get_submodule(module).weight
        kernel = tuple(weight.shape[2:])
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, weight.shape[1], *kernel, generator=g)
        up = torch.randn(weight.shape[0], 4, *((1, 1) if kernel else ()), generator=g)
        tensors[f"{name}.lora_up.weight"] = up * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def test_hand_written_kohya_sdxl_file_loads_here_and_in_diffusers_alike(tmp_path, xl_inputs):
    from sdlora.bases.pipelines import adaptable_models
    from sdlora.io.formats import load_adapter
    from sdlora.lora.adapter import resolve

    path = hand_written_file(tmp_path / "hand.safetensors")
    ours, theirs = tiny_xl(), tiny_xl()
    resolved, unmatched = resolve(load_adapter(path), adaptable_models(ours))
    assert not unmatched
    assert set(resolved) == {(component, module) for _, component, module in HAND_WRITTEN}
    Mixer(ours).add(path)
    theirs.load_lora_weights(str(path), adapter_name="hand")
    base = tiny_xl()
    for run in RUNS:
        assert (run(ours, xl_inputs) - run(base, xl_inputs)).abs().max() > 1e-4, run.__name__
    assert_same_outputs(theirs, ours, xl_inputs)


def test_diffusers_peft_sdxl_file_reads_back_with_the_same_outputs(tmp_path, xl_inputs):
    """A file in diffusers' own SDXL layout (`save_lora_weights` of all three models)."""
    from peft.utils import get_peft_model_state_dict

    from sdlora.io.formats import load_adapter

    path = hand_written_file(tmp_path / "hand.safetensors")
    theirs = tiny_xl()
    theirs.load_lora_weights(str(path), adapter_name="hand")
    layers, configs = {}, {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(theirs, comp)
        layers[f"{comp}_lora_layers"] = get_peft_model_state_dict(model, adapter_name="hand")
        configs[f"{comp}_lora_adapter_metadata"] = model.peft_config["hand"].to_dict()
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "peft", **layers, **configs)
    saved = tmp_path / "peft" / "pytorch_lora_weights.safetensors"
    with safe_open(str(saved), framework="pt") as f:
        assert any(k.startswith("text_encoder_2.") for k in f.keys())
        assert any(k.startswith("unet.down_blocks.") for k in f.keys())
    adapter = load_adapter(saved)
    assert adapter.metadata["sdlora_detected_format"] == "diffusers-peft"
    counts = {
        c: sum(h[1] == c for h in HAND_WRITTEN) for c in ("unet", "text_encoder", "text_encoder_2")
    }
    assert adapter.components() == counts
    ours = tiny_xl()
    Mixer(ours).add(adapter)
    assert_same_outputs(theirs, ours, xl_inputs)


def plain_weights(pipe) -> dict[str, torch.Tensor]:
    names = [c for c in ("unet", "text_encoder", "text_encoder_2") if hasattr(pipe, c)]
    return {f"{c}.{k}": v.clone() for c in names for k, v in getattr(pipe, c).state_dict().items()}


def sd1_adapter(path):
    return make_adapter_file(lambda: load_base("tiny"), path)[0]


def xl_text_only_adapter(path):
    """Only the text encoders: no UNet width tells the family, the lora_te2_ names do."""
    from safetensors.torch import load_file, save_file

    full, _ = make_xl_adapter(path.with_name("full.safetensors"))
    save_file({k: v for k, v in load_file(full).items() if k.startswith("lora_te")}, str(path))
    return path


@pytest.mark.parametrize(
    ("make", "base", "message"),
    [
        (sd1_adapter, "tiny-xl", "was trained for SD 1.x (cross-attention width 32); the base is "
         "SDXL (cross-attention width 80); pick a base of the adapter's family"),
        (lambda p: make_xl_adapter(p)[0], "tiny", "was trained for SDXL (cross-attention width "
         "80); the base is SD 1.x (cross-attention width 32); pick a base of the adapter's family"),
        (xl_text_only_adapter, "tiny", "was trained for SDXL; the base is SD 1.x "
         "(cross-attention width 32); pick a base of the adapter's family"),
    ],
)  # fmt: skip
def test_adapter_of_another_family_is_refused_whole(tmp_path, make, base, message):
    path = make(tmp_path / "style.safetensors")
    pipe = load_base(base)
    before = plain_weights(pipe)
    mixer = Mixer(pipe)
    with pytest.raises(SdloraError) as err:
        mixer.add(path)
    assert str(err.value) == f"style.safetensors {message}"
    assert not mixer.entries
    after = plain_weights(pipe)
    assert after.keys() == before.keys()  # no wrapper left anywhere
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("base", ["tiny", "tiny-xl"])
def test_cli_generate_refuses_another_family_in_one_line(tmp_path, capsys, base):
    if base == "tiny":
        path, trained, other = make_xl_adapter(tmp_path / "style.safetensors")[0], "SDXL", "SD 1.x"
    else:
        path, trained, other = sd1_adapter(tmp_path / "style.safetensors"), "SD 1.x", "SDXL"
    out = tmp_path / "o.png"
    argv = ["generate", "--prompt", "x", "--steps", "1", "--device", "cpu", "--base", base]
    assert main([*argv, "--lora", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"style.safetensors was trained for {trained} (cross-attention width" in err
    assert f"the base is {other} (cross-attention width" in err
    assert not out.exists()


@pytest.fixture(scope="module")
def live_blend(tmp_path_factory):
    """tiny-xl with a random adapter at strength 0.7, and the adapter's file."""
    path, _ = make_xl_adapter(tmp_path_factory.mktemp("blend") / "a.safetensors", seed=2)
    pipe = tiny_xl()
    Mixer(pipe).add(path, strength=0.7)
    return pipe, path


def test_single_file_export_is_sgm_layout_and_diffusers_loads_the_blend(
    live_blend, xl_folder, tmp_path, xl_inputs
):
    from sdlora.tools.export import export_single_file, merged_components

    live, _ = live_blend
    out = export_single_file(live, tmp_path / "merged.safetensors", dtype="fp32")
    merged = merged_components(live, torch.float32)["text_encoder_2"]
    with safe_open(str(out), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        g = "conditioner.embedders.1.model."
        fused = f.get_tensor(g + "transformer.resblocks.1.attn.in_proj_weight")
        q, k, v = (merged[f"text_model.encoder.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
        assert torch.equal(fused, torch.cat([q, k, v]))  # (3·48, 48) = [q; k; v]
        proj = f.get_tensor(g + "text_projection")
        assert torch.equal(proj, merged["text_projection.weight"].T)  # OpenCLIP: x @ P
    assert meta["sdlora_layout"] == "sgm_sdxl"
    assert {
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        "first_stage_model.decoder.conv_out.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight",
        g + "transformer.resblocks.1.attn.in_proj_bias",
        g + "ln_final.weight",
        g + "positional_embedding",
        g + "token_embedding.weight",
    } <= keys
    assert not any(k.startswith("cond_stage_model.") for k in keys)
    assert not any(".self_attn." in k for k in keys if k.startswith(g))
    theirs = StableDiffusionXLPipeline.from_single_file(
        str(out), config=str(xl_folder), local_files_only=True
    )
    assert_same_outputs(theirs, live, xl_inputs)
    assert_same_outputs(load_single_file(out), live, xl_inputs)


def test_diffusers_folder_export_equals_the_live_blend(live_blend, tmp_path, xl_inputs):
    from sdlora.tools.export import export_diffusers

    live, _ = live_blend
    out = export_diffusers(live, tmp_path / "merged", dtype="fp32")
    loaded = load_base(str(out))
    assert isinstance(loaded, StableDiffusionXLPipeline)
    assert_same_outputs(loaded, live, xl_inputs)


def test_inspect_names_the_family_and_covers_both_text_encoders(live_blend):
    from sdlora.tools.inspect import format_text, inspect_file

    _, path = live_blend
    info = inspect_file(path, base=tiny_xl())
    assert info["architecture"] == "SDXL (tiny-xl, sdlora built-in)"
    assert info["modules"] == {"unet": 136, "text_encoder": 8, "text_encoder_2": 8}
    assert info["coverage"]["matched"] == 152 and info["coverage"]["unmatched"] == 0
    assert "text_encoder_2 q_proj" in info["groups"]
    assert "architecture:  SDXL (tiny-xl, sdlora built-in)" in format_text(info)
    other = inspect_file(path, base=load_base("tiny"))["coverage"]
    assert other["matched"] < 152


def test_convert_both_ways_keeps_the_outputs(live_blend, tmp_path, xl_inputs):
    from sdlora.bases.pipelines import adaptable_models
    from sdlora.io.convert import convert_adapter
    from sdlora.io.formats import load_adapter

    _, path = live_blend
    models = adaptable_models(tiny_xl())
    with pytest.raises(SdloraError, match="pass --base"):
        convert_adapter(load_adapter(path), "diffusers", tmp_path / "x.safetensors")
    peft = convert_adapter(load_adapter(path), "diffusers", tmp_path / "d.safetensors", models)
    with safe_open(str(peft), framework="pt") as f:
        assert any(k.startswith("text_encoder_2.text_model.") for k in f.keys())
        assert any(k.startswith("unet.down_blocks.1.attentions.0.") for k in f.keys())
    back = convert_adapter(load_adapter(peft), "kohya", tmp_path / "k.safetensors", models)
    with safe_open(str(back), framework="pt") as f:
        assert set(f.keys()) == set(safe_open(str(path), framework="pt").keys())
    ours, theirs, again = tiny_xl(), tiny_xl(), tiny_xl()
    Mixer(ours).add(path)
    theirs.load_lora_weights(str(peft), adapter_name="d")
    Mixer(again).add(back)
    assert_same_outputs(theirs, ours, xl_inputs)
    assert_same_outputs(again, ours, xl_inputs)


def test_merge_of_sdxl_adapters_equals_their_blend(tmp_path, xl_inputs):
    from sdlora.io.files import save_adapter
    from sdlora.io.formats import load_adapter
    from sdlora.tools.merge import merge_adapters

    a, _ = make_xl_adapter(tmp_path / "a.safetensors", seed=4)
    b, _ = make_xl_adapter(tmp_path / "b.safetensors", seed=5)
    merged, _ = merge_adapters([(load_adapter(a), 0.5), (load_adapter(b), -0.8)])
    out = save_adapter(merged, tmp_path / "m.safetensors")
    with safe_open(str(out), framework="pt") as f:
        assert any(k.startswith("lora_te1_") for k in f.keys())
    live, single = tiny_xl(), tiny_xl()
    mixer = Mixer(live)
    mixer.add(a, strength=0.5)
    mixer.add(b, strength=-0.8)
    Mixer(single).add(out)
    assert_same_outputs(single, live, xl_inputs)


def test_extract_from_an_sdxl_blend_recovers_it(live_blend, tmp_path, xl_inputs):
    from sdlora.tools.export import export_diffusers
    from sdlora.tools.extract import extract_adapter

    live, _ = live_blend
    tuned = load_base(str(export_diffusers(live, tmp_path / "tuned", dtype="fp32")))
    adapter, report = extract_adapter(tiny_xl(), tuned, rank=4)
    assert report.overall < 1e-5  # a rank-4 change, extracted at rank 4
    assert adapter.components() == {"unet": 136, "text_encoder": 8, "text_encoder_2": 8}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in adapter.modules
    pipe = tiny_xl()
    Mixer(pipe).add(adapter, name="extracted")
    assert_same_outputs(pipe, live, xl_inputs, atol=1e-4)


def test_sdxl_blocks_by_either_name_and_lbw_vectors(tmp_path, xl_inputs):
    from sdlora.lora.blocks import block_of, parse_blocks

    for kohya, component, path in HAND_WRITTEN:
        suffix = kohya.split("_", 2)[2] if component == "unet" else ""
        if component == "unet":
            assert block_of("unet", suffix) == block_of("unet", path), kohya
    assert block_of("unet", "down_blocks.1.attentions.0.proj_in") == "IN04"
    assert block_of("unet", "input_blocks_8_1_proj_in") == "IN08"
    assert block_of("unet", "up_blocks.1.attentions.2.proj_out") == "OUT05"
    assert block_of("unet", "label_emb_0_0") == block_of("unet", "add_embedding.linear_1") == "IN00"
    twenty = parse_blocks(",".join(["1"] * 11 + ["0"] * 9))  # SDXL full: BASE..M00, OUT00..08
    assert twenty["M00"] == 1 and twenty["OUT00"] == 0 and "OUT09" not in twenty
    twelve = parse_blocks([0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0])  # SDXL attention blocks
    assert twelve["BASE"] == 0 and twelve["IN08"] == 1 and twelve["OUT05"] == 0
    path, _ = make_xl_adapter(tmp_path / "a.safetensors")
    muted, base = tiny_xl(), tiny_xl()
    Mixer(muted).add(path, blocks=[0] * 20)
    assert_same_outputs(muted, base, xl_inputs, atol=0)


def test_sdxl_shapes_give_the_well_known_names():
    """Full SDXL base shapes (on meta): SGM names, and diffusers' converters read them back."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdlora.io.single_file import to_single_file_state_dict

    with torch.device("meta"):
        unet = UNet2DConditionModel(  # stable-diffusion-xl-base-1.0's unet/config.json
            sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
        )
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072))
        big_g = CLIPTextModelWithProjection(  # OpenCLIP ViT-bigG/14's text tower
            CLIPTextConfig(
                hidden_size=1280,
                intermediate_size=5120,
                num_attention_heads=20,
                num_hidden_layers=32,
                projection_dim=1280,
                hidden_act="gelu",
            )
        )
    sd = to_single_file_state_dict(
        unet.state_dict(),
        vae.state_dict(),
        clip_l.state_dict(),
        unet.config,
        vae.config,
        text_encoder_2_sd=big_g.state_dict(),
    )
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    m, g = "model.diffusion_model.", "conditioner.embedders.1.model."
    assert shapes[m + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"] == (640, 640)
    assert shapes[m + "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight"] == (1280, 2048)
    assert shapes[m + "middle_block.1.transformer_blocks.9.ff.net.2.weight"] == (1280, 5120)
    assert shapes[m + "output_blocks.2.2.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes[m + "output_blocks.8.0.skip_connection.weight"] == (320, 640, 1, 1)
    assert shapes[m + "label_emb.0.0.weight"] == (1280, 2816)
    assert not any(k.startswith(m + "input_blocks.9.") for k in sd)  # 9 input blocks, 0-8
    assert shapes[g + "transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert shapes[g + "text_projection"] == (1280, 1280)
    assert shapes[g + "positional_embedding"] == (77, 1280)
    assert shapes["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] == (
        768,
    )
    back = convert_ldm_unet_checkpoint(sd, unet.config)
    want = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in back.items()} == want
    back = convert_open_clip_checkpoint(big_g, sd, prefix=g)
    assert {k: tuple(v.shape) for k, v in back.items()} == {
        k: tuple(v.shape) for k, v in big_g.state_dict().items() if not k.endswith("position_ids")
    }


def test_full_sdxl_file_needs_its_config_folder(tmp_path):
    from safetensors.torch import save_file

    names = {
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (2, 2048),
        "first_stage_model.decoder.conv_out.weight": (1,),
        "conditioner.embedders.1.model.positional_embedding": (1,),
    }
    path = tmp_path / "sd_xl_base_1.0.safetensors"
    save_file({k: torch.zeros(s) for k, s in names.items()}, str(path))
    with pytest.raises(SdloraError, match=r"a full SDXL checkpoint; .*--config DIR"):
        load_single_file(path)
