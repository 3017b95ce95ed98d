"""Stable Diffusion 3.5 (MMDiT-X): the built-in `tiny-sd3` base its row in the families table, and
adapters on its transformer.

`tiny-sd3` builds offline from configs (two CLIP encoders with projections, a T5 encoder with the
project's own tokenizer, an SD3 transformer whose first block has the dual attention and RMS-normed
queries and keys, a 16-channel VAE, flow matching with shift 3); the table recognises its pipeline
and names the transformer's attention modules, which the "attn" preset then finds; the Mixer puts
an adapter on them as diffusers' own `load_lora_weights` does (PEFT layout).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from sdlora.bases.base import load_base
from sdlora.bases.families import SD3, family_of_pipeline, family_of_single_file
from sdlora.bases.pipelines import adaptable_models, pipeline_class
from sdlora.errors import SdloraError
from sdlora.lora.adapter import Adapter, ModuleFactors, module_keys
from sdlora.lora.blend import Mixer
from sdlora.lora.inject import denoiser_targets, find_targets, target_names


@pytest.fixture(scope="module")
def sd3():
    return load_base("tiny-sd3")


def prompt_inputs(pipe, prompt="a red circle on a blue square"):
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt,
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            max_sequence_length=16,
        )
    return embeds, pooled


def test_tiny_sd3_builds_offline_and_denoises(sd3):
    assert isinstance(sd3, StableDiffusion3Pipeline)
    t = sd3.transformer
    assert t.config.qk_norm == "rms_norm" and tuple(t.config.dual_attention_layers) == (0,)
    assert t.transformer_blocks[0].attn2 is not None and t.transformer_blocks[1].attn2 is None
    assert sd3.vae.config.latent_channels == 16 and t.config.in_channels == 16
    assert isinstance(sd3.scheduler, FlowMatchEulerDiscreteScheduler)
    assert sd3.scheduler.config.shift == 3.0
    assert all(not p.requires_grad for p in t.parameters())
    # the T5 tokenizer is the project's: known words are one piece each, then </s>
    ids = sd3.tokenizer_3("a red circle").input_ids
    assert sd3.tokenizer_3.convert_ids_to_tokens(ids) == ["▁a", "▁red", "▁circle", "</s>"]
    embeds, pooled = prompt_inputs(sd3)
    # CLIP states (77 tokens, zero-padded to T5's width) then T5's (16 tokens)
    assert embeds.shape == (1, 77 + 16, t.config.joint_attention_dim)
    assert pooled.shape == (1, t.config.pooled_projection_dim)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = t(latents, embeds, pooled, torch.tensor([500.0])).sample
    assert out.shape == latents.shape and torch.isfinite(out).all()
    # deterministic: the same seeded weights on a second build
    again = load_base("tiny-sd3").transformer
    with torch.no_grad():
        out2 = again(latents, embeds, pooled, torch.tensor([500.0])).sample
    torch.testing.assert_close(out, out2, rtol=0, atol=0)
    # and the whole pipeline draws
    image = sd3(
        "a red circle",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 64, 64, 3)


def test_family_row_is_found_from_the_pipeline(sd3):
    family = family_of_pipeline(sd3)
    assert family is SD3
    assert pipeline_class(family) is StableDiffusion3Pipeline
    assert (family.native_size, family.vae_factor, family.latent_channels) == (1024, 8, 16)
    assert family.small_bases[sd3.transformer.config.joint_attention_dim] == "tiny-sd3"
    assert family.builtin == "tiny-sd3"
    assert [enc.component for enc in family.text_encoders] == [
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
    ]
    for enc in family.text_encoders:
        assert type(getattr(sd3, enc.component)).__name__ == enc.model_class
    assert list(adaptable_models(sd3)) == [
        "transformer",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
    ]
    assert (
        family_of_single_file([family.text_key, "first_stage_model.decoder.conv_in.weight"]) is SD3
    )


def test_attn_preset_finds_both_attentions(sd3):
    names = target_names("attn", denoiser_targets(SD3))
    found = find_targets(sd3.transformer, names)
    block0 = {
        p.removeprefix("transformer_blocks.0.")
        for p in found
        if p.startswith("transformer_blocks.0.")
    }
    assert block0 == {
        *(f"attn.{n}" for n in SD3.attention_modules),
        "attn2.to_q",
        "attn2.to_k",
        "attn2.to_v",
        "attn2.to_out.0",
    }
    # the last block's text side ends the joint stream: no to_add_out there, as in diffusers
    assert "transformer_blocks.1.attn.add_k_proj" in found
    assert "transformer_blocks.1.attn.to_add_out" not in found
    linears = {
        p
        for p, m in sd3.transformer.named_modules()
        if isinstance(m, torch.nn.Linear) and ".attn" in p
    }
    assert set(found) == linears
    # a UNet family keeps its presets; the transformer has no UNet "locon" preset
    with pytest.raises(SdloraError, match="no module matches"):
        find_targets(sd3.transformer, target_names("locon", denoiser_targets(SD3)))


def test_mixer_on_the_transformer_equals_diffusers_load_lora_weights(sd3):
    """A hand-made adapter on every attention module of tiny-sd3 (both attentions of the
    MMDiT-X block, the text side's projections), through the Mixer at strength 0.7, gives the
    transformer output diffusers gives for the same factors in the PEFT layout."""
    base = load_base("tiny-sd3")
    t = base.transformer
    paths = find_targets(t, target_names("attn", denoiser_targets(SD3)))
    keys = module_keys(t, "transformer")
    g = torch.Generator().manual_seed(7)
    rank, alpha = 4, 2.0
    modules, peft = {}, {}
    for path in paths:
        weight = t.get_submodule(path).weight
        down = torch.randn(rank, weight.shape[1], generator=g) * 0.3
        up = torch.randn(weight.shape[0], rank, generator=g) * 0.3
        modules[keys[path]] = ModuleFactors(down, up, alpha)
        peft[f"transformer.{path}.lora_A.weight"] = down.clone()
        peft[f"transformer.{path}.lora_B.weight"] = up * (alpha / rank)  # PEFT: alpha = rank
    assert (
        keys["transformer_blocks.0.attn2.to_q"]
        == "lora_transformer_transformer_blocks_0_attn2_to_q"
    )
    latents = torch.randn(1, 16, 8, 8, generator=g)
    context = torch.randn(1, 20, t.config.joint_attention_dim, generator=g)
    pooled = torch.randn(1, t.config.pooled_projection_dim, generator=g)
    step = torch.tensor([300.0])
    with torch.no_grad():
        plain = t(latents, context, pooled, step).sample
    mixer = Mixer(base)
    mixer.add(Adapter(modules, source="hand.safetensors"), name="hand", strength=0.7)
    assert len(mixer.entries["hand"].layers) == len(paths)
    with torch.no_grad():
        ours = t(latents, context, pooled, step).sample
    sd3.load_lora_weights(peft, adapter_name="hand")
    sd3.set_adapters(["hand"], [0.7])
    with torch.no_grad():
        theirs = sd3.transformer(latents, context, pooled, step).sample
    sd3.delete_adapters("hand")
    assert (ours - plain).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
