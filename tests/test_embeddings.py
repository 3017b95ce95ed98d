"""New words in adapters (sdlora/lora/embeddings.py): file forms, Mixer, export, diffusers' loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_adapter_file
from safetensors.torch import load_file

from sdlora.bases.base import load_base
from sdlora.errors import SdloraError
from sdlora.io.files import save_adapter
from sdlora.io.formats import load_adapter
from sdlora.lora.blend import Mixer
from sdlora.lora.embeddings import (
    attached,
    expand_prompt,
    file_tensors,
    parse_token_spec,
    save_embedding_files,
    split_bundle,
)

PROMPT = "a ohwx circle"
pytestmark = pytest.mark.usefixtures("one_thread")


def draw(pipe, prompt: str = PROMPT) -> np.ndarray:
    """Two denoising steps of the tiny base at 64 px, seed 0: (1, 64, 64, 3) floats."""
    with torch.inference_mode():
        return pipe(
            prompt,
            num_inference_steps=2,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(0),
            height=64,
            width=64,
            output_type="np",
        ).images


@pytest.fixture(scope="module")
def worded(tmp_path_factory):
    """A tiny adapter (UNet + text encoder) bundling `ohwx` (2 vectors) and `zq` (1 vector)."""
    folder = tmp_path_factory.mktemp("words")
    path, _ = make_adapter_file(lambda: load_base("tiny"), folder / "plain.safetensors")
    adapter = load_adapter(path)
    g = torch.Generator().manual_seed(3)
    adapter.embeddings = {
        "ohwx": {"text_encoder": torch.randn(2, 32, generator=g) * 0.2},
        "zq": {"text_encoder": torch.randn(1, 32, generator=g) * 0.2},
    }
    save_adapter(adapter, folder / "worded.safetensors")
    return folder / "worded.safetensors", adapter


def test_bundle_keys_are_a1111s_and_read_back_exactly(worded):
    path, adapter = worded
    tensors = load_file(path)
    bundled = {k: v.shape for k, v in tensors.items() if k.startswith("bundle_emb.")}
    assert bundled == {
        "bundle_emb.ohwx.string_to_param.*": (2, 32),
        "bundle_emb.zq.string_to_param.*": (1, 32),
    }
    again = load_adapter(path)
    assert again.modules.keys() == adapter.modules.keys()
    from sdlora.tools.inspect import format_text, inspect_file

    info = inspect_file(path)
    assert info["words"] == {"ohwx": {"text_encoder": 2}, "zq": {"text_encoder": 1}}
    assert "new words:     ohwx (2 vectors), zq (1 vector)" in format_text(info)
    for token, per in adapter.embeddings.items():
        assert torch.equal(again.embeddings[token]["text_encoder"], per["text_encoder"])
    # SDXL's two encoders read into their components (the other helper's table)
    rest, words = split_bundle(
        {"bundle_emb.w.clip_l": torch.ones(1, 4), "bundle_emb.w.clip_g": torch.zeros(1, 8)}, "x"
    )
    assert not rest and words["w"]["text_encoder"].shape == (1, 4)
    assert words["w"]["text_encoder_2"].shape == (1, 8)
    with pytest.raises(SdloraError, match="not in a known form"):
        split_bundle({"bundle_emb.w.clip_x": torch.ones(1, 4)}, "x.safetensors")


def test_word_works_at_any_strength_and_strength_0_is_the_base(worded):
    path, _ = worded
    base_image = draw(load_base("tiny"))
    pipe = load_base("tiny")
    tokenizer, embedding = pipe.tokenizer, pipe.text_encoder.get_input_embeddings()
    mixer = Mixer(pipe)
    mixer.add(path, name="w")
    assert pipe.tokenizer.tokenize("ohwx") == ["ohwx"]
    on = draw(pipe)
    assert np.abs(on - base_image).max() > 1e-2
    mixer.set_strength("w", 0.3)
    assert pipe.tokenizer.tokenize("ohwx") == ["ohwx"]  # still there at any strength > 0
    for off in (lambda: mixer.set_strength("w", 0.0), lambda: mixer.enable("w", False)):
        off()
        assert pipe.tokenizer is tokenizer  # the base's own objects, so the base's tokenizing
        assert pipe.text_encoder.get_input_embeddings() is embedding
        assert np.array_equal(draw(pipe), base_image)  # pixel-exact, word in the prompt
        mixer.enable("w", True)
        mixer.set_strength("w", 1.0)
        torch.testing.assert_close(draw(pipe), on, atol=1e-6, rtol=0)
    mixer.remove("w")
    assert pipe.tokenizer is tokenizer and np.array_equal(draw(pipe), base_image)


def test_diffusers_reads_the_lora_and_the_word_as_we_do(worded, tmp_path):
    path, adapter = worded
    ours = load_base("tiny")
    Mixer(ours).add(path)
    theirs = load_base("tiny")
    with pytest.raises(ValueError, match="lora"):  # diffusers refuses non-LoRA keys in a file
        theirs.load_lora_weights(str(path))
    tensors = load_file(path)
    theirs.load_lora_weights({k: v for k, v in tensors.items() if not k.startswith("bundle_emb.")})
    files = save_embedding_files(adapter.embeddings, tmp_path / "embeddings")
    assert [f.name for f in files] == ["ohwx.safetensors", "zq.safetensors"]
    assert set(load_file(files[0])) == {"ohwx"}  # diffusers takes the word from the key
    for file in files:
        theirs.load_textual_inversion(str(file))
    prompt = "a ohwx circle zq"
    torch.testing.assert_close(draw(theirs, prompt), draw(ours, prompt), atol=1e-5, rtol=0)
    # the bundled vectors, handed over directly, are the same word
    again = load_base("tiny")
    again.load_lora_weights({k: v for k, v in tensors.items() if not k.startswith("bundle_emb.")})
    for token in ("ohwx", "zq"):
        again.load_textual_inversion({token: tensors[f"bundle_emb.{token}.string_to_param.*"]})
    torch.testing.assert_close(draw(again, prompt), draw(ours, prompt), atol=1e-5, rtol=0)


def test_export_writes_the_words_beside_the_base_vocabulary(worded, tmp_path):
    from diffusers import StableDiffusionPipeline

    from sdlora.tools.export import export_diffusers, export_single_file

    path, _ = worded
    pipe = load_base("tiny")
    Mixer(pipe).add(path)
    out = export_diffusers(pipe, tmp_path / "merged", dtype="fp32")
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == [
        "ohwx.safetensors",
        "zq.safetensors",
    ]
    plain = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    plain.set_progress_bar_config(disable=True)
    assert len(plain.tokenizer) == len(load_base("tiny").tokenizer)  # the base's vocabulary
    plain.load_textual_inversion(str(out / "embeddings" / "ohwx.safetensors"))
    torch.testing.assert_close(draw(plain), draw(pipe), atol=1e-4, rtol=0)
    single = export_single_file(pipe, tmp_path / "merged.safetensors", dtype="fp32")
    beside = tmp_path / "merged-embeddings"
    assert single.is_file() and sorted(p.name for p in beside.iterdir()) == [
        "ohwx.safetensors",
        "zq.safetensors",
    ]
    single.unlink()
    with pytest.raises(SdloraError, match="ohwx.safetensors already exists"):
        export_single_file(pipe, single, dtype="fp32")
    assert not single.exists()  # refused before anything was written


def test_two_adapters_with_one_word_and_a_word_of_the_base_are_refused(worded, tmp_path):
    path, _ = worded
    adapter = load_adapter(path)  # a copy to change; the fixture's stays as it is
    mixer = Mixer(load_base("tiny"))
    mixer.add(path, name="a")
    with pytest.raises(SdloraError, match="both bring the word 'ohwx'"):
        mixer.add(path, name="b")
    taken = load_base("tiny").tokenizer.get_vocab()
    word = next(k for k in taken if k.isalpha() and len(k) > 2)
    adapter.embeddings = {word: {"text_encoder": torch.zeros(1, 32)}}
    other = Mixer(load_base("tiny"))
    with pytest.raises(
        SdloraError, match=r"^worded.safetensors: word '\w+': .* already in the base's"
    ):
        other.add(adapter, name="c")
    assert other.entries == {} and attached(other.pipe) == {}  # nothing half-loaded
    adapter.embeddings = {"wide": {"text_encoder": torch.zeros(1, 64)}}
    with pytest.raises(SdloraError, match="64 wide"):
        other.add(adapter, name="d")


def test_token_specs_and_prompt_spelling():
    assert parse_token_spec("ohwx") == ("ohwx", 1)
    assert parse_token_spec("<s0>:3") == ("<s0>", 3)
    for bad in ("a b", "ohwx:0", "ohwx:76", "a.b", "", "x:y"):
        with pytest.raises(SdloraError, match="--new-token"):
            parse_token_spec(bad)
    tokenizer = load_base("tiny").tokenizer
    tokenizer.add_tokens(["ohwx", "ohwx_1", "ohwx_2", "zq"])
    assert expand_prompt(tokenizer, "a ohwx by zq") == "a ohwx ohwx_1 ohwx_2 by zq"
    assert file_tensors("zq", {"text_encoder": torch.zeros(1, 4)}).keys() == {"zq"}
    assert file_tensors(
        "zq", {"text_encoder": torch.zeros(1, 4), "text_encoder_2": torch.zeros(1, 8)}
    ).keys() == {"clip_l", "clip_g"}


def test_convert_and_merge_keep_the_words(worded, tmp_path):
    from sdlora.io.convert import convert_adapter
    from sdlora.tools.merge import merge_adapters

    path, adapter = worded
    kohya = convert_adapter(load_adapter(path), "kohya", tmp_path / "k.safetensors")
    assert torch.equal(
        load_adapter(kohya).embeddings["ohwx"]["text_encoder"],
        adapter.embeddings["ohwx"]["text_encoder"],
    )
    convert_adapter(load_adapter(path), "diffusers", tmp_path / "d.safetensors")
    assert sorted(p.name for p in (tmp_path / "d-embeddings").iterdir()) == [
        "ohwx.safetensors",
        "zq.safetensors",
    ]
    merged, _ = merge_adapters([(load_adapter(path), 0.5)], rank=2)
    assert merged.embeddings.keys() == {"ohwx", "zq"}
    assert merge_adapters([(load_adapter(path), 0.0)])[0].embeddings == {}
    with pytest.raises(SdloraError, match="both|two adapters bring the word"):
        merge_adapters([(load_adapter(path), 1.0), (load_adapter(path), 1.0)])


def test_random_start_vectors_sit_at_the_embeddings_scale():
    from sdlora.lora.embeddings import initial_vectors

    pipe = load_base("toy")
    weight = pipe.text_encoder.get_input_embeddings().weight
    g = torch.Generator().manual_seed(0)
    vectors = initial_vectors(pipe.tokenizer, weight, 64, None, g)
    rows = weight.detach()[: len(pipe.tokenizer)]
    ratio = vectors.norm(dim=1).mean() / rows.norm(dim=1).mean()
    assert 0.8 < ratio < 1.25  # same per-dimension mean and spread: about the same length
    again = initial_vectors(pipe.tokenizer, weight, 64, None, torch.Generator().manual_seed(0))
    assert torch.equal(vectors, again)
    circle = initial_vectors(pipe.tokenizer, weight, 2, "circle", g)
    assert torch.equal(circle[0], circle[1]) and torch.equal(
        circle[0], weight[pipe.tokenizer("circle", add_special_tokens=False).input_ids[0]]
    )


def test_words_that_share_a_file_name_are_refused_before_any_file(tmp_path):
    from sdlora.lora.embeddings import embedding_file_names, save_embedding_files

    vectors = {"text_encoder": torch.ones(1, 32)}
    folder = tmp_path / "embeddings"
    with pytest.raises(SdloraError, match=r"'x/y' and 'x_y' would both be saved as x_y\."):
        save_embedding_files({"ohwx": vectors, "x/y": vectors, "x_y": vectors}, folder)
    assert not folder.exists()  # not even the first word's file
    assert embedding_file_names(["ohwx", "x-y", "é"]) == {
        "ohwx": "ohwx.safetensors",
        "x-y": "x-y.safetensors",
        "é": "é.safetensors",
    }
