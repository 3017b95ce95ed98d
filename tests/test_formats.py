"""Foreign adapter files: diffusers/PEFT, kohya LoRA/LoCon, LyCORIS LoHa/LoKr, refusals."""

import json
import logging

import pytest
import torch
from conftest import make_adapter_file, run_text, run_unet
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from sdlora.bases.base import load_base
from sdlora.errors import SdloraError
from sdlora.io.formats import exact_factors, load_adapter
from sdlora.lora.blend import Mixer
from sdlora.tools.inspect import inspect_file

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CROSS_K = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"  # (64, 32)
FF = "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"  # (512, 64): out > in
CONV = "down_blocks.0.resnets.0.conv1"  # (32, 32, 3, 3)
SHORTCUT = "down_blocks.1.resnets.0.conv_shortcut"  # (64, 32, 1, 1)
TE_Q = "encoder.layers.0.self_attn.q_proj"  # transformers 5: no text_model. level
TE_OUT = "encoder.layers.1.self_attn.out_proj"


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def peft_file(
    tmp_path,
    seed=0,
    rank=4,
    alpha=8,
    v_alpha=2.0,
    te_rank=2,
    te_alpha=3,
    name="pytorch_lora_weights.safetensors",
):
    """A diffusers-format file written by diffusers + PEFT themselves; returns (file, live pipe)."""
    pipe = load_base("tiny")
    torch.manual_seed(seed)
    pipe.unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
            alpha_pattern={"to_v": v_alpha},
            init_lora_weights=False,
        )
    )
    pipe.text_encoder.add_adapter(
        LoraConfig(
            r=te_rank,
            lora_alpha=te_alpha,
            target_modules=["q_proj", "v_proj", "out_proj"],
            init_lora_weights=False,
        )
    )
    for model in (pipe.unet, pipe.text_encoder):
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                with torch.no_grad():
                    p.normal_(0, 0.2)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict(),
        weight_name=name,
    )
    return tmp_path / name, pipe


def with_deltas(deltas):
    """A fresh tiny base with ΔW added to the named weights: the reference for our loader."""
    pipe = load_base("tiny")
    for (comp, path), delta in deltas.items():
        weight = getattr(pipe, comp).get_submodule(path).weight
        with torch.no_grad():
            weight += delta.reshape(weight.shape)
    return pipe


def test_peft_file_matches_diffusers_and_live(tmp_path, inputs):
    path, live = peft_file(tmp_path)
    adapter = load_adapter(path)
    assert adapter.metadata["sdlora_detected_format"] == "diffusers-peft"
    assert {m.scale for m in adapter.modules.values()} == {2.0, 0.5, 1.5}  # 8/4, to_v 2/4, te 3/2
    theirs = load_base("tiny")
    theirs.load_lora_weights(str(path), adapter_name="x")
    ours = load_base("tiny")
    mixer = Mixer(ours)
    mixer.add(path)
    assert (run_unet(ours, inputs) - run_unet(load_base("tiny"), inputs)).abs().max() > 1e-3
    close(run_unet(ours, inputs), run_unet(theirs, inputs))
    close(run_text(ours, inputs), run_text(theirs, inputs))
    close(run_unet(ours, inputs), run_unet(live, inputs))
    close(run_text(ours, inputs), run_text(live, inputs))
    theirs.set_adapters(["x"], [0.5])
    mixer.set_strength(mixer.describe()[0]["name"], 0.5)
    close(run_unet(ours, inputs), run_unet(theirs, inputs))


def test_legacy_diffusers_names(tmp_path, inputs):
    """`lora_linear_layer`, `lora.down` and `processor.to_q_lora` names load like lora_A/lora_B."""
    path, live = peft_file(tmp_path, alpha=4, v_alpha=4, te_alpha=2)
    tensors = load_file(path)
    legacy = {}
    for i, (key, value) in enumerate(sorted(tensors.items())):
        style = i % 3
        key = key.replace("lora_A.weight", "@down.weight").replace("lora_B.weight", "@up.weight")
        if style == 0:
            key = key.replace("@", "lora_linear_layer.")
        elif style == 1:
            key = key.replace("@", "lora.")
        elif key.startswith("unet.") and ".attn" in key and ".to_out" not in key:
            stem, _, part = key.rpartition(".@")
            head, _, leaf = stem.rpartition(".")
            key = f"{head}.processor.{leaf}_lora.{part}"
        else:
            key = key.replace("@", "lora.")
        legacy[key] = value
    save_file(legacy, tmp_path / "old.safetensors")
    adapter = load_adapter(tmp_path / "old.safetensors")
    assert adapter.metadata["sdlora_detected_format"] == "diffusers-legacy"
    ours = load_base("tiny")
    Mixer(ours).add(adapter)
    close(run_unet(ours, inputs), run_unet(live, inputs))  # no metadata: alpha = rank, as here
    close(run_text(ours, inputs), run_text(live, inputs))


def kohya_file(tmp_path, name="k.safetensors", te_prefix="lora_te_text_model_", ff_alpha=None):
    """kohya LoRA + LoCon by key layout: alpha ≠ rank, missing alpha, 3x3 conv, 1x1 conv, old te prefix."""
    g = torch.Generator().manual_seed(7)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    modules = {
        ("unet", ATTN, "lora_unet_" + ATTN.replace(".", "_")): (rnd(4, 32), rnd(32, 4), 2.0),
        ("unet", FF, "lora_unet_" + FF.replace(".", "_")): (rnd(3, 64), rnd(512, 3), ff_alpha),
        ("unet", CONV, "lora_unet_" + CONV.replace(".", "_")): (
            rnd(4, 32, 3, 3),
            rnd(32, 4, 1, 1),
            1.0,
        ),
        ("unet", SHORTCUT, "lora_unet_" + SHORTCUT.replace(".", "_")): (
            rnd(2, 32, 1, 1),
            rnd(64, 2, 1, 1),
            8.0,
        ),
        ("text_encoder", TE_Q, te_prefix + TE_Q.replace(".", "_")): (rnd(2, 32), rnd(32, 2), 6.0),
        # diffusers only recognises kohya text-encoder keys when an out_proj is among them, and
        # (transformers 5) applies only one text-encoder alpha: same alpha, different rank here
        ("text_encoder", TE_OUT, te_prefix + TE_OUT.replace(".", "_")): (
            rnd(3, 32),
            rnd(32, 3),
            6.0,
        ),
    }
    tensors, deltas = {}, {}
    for (comp, path, key), (down, up, alpha) in modules.items():
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        scale = 1.0
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
            scale = alpha / down.shape[0]
        deltas[(comp, path)] = scale * (up.flatten(1) @ down.flatten(1))
    save_file(tensors, tmp_path / name, metadata={"ss_network_module": "networks.lora"})
    return tmp_path / name, deltas


def test_kohya_locon_alpha_and_prefixes(tmp_path, inputs):
    path, deltas = kohya_file(tmp_path)
    adapter = load_adapter(path)
    assert adapter.metadata["sdlora_detected_format"] == "kohya-locon"
    ours = load_base("tiny")
    Mixer(ours).add(path, strength=0.6)
    expected = with_deltas({k: 0.6 * d for k, d in deltas.items()})
    close(run_unet(ours, inputs), run_unet(expected, inputs))
    close(run_text(ours, inputs), run_text(expected, inputs))
    # diffusers reads a kohya file the same way (it mis-scales a module without alpha when
    # others have one, so here every module has its alpha)
    path, _ = kohya_file(tmp_path, "all_alpha.safetensors", ff_alpha=1.5)
    ours, theirs = load_base("tiny"), load_base("tiny")
    Mixer(ours).add(path, strength=0.6)
    theirs.load_lora_weights(str(path), adapter_name="k")
    theirs.set_adapters(["k"], [0.6])
    close(run_unet(ours, inputs), run_unet(theirs, inputs))
    close(run_text(ours, inputs), run_text(theirs, inputs))
    # old kohya text-encoder keys without text_model_ read the same
    old, _ = kohya_file(tmp_path, "old.safetensors", te_prefix="lora_te_")
    ours_old = load_base("tiny")
    Mixer(ours_old).add(old, strength=0.6)
    close(run_text(ours_old, inputs), run_text(expected, inputs))


def loha_lokr_file(tmp_path):
    """LyCORIS LoHa (linear + flattened 3x3 conv) and LoKr (factored + full + Tucker) by key layout."""
    g = torch.Generator().manual_seed(11)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    t, deltas = {}, {}
    k = "lora_unet_" + ATTN.replace(".", "_")
    t.update(
        {
            f"{k}.hada_w1_a": rnd(32, 2),
            f"{k}.hada_w1_b": rnd(2, 32),
            f"{k}.hada_w2_a": rnd(32, 2),
            f"{k}.hada_w2_b": rnd(2, 32),
            f"{k}.alpha": torch.tensor(1.0),
        }
    )
    deltas[("unet", ATTN)] = (
        (t[f"{k}.hada_w1_a"] @ t[f"{k}.hada_w1_b"])
        * (t[f"{k}.hada_w2_a"] @ t[f"{k}.hada_w2_b"])
        * 0.5
    )
    k = "lora_unet_" + CONV.replace(".", "_")
    t.update(
        {
            f"{k}.hada_w1_a": rnd(32, 3),
            f"{k}.hada_w1_b": rnd(3, 32 * 9),
            f"{k}.hada_w2_a": rnd(32, 3),
            f"{k}.hada_w2_b": rnd(3, 32 * 9),
        }
    )
    deltas[("unet", CONV)] = (t[f"{k}.hada_w1_a"] @ t[f"{k}.hada_w1_b"]) * (
        t[f"{k}.hada_w2_a"] @ t[f"{k}.hada_w2_b"]
    )
    k = "lora_unet_" + CROSS_K.replace(".", "_")
    t.update(
        {
            f"{k}.lokr_w1": rnd(4, 4),
            f"{k}.lokr_w2_a": rnd(16, 2),
            f"{k}.lokr_w2_b": rnd(2, 8),
            f"{k}.alpha": torch.tensor(4.0),
        }
    )
    deltas[("unet", CROSS_K)] = (
        torch.kron(t[f"{k}.lokr_w1"], t[f"{k}.lokr_w2_a"] @ t[f"{k}.lokr_w2_b"]) * 2.0
    )
    k = "lora_unet_" + SHORTCUT.replace(".", "_")
    t.update({f"{k}.lokr_w1": rnd(8, 4), f"{k}.lokr_w2": rnd(8, 8, 1, 1)})
    deltas[("unet", SHORTCUT)] = torch.kron(t[f"{k}.lokr_w1"][:, :, None, None], t[f"{k}.lokr_w2"])
    k = "lora_unet_" + "down_blocks.1.resnets.0.conv2".replace(".", "_")  # (64, 64, 3, 3), Tucker
    t.update(
        {
            f"{k}.lokr_w1": rnd(4, 4),
            f"{k}.lokr_w2_a": rnd(2, 16),
            f"{k}.lokr_w2_b": rnd(2, 16),
            f"{k}.lokr_t2": rnd(2, 2, 3, 3),
            f"{k}.alpha": torch.tensor(1.0),
        }
    )
    w2 = torch.einsum(
        "ijkl,jr,ip->prkl", t[f"{k}.lokr_t2"], t[f"{k}.lokr_w2_b"], t[f"{k}.lokr_w2_a"]
    )
    deltas[("unet", "down_blocks.1.resnets.0.conv2")] = (
        torch.kron(t[f"{k}.lokr_w1"][:, :, None, None], w2.contiguous()) * 0.5
    )
    save_file(t, tmp_path / "lyco.safetensors")
    return tmp_path / "lyco.safetensors", deltas


def test_loha_lokr_exact(tmp_path, inputs):
    path, deltas = loha_lokr_file(tmp_path)
    adapter = load_adapter(path)
    assert adapter.metadata["sdlora_detected_format"] == "lycoris-loha+lokr"
    ours = load_base("tiny")
    mixer = Mixer(ours)
    mixer.add(path, strength=0.8)
    expected = with_deltas({k: 0.8 * d for k, d in deltas.items()})
    assert (run_unet(ours, inputs) - run_unet(load_base("tiny"), inputs)).abs().max() > 1e-3
    close(run_unet(ours, inputs), run_unet(expected, inputs))
    mixer.set_fused("lyco", False)  # unfused: the identity factorisation runs as layers
    close(run_unet(ours, inputs), run_unet(expected, inputs))


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (8, 4, 3, 3), (64, 2, 3, 3), (16, 4, 1, 1)])
def test_exact_factors_reproduce_delta(shape):
    delta = torch.randn(*shape)
    f = exact_factors(delta)
    assert f.rank == min(shape[0], delta[0].numel())
    if len(shape) == 2:
        assert torch.equal(f.up @ f.down, delta)
    else:  # as a conv: identity patch extraction then 1x1
        x = torch.randn(1, shape[1], 7, 7)
        ref = torch.nn.functional.conv2d(x, delta)
        got = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, f.down), f.up)
        close(got, ref)


@pytest.mark.parametrize(
    "part,message",
    [
        ("dora_scale", "DoRA"),
        ("w_norm", "norm-layer"),
        ("oft_blocks", "OFT"),
        ("weird_thing", "unknown module part"),
    ],
)
def test_unsupported_module_types_refused(tmp_path, part, message):
    path, _ = kohya_file(tmp_path)
    tensors = load_file(path)
    key = "lora_unet_" + ATTN.replace(".", "_")
    # DoRA is read now (tests/test_dora.py): a magnitude that fits neither axis is refused
    tensors[f"{key}.{part}"] = torch.ones(7 if part == "dora_scale" else 32)
    save_file(tensors, tmp_path / "x.safetensors")
    with pytest.raises(SdloraError, match=f"x.safetensors: .*{message}.*{key}") as err:
        load_adapter(tmp_path / "x.safetensors")
    assert "\n" not in str(err.value)


def test_peft_dora_of_a_foreign_shape_refused(tmp_path):
    path, _ = peft_file(tmp_path)
    tensors = load_file(path)
    tensors["unet." + ATTN + ".lora_magnitude_vector"] = torch.ones(7)  # 32 outputs
    save_file(tensors, tmp_path / "dora.safetensors")
    with pytest.raises(SdloraError, match="dora.safetensors: .*DoRA magnitude"):
        load_adapter(tmp_path / "dora.safetensors")


def test_bad_files(tmp_path):
    save_file({"model.diffusion_model.out.0.weight": torch.ones(2)}, tmp_path / "ckpt.safetensors")
    with pytest.raises(SdloraError, match="ckpt.safetensors: this is a full model checkpoint"):
        load_adapter(tmp_path / "ckpt.safetensors")
    save_file({"something.weight": torch.ones(2)}, tmp_path / "what.safetensors")
    with pytest.raises(SdloraError, match="what.safetensors: .*unknown adapter format"):
        load_adapter(tmp_path / "what.safetensors")
    path, _ = kohya_file(tmp_path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SdloraError, match="cut.safetensors: not a readable safetensors"):
        load_adapter(tmp_path / "cut.safetensors")
    (tmp_path / "a.pt").write_bytes(b"\x80\x04")
    with pytest.raises(SdloraError, match="pickle"):
        load_adapter(tmp_path / "a.pt")
    key = "lora_unet_" + ATTN.replace(".", "_")
    save_file(
        {
            f"{key}.lora_down.weight": torch.ones(40, 32),
            f"{key}.lora_up.weight": torch.ones(32, 40),
        },
        tmp_path / "big.safetensors",
    )
    with pytest.raises(
        SdloraError, match="big.safetensors: .*rank 40 is larger than the module's dims"
    ):
        load_adapter(tmp_path / "big.safetensors")


def test_unmatched_keys_warned_and_inspected(tmp_path, caplog):
    path, _ = kohya_file(tmp_path)
    tensors = load_file(path)
    tensors["lora_unet_no_such_module.lora_down.weight"] = torch.ones(2, 8)
    tensors["lora_unet_no_such_module.lora_up.weight"] = torch.ones(8, 2)
    save_file(tensors, tmp_path / "extra.safetensors")
    with caplog.at_level(logging.WARNING):
        Mixer(load_base("tiny")).add(tmp_path / "extra.safetensors")
    assert (
        "1 of 7 keys match no module" in caplog.text and "lora_unet_no_such_module" in caplog.text
    )
    info = inspect_file(tmp_path / "extra.safetensors", load_base("tiny"))
    assert info["coverage"]["matched"] == 6 and info["coverage"]["unmatched_examples"] == [
        "lora_unet_no_such_module"
    ]


def test_inspect_reports_format_architecture_groups(tmp_path):
    path, _ = peft_file(tmp_path)
    info = inspect_file(path)
    assert info["format"] == "diffusers-peft"
    assert info["architecture"] == "SD 1.x (tiny, sdlora built-in)"
    assert info["groups"]["unet to_v"]["alphas"] == [2.0] and info["groups"]["unet to_v"][
        "scales"
    ] == [0.5]
    assert info["groups"]["text_encoder q_proj"]["scales"] == [1.5]
    json.dumps(info)
    ours, _ = make_adapter_file(lambda: load_base("tiny"), tmp_path / "ours.safetensors")
    assert inspect_file(ours)["format"] == "sdlora"
