"""SD 3.x files: adapters in the layout kohya and ComfyUI read (SAI module names, fused qkv), read
back from kohya, OneTrainer and diffusers/PEFT files, and the Stability single file, all on the
built-in `tiny-sd3` against diffusers' own loaders.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

from sdlora.bases.base import load_base
from sdlora.bases.families import SD3
from sdlora.bases.pipelines import adaptable_models
from sdlora.errors import SdloraError
from sdlora.io.convert import convert_adapter
from sdlora.io.files import read_safetensors, save_adapter
from sdlora.io.formats import load_adapter
from sdlora.io.sd3_names import fuse_qkv, split_qkv
from sdlora.io.sd3_single_file import transformer_to_sai
from sdlora.io.single_file import _write_builtin_configs
from sdlora.lora.adapter import Adapter, ModuleFactors, adapter_family, module_keys, weight_of
from sdlora.lora.blend import Mixer
from sdlora.tools.export import export_single_file

ATOL = 1e-5


def delta(f: ModuleFactors) -> torch.Tensor:
    return f.up.float().flatten(1) @ f.down.float().flatten(1) * f.scale


def random_adapter(pipe, seed=0, components=None, scale=0.3) -> Adapter:
    """Factors on every Linear of the given components (all adaptable ones by default), ranks
    1-3 and alphas that differ, so scales and fused ranks are exercised."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for comp, model in adaptable_models(pipe).items():
        if model is None or (components is not None and comp not in components):
            continue
        for i, (path, key) in enumerate(sorted(module_keys(model, comp).items())):
            weight = weight_of(model, path)
            if weight.dim() != 2:
                continue
            rank = 1 + i % 3
            down = torch.randn(rank, weight.shape[1], generator=g) * scale
            up = torch.randn(weight.shape[0], rank, generator=g) * scale
            modules[key] = ModuleFactors(down, up, alpha=0.5 * (1 + i % 4))
    return Adapter(modules, source="random.safetensors")


def transformer_inputs(t, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, 16, 8, 8, generator=g),
        torch.randn(1, 20, t.config.joint_attention_dim, generator=g),
        torch.randn(1, t.config.pooled_projection_dim, generator=g),
        torch.tensor([300.0]),
    )


@torch.no_grad()
def outputs(pipe) -> dict[str, torch.Tensor]:
    """The transformer's output and each text encoder's penultimate states (and pooled
    projections), as the SD3 pipeline uses them."""
    out = {"transformer": pipe.transformer(*transformer_inputs(pipe.transformer)).sample}
    ids = pipe.tokenizer("a red circle on a blue square", return_tensors="pt").input_ids
    for comp in ("text_encoder", "text_encoder_2"):
        result = getattr(pipe, comp)(ids, output_hidden_states=True)
        out[comp] = result.hidden_states[-2]
        out[comp + " pooled"] = result.text_embeds
    if pipe.text_encoder_3 is not None:
        t5_ids = pipe.tokenizer_3("a red circle", return_tensors="pt").input_ids
        out["text_encoder_3"] = pipe.text_encoder_3(t5_ids).last_hidden_state
    return out


def assert_outputs_close(ours, theirs, skip=()):
    for name, value in ours.items():
        if name not in skip:
            torch.testing.assert_close(value, theirs[name], rtol=0, atol=ATOL, msg=name)


# ---------------------------------------------------------------------------------------------
# fused qkv


def test_fused_qkv_is_exact_on_a_block():
    """q/k/v LoRAs of different ranks and alphas on block 0 of tiny-sd3 -> one LoRA on the SAI
    fused qkv: downs stacked, ups block-diagonal, (W_qkv + ΔW_fused)·x equals the three
    adapted projections; split back, each gets its own factors; any other fused factors split
    into slices whose products are exactly the fused ΔW's rows."""
    attn = load_base("tiny-sd3").transformer.transformer_blocks[0].attn
    width, inputs = attn.to_q.weight.shape
    g = torch.Generator().manual_seed(1)
    ranks, alphas = (2, 3, 1), (1.0, 6.0, 0.25)
    parts = {
        slot: ModuleFactors(
            torch.randn(r, inputs, generator=g), torch.randn(width, r, generator=g), alpha
        )
        for slot, (r, alpha) in enumerate(zip(ranks, alphas, strict=True))
    }
    fused = fuse_qkv(parts)
    assert fused.rank == sum(ranks) and fused.scale == 1.0
    # block-diagonal: rows of q use only q's columns, and so on
    assert not fused.up[:width, 2:].any() and not fused.up[width : 2 * width, :2].any()
    assert not fused.up[width : 2 * width, 5:].any() and not fused.up[2 * width :, :5].any()
    x = torch.randn(5, inputs, generator=g)
    projections = (attn.to_q, attn.to_k, attn.to_v)
    w_qkv = torch.cat([p.weight for p in projections])  # the SAI checkpoint's qkv
    with torch.no_grad():
        separate = torch.cat(
            [x @ (p.weight + delta(parts[i])).T for i, p in enumerate(projections)], dim=1
        )
        together = x @ (w_qkv + delta(fused)).T
    torch.testing.assert_close(together, separate, rtol=0, atol=1e-5)
    back = split_qkv(fused)
    for slot, part in parts.items():
        assert back[slot].rank == part.rank
        torch.testing.assert_close(delta(back[slot]), delta(part), rtol=0, atol=1e-6)
    # a projection left out stays zero, and reading gives only the others back
    partial = fuse_qkv({0: parts[0], 2: parts[2]})
    assert not partial.up[width : 2 * width].any()
    assert sorted(split_qkv(partial)) == [0, 2]
    # factors without the block structure (columns shared by q, k, v) still split exactly
    general = ModuleFactors(
        torch.randn(4, inputs, generator=g), torch.randn(3 * width, 4, generator=g), alpha=2.0
    )
    slices = split_qkv(general)
    torch.testing.assert_close(
        torch.cat([delta(slices[i]) for i in range(3)]), delta(general), rtol=0, atol=1e-6
    )


# ---------------------------------------------------------------------------------------------
# adapter files


def test_kohya_layout_names_weights_and_metadata(tmp_path):
    """Our SD3 file: kohya/ComfyUI names (SAI modules, fused qkv, MMDiT-X attn2, lora_te1/2/3),
    SAI weights + the file's ΔW = the SAI conversion of (diffusers weights + in-memory ΔW) for every
    transformer module (so the fusion and the swapped two-chunk modulations are right), read
    back exactly, and the family in the header for other tools."""
    base = load_base("tiny-sd3")
    adapter = random_adapter(base)
    path = save_adapter(adapter, tmp_path / "sd3.safetensors")
    tensors, metadata = read_safetensors(path)
    names = {k.split(".")[0] for k in tensors}
    for expected in (
        "lora_unet_joint_blocks_0_x_block_attn_qkv",
        "lora_unet_joint_blocks_0_x_block_attn_proj",
        "lora_unet_joint_blocks_0_context_block_attn_qkv",
        "lora_unet_joint_blocks_0_context_block_attn_proj",
        "lora_unet_joint_blocks_0_x_block_attn2_qkv",
        "lora_unet_joint_blocks_0_x_block_attn2_proj",
        "lora_unet_joint_blocks_0_x_block_mlp_fc1",
        "lora_unet_joint_blocks_0_context_block_mlp_fc2",
        "lora_unet_joint_blocks_1_x_block_adaLN_modulation_1",
        "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1",
        "lora_unet_final_layer_adaLN_modulation_1",
        "lora_unet_final_layer_linear",
        "lora_unet_context_embedder",
        "lora_unet_t_embedder_mlp_0",
        "lora_unet_y_embedder_mlp_2",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_1_mlp_fc2",
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q",
    ):
        assert expected in names, expected
    assert not any("transformer_blocks" in n or "to_q" in n for n in names)
    assert metadata["ss_base_model_version"] == "sd3"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v3.5-medium/lora"
    # every SAI weight + the file's ΔW == SAI conversion of the diffusers weights + ΔW
    t = base.transformer
    plain = {k: v.clone() for k, v in t.state_dict().items()}
    moved = dict(plain)
    for key, factors in adapter.modules.items():
        if key.startswith("lora_transformer_"):
            path_ = next(p for p, k in module_keys(t, "transformer").items() if k == key)
            moved[path_ + ".weight"] = plain[path_ + ".weight"] + delta(factors)
    sai_plain = transformer_to_sai(plain, t.config)
    sai_moved = transformer_to_sai(moved, t.config)
    flat = {k.removesuffix(".weight").replace(".", "_"): k for k in sai_plain}
    checked = 0
    for name in names:
        if not name.startswith("lora_unet_"):
            continue
        weight = flat["model_diffusion_model_" + name.removeprefix("lora_unet_")]
        factors = ModuleFactors(
            tensors[name + ".lora_down.weight"],
            tensors[name + ".lora_up.weight"],
            float(tensors[name + ".alpha"]),
        )
        torch.testing.assert_close(
            sai_plain[weight] + delta(factors), sai_moved[weight], rtol=0, atol=1e-5
        )
        checked += 1
    assert checked == len({n for n in names if n.startswith("lora_unet_")}) >= 20
    back = load_adapter(path)
    assert back.metadata["sdlora_detected_format"] == "sdlora"
    assert set(back.modules) == set(adapter.modules)
    for key, factors in adapter.modules.items():
        torch.testing.assert_close(delta(back.modules[key]), delta(factors), rtol=0, atol=1e-6)
    assert adapter_family(back) is SD3
    # and through the diffusers layout (transformer., text_encoder*., T5's text_encoder_3.)
    models = adaptable_models(base)
    peft = load_adapter(
        convert_adapter(back, "diffusers", tmp_path / "d.safetensors", models=models)
    )
    assert set(peft.modules) == set(adapter.modules)
    for key, factors in adapter.modules.items():
        torch.testing.assert_close(delta(peft.modules[key]), delta(factors), rtol=0, atol=1e-6)


def test_kohya_and_diffusers_files_load_here_and_in_diffusers_alike(tmp_path):
    """A diffusers-layout file written by hand (transformer.*, text_encoder.*, text_encoder_2.*)
    through our Mixer gives what diffusers' load_lora_weights gives; our kohya-layout file of it
    gives the same here, and converted back to the diffusers layout, in diffusers too."""
    g = torch.Generator().manual_seed(5)
    reference = load_base("tiny-sd3")
    hand = {}
    targets = {
        "transformer": [
            "attn.to_q",
            "attn.to_k",
            "attn.to_v",
            "attn.to_out.0",
            "attn.add_q_proj",
            "attn.add_k_proj",
            "attn.add_v_proj",
            "attn2.to_q",
            "attn2.to_v",
            "ff.net.0.proj",
            "norm1_context.linear",
        ],
        "text_encoder": ["self_attn.q_proj", "self_attn.v_proj", "mlp.fc1"],
        "text_encoder_2": ["self_attn.k_proj", "self_attn.out_proj"],
    }
    for comp, leaves in targets.items():
        model = getattr(reference, comp)
        for path, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and path.endswith(
                tuple("." + n for n in leaves)
            ):
                key = (
                    f"{comp}.{path}"
                    if comp == "transformer"
                    else f"{comp}.text_model.{path.removeprefix('text_model.')}"
                )
                hand[f"{key}.lora_A.weight"] = torch.randn(4, module.in_features, generator=g) * 0.3
                hand[f"{key}.lora_B.weight"] = (
                    torch.randn(module.out_features, 4, generator=g) * 0.3
                )
    # the last block's text side: its two-chunk modulation is in the file too
    assert "transformer.transformer_blocks.1.norm1_context.linear.lora_A.weight" in hand
    diffusers_file = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(hand, diffusers_file)
    adapter = load_adapter(diffusers_file)
    assert adapter.metadata["sdlora_detected_format"] == "diffusers-peft"
    assert adapter_family(adapter) is SD3

    ours = load_base("tiny-sd3")
    Mixer(ours).add(adapter, name="hand", strength=0.8)
    expected = outputs(ours)
    plain = outputs(reference)
    assert (expected["transformer"] - plain["transformer"]).abs().max() > 1e-2
    assert (expected["text_encoder_2"] - plain["text_encoder_2"]).abs().max() > 1e-3

    theirs = load_base("tiny-sd3")
    theirs.load_lora_weights(str(diffusers_file), adapter_name="hand")
    theirs.set_adapters(["hand"], [0.8])
    assert_outputs_close(expected, outputs(theirs))

    models = adaptable_models(ours)
    kohya_file = convert_adapter(adapter, "kohya", tmp_path / "kohya.safetensors", models=models)
    with safe_open(str(kohya_file), "pt") as f:
        keys = set(f.keys())
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_up.weight" in keys
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    kohya = load_adapter(kohya_file)
    again = load_base("tiny-sd3")
    Mixer(again).add(kohya, name="kohya", strength=0.8)
    assert_outputs_close(expected, outputs(again))

    round_trip = convert_adapter(kohya, "diffusers", tmp_path / "back.safetensors", models=models)
    in_diffusers = load_base("tiny-sd3")
    in_diffusers.load_lora_weights(str(round_trip), adapter_name="kohya")
    in_diffusers.set_adapters(["kohya"], [0.8])
    assert_outputs_close(expected, outputs(in_diffusers))


def test_kohya_sd3_and_onetrainer_files_are_read(tmp_path):
    """A file as kohya's lora_sd3 writes it (fused qkv with kohya's equal split of the rank,
    alpha below the rank, lora_te3_, ss_base_model_version "5-medium"), one as OneTrainer writes
    it (lora_transformer_ + diffusers paths, lora_te1_) and a PEFT file with the
    base_model.model. prefix load to the same modules."""
    base = load_base("tiny-sd3")
    t = base.transformer
    g = torch.Generator().manual_seed(9)
    width, inputs = t.transformer_blocks[0].attn.to_q.weight.shape
    rank, alpha = 2, 1.0
    downs = [torch.randn(rank, inputs, generator=g) for _ in range(3)]
    ups = [torch.randn(width, rank, generator=g) for _ in range(3)]
    up = torch.zeros(3 * width, 3 * rank)
    for i in range(3):
        up[i * width : (i + 1) * width, i * rank : (i + 1) * rank] = ups[i]
    t5_out, t5_in = base.text_encoder_3.encoder.block[0].layer[0].SelfAttention.q.weight.shape
    t5_down, t5_up = torch.randn(rank, t5_in, generator=g), torch.randn(t5_out, rank, generator=g)
    kohya = {
        "lora_unet_joint_blocks_1_x_block_attn_qkv.lora_down.weight": torch.cat(downs),
        "lora_unet_joint_blocks_1_x_block_attn_qkv.lora_up.weight": up,
        "lora_unet_joint_blocks_1_x_block_attn_qkv.alpha": torch.tensor(alpha),
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": t5_down,
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": t5_up,
    }
    save_file(kohya, tmp_path / "kohya.safetensors", metadata={"ss_base_model_version": "5-medium"})
    read = load_adapter(tmp_path / "kohya.safetensors")
    assert read.metadata["sdlora_detected_format"] == "kohya-lora"
    block = "lora_transformer_transformer_blocks_1_attn_"
    fused_scale = alpha / (3 * rank)  # the file's alpha is over its fused rank
    for i, leaf in enumerate(("to_q", "to_k", "to_v")):
        torch.testing.assert_close(
            delta(read.modules[block + leaf]), ups[i] @ downs[i] * fused_scale, rtol=0, atol=1e-6
        )
    assert adapter_family(read) is SD3
    onetrainer = {
        f"{block}to_q.lora_down.weight": downs[0],
        f"{block}to_q.lora_up.weight": ups[0],
        f"{block}to_q.alpha": torch.tensor(alpha),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": downs[1][:, :32],
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": ups[1][:32],
    }
    save_file(onetrainer, tmp_path / "onetrainer.safetensors")
    other = load_adapter(tmp_path / "onetrainer.safetensors")
    torch.testing.assert_close(
        delta(other.modules[block + "to_q"]), ups[0] @ downs[0] * alpha / rank, rtol=0, atol=1e-6
    )
    # PEFT's own prefix on the transformer's paths (flash-sd3 and others, as ComfyUI reads them)
    peft = {
        "base_model.model.transformer_blocks.1.attn.to_q.lora_A.weight": downs[0],
        "base_model.model.transformer_blocks.1.attn.to_q.lora_B.weight": ups[0],
    }
    save_file(peft, tmp_path / "peft.safetensors")
    prefixed = load_adapter(tmp_path / "peft.safetensors")
    torch.testing.assert_close(
        delta(prefixed.modules[block + "to_q"]), ups[0] @ downs[0], rtol=0, atol=1e-6
    )
    mixer = Mixer(base)
    mixer.add(read, name="kohya")
    mixer.add(other, name="onetrainer")
    assert len(mixer.entries["kohya"].layers) == 4  # q, k, v and T5's q


def test_family_mismatch_is_refused_in_one_line():
    sd3 = load_base("tiny-sd3")
    xl = load_base("tiny-xl")
    sd3_adapter = random_adapter(sd3, components=("transformer",))
    with pytest.raises(SdloraError, match=r"trained for SD 3\.x; the base is SDXL") as err:
        Mixer(xl).add(sd3_adapter, name="a")
    assert "\n" not in str(err.value)
    xl_adapter = random_adapter(xl, components=("unet",))
    with pytest.raises(SdloraError, match=r"trained for SDXL; the base is SD 3\.x"):
        Mixer(sd3).add(xl_adapter, name="b")
    # a text-encoder-only file says its family in its header (kohya's SD3 model types)
    te_only = random_adapter(sd3, components=("text_encoder",))
    te_only.metadata["ss_base_model_version"] = "5-large"
    assert adapter_family(te_only) is SD3


# ---------------------------------------------------------------------------------------------
# single file


def test_single_file_export_reads_back_in_diffusers_and_here(tmp_path):
    """The live mix (an adapter on the transformer and all three text encoders) exported as one
    Stability-layout file: diffusers' StableDiffusion3Pipeline.from_single_file (offline, the
    configs from a folder) and our load_base give the live mix's outputs; a file without T5
    loads as a pipeline without T5."""
    live = load_base("tiny-sd3")
    Mixer(live).add(random_adapter(live, seed=2), name="mix", strength=0.7)
    expected = outputs(live)
    out = export_single_file(live, tmp_path / "sd3.safetensors", dtype="fp32")
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        metadata = f.metadata()
    assert metadata["sdlora_layout"] == "sd3"
    for key in (
        "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
        "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.bias",
        "model.diffusion_model.joint_blocks.0.x_block.attn.ln_q.weight",
        "model.diffusion_model.final_layer.adaLN_modulation.1.weight",
        "model.diffusion_model.pos_embed",
        "first_stage_model.decoder.conv_in.weight",
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "text_encoders.clip_g.transformer.text_projection.weight",
        "text_encoders.t5xxl.transformer.shared.weight",
    ):
        assert key in keys, key
    assert not any("transformer_blocks" in k or "lora" in k for k in keys)

    config = tmp_path / "config"
    _write_builtin_configs(config, "tiny-sd3")
    theirs = StableDiffusion3Pipeline.from_single_file(
        str(out), config=str(config), local_files_only=True
    )
    # diffusers reads an SAI file's CLIP-L with an identity projection (SD3's, see the module)
    assert torch.equal(theirs.text_encoder.text_projection.weight, torch.eye(32))
    # it tells CLIP-G from CLIP-L by width, which tiny-sd3's share (32; SD3: 768, 1280), so its
    # text_encoder_2 gets CLIP-L's weights here; CLIP-G goes through its converter by hand
    clip_g = type(theirs.text_encoder_2)(theirs.text_encoder_2.config)
    with safe_open(str(out), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    loaded = clip_g.load_state_dict(
        convert_ldm_clip_checkpoint(state, "text_encoders.clip_g.transformer."), strict=False
    )
    assert all(k.endswith("position_ids") for k in loaded.missing_keys)
    theirs.text_encoder_2 = clip_g
    for model in theirs.components.values():  # diffusers builds the single-file T5 in train mode
        if isinstance(model, torch.nn.Module):
            model.eval()
    assert_outputs_close(expected, outputs(theirs), skip=("text_encoder pooled",))
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(
            theirs.vae.decode(latents).sample, live.vae.decode(latents).sample, rtol=0, atol=ATOL
        )

    ours = load_base(str(out))
    assert_outputs_close(expected, outputs(ours))

    without = tmp_path / "no_t5.safetensors"
    state = {}
    with safe_open(str(out), "pt") as f:
        for key in f.keys():
            if not key.startswith("text_encoders.t5xxl."):
                state[key] = f.get_tensor(key)
    save_file(state, without)
    small = load_base(str(without), config=config)
    assert small.text_encoder_3 is None
    assert_outputs_close(expected, outputs(small), skip=("text_encoder_3",))


def test_single_file_refuses_a_file_of_other_shapes(tmp_path):
    pipe = load_base("tiny-sd3")
    out = export_single_file(pipe, tmp_path / "a.safetensors", dtype="fp32")
    with safe_open(str(out), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    key = "model.diffusion_model.context_embedder.weight"
    state[key] = torch.zeros(state[key].shape[0], 5)
    save_file(state, tmp_path / "odd.safetensors")
    with pytest.raises(SdloraError, match="not the built-in tiny-sd3") as err:
        load_base(str(tmp_path / "odd.safetensors"))
    assert "\n" not in str(err.value)
