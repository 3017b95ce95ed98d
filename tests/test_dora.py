"""DoRA: files in kohya/LyCORIS and PEFT form give PEFT's merged weights, fused == unfused,
strength 0 == base, several adapters in any order, training, saving and resuming."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import run_text, run_unet
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from sdlora.bases.base import load_base
from sdlora.errors import SdloraError
from sdlora.io.files import save_adapter
from sdlora.io.formats import load_adapter
from sdlora.lora.adapter import flat_name
from sdlora.lora.blend import Mixer
from sdlora.lora.inject import add_trainable, collect_adapter
from sdlora.lora.layer import LoRALayer, LoRAWeights
from sdlora.tools.export import merged_state_dict

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv_shortcut"]
TE_TARGETS = ["q_proj", "v_proj", "out_proj"]


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def peft_dora_pipe(seed=0, rank=4, alpha=8):
    """A tiny base with a PEFT DoRA adapter (use_dora=True) on its UNet and text encoder,
    B and the magnitudes moved away from their initial values."""
    pipe = load_base("tiny")
    torch.manual_seed(seed)
    pipe.unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=UNET_TARGETS,
            use_dora=True,
            init_lora_weights=False,
        )
    )
    pipe.text_encoder.add_adapter(
        LoraConfig(
            r=2, lora_alpha=3, target_modules=TE_TARGETS, use_dora=True, init_lora_weights=False
        )
    )
    g = torch.Generator().manual_seed(seed + 1)
    for model in (pipe.unet, pipe.text_encoder):
        for name, p in model.named_parameters():
            with torch.no_grad():
                if "lora_B" in name:
                    p.normal_(0, 0.2, generator=g)
                elif "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
    return pipe


def peft_merged(pipe) -> dict[tuple[str, str], torch.Tensor]:
    """PEFT's own merged weight of every adapted module: (component, path) -> weight."""
    merged = {}
    for component in ("unet", "text_encoder"):
        model = getattr(pipe, component)
        for path, module in model.named_modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
                merged[(component, path)] = module.get_base_layer().weight.detach().clone()
    return merged


def kohya_tensors(pipe, input_axis: bool = False) -> dict[str, torch.Tensor]:
    """The PEFT adapter of `pipe` written in kohya/LyCORIS keys, dora_scale in LyCORIS' layout
    (out, 1[, 1, 1]) with wd_on_output."""
    tensors = {}
    for component in ("unet", "text_encoder"):
        model = getattr(pipe, component)
        for path, module in model.named_modules():
            if not isinstance(module, BaseTunerLayer):
                continue
            key = flat_name(component, path)
            down = module.lora_A["default"].weight.detach()
            up = module.lora_B["default"].weight.detach()
            m = module.lora_magnitude_vector["default"].weight.detach()
            weight = module.get_base_layer().weight
            tensors[f"{key}.lora_down.weight"] = down.clone()
            tensors[f"{key}.lora_up.weight"] = up.clone()
            tensors[f"{key}.alpha"] = torch.tensor(
                module.lora_alpha["default"], dtype=torch.float32
            )
            tensors[f"{key}.dora_scale"] = m.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    return tensors


def ours_weights(pipe) -> dict[tuple[str, str], torch.Tensor]:
    found = {}
    for component in ("unet", "text_encoder"):
        for path, module in getattr(pipe, component).named_modules():
            if isinstance(module, LoRALayer):
                found[(component, path)] = module.base.weight.detach().clone()
    return found


def test_kohya_and_peft_dora_files_give_peft_merged_weights(tmp_path, inputs):
    live = peft_dora_pipe()
    unet_sd = get_peft_model_state_dict(live.unet)
    assert any("lora_magnitude_vector" in k for k in unet_sd)
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=unet_sd,
        text_encoder_lora_layers=get_peft_model_state_dict(live.text_encoder),
        unet_lora_adapter_metadata=live.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=live.text_encoder.peft_config["default"].to_dict(),
        weight_name="peft.safetensors",
    )
    save_file(kohya_tensors(live), tmp_path / "kohya.safetensors")
    live_out = run_unet(live, inputs), run_text(live, inputs)
    reference = peft_merged(live)
    assert len(reference) > 20

    for name, detected in (("peft", "diffusers-peft (DoRA)"), ("kohya", "kohya-locon (DoRA)")):
        adapter = load_adapter(tmp_path / f"{name}.safetensors")
        assert adapter.metadata["sdlora_detected_format"] == detected
        assert adapter.is_dora
        ours = load_base("tiny")
        Mixer(ours).add(tmp_path / f"{name}.safetensors")
        got = ours_weights(ours)
        assert got.keys() == reference.keys()
        for key, weight in reference.items():
            close(got[key], weight)
        close(run_unet(ours, inputs), live_out[0])
        close(run_text(ours, inputs), live_out[1])
    base = run_unet(load_base("tiny"), inputs)
    assert (live_out[0] - base).abs().max() > 1e-3  # the adapter does something


def dora_file(tmp_path, name="a.safetensors", seed=0, input_axis=False):
    """A kohya-layout DoRA file for the tiny base: to_q/to_k (linear) and conv1 (3×3)."""
    base = load_base("tiny")
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    paths = [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
        "down_blocks.0.resnets.0.conv1",
    ]
    for path in paths:
        weight = base.unet.get_submodule(path).weight
        out, inp = weight.shape[:2]
        kernel = list(weight.shape[2:])
        key = flat_name("unet", path)
        tensors[f"{key}.lora_down.weight"] = torch.randn(3, inp, *kernel, generator=g) * 0.2
        tensors[f"{key}.lora_up.weight"] = torch.randn(out, 3, *[1] * len(kernel), generator=g)
        tensors[f"{key}.alpha"] = torch.tensor(1.5)
        rest = [1] * (weight.dim() - 2)
        if input_axis:  # LyCORIS' default: per input column, (1, in[, 1, 1])
            norms = weight.transpose(0, 1).reshape(inp, -1).norm(dim=1)
            m = (norms * (1 + torch.rand(inp, generator=g))).reshape(1, inp, *rest)
        else:
            norms = weight.reshape(out, -1).norm(dim=1)
            m = (norms * (1 + torch.rand(out, generator=g))).reshape(out, 1, *rest)
        tensors[f"{key}.dora_scale"] = m
    save_file(tensors, tmp_path / name)
    return tmp_path / name, paths


def by_hand(weight, tensors, key, input_axis):
    """W_dora − W0 as A1111/ComfyUI write it (input columns) or PEFT (output rows)."""
    down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
    scale = tensors[f"{key}.alpha"].item() / down.shape[0]
    delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * scale
    v = weight + delta
    m = tensors[f"{key}.dora_scale"]
    if input_axis:  # ComfyUI's weight_decompose, the input-column branch
        norm = (
            v.transpose(0, 1)
            .reshape(v.shape[1], -1)
            .norm(dim=1, keepdim=True)
            .reshape(v.shape[1], *[1] * (v.dim() - 1))
            .transpose(0, 1)
        )
    else:
        norm = v.reshape(v.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (v.dim() - 1))
    return v * (m / norm) - weight


@pytest.mark.parametrize("input_axis", [False, True])
def test_strength_fused_unfused_and_zero(tmp_path, inputs, input_axis):
    """strength s: W0 + s·(W_dora − W0) (ComfyUI's and A1111's rule), both axes; fused ==
    unfused; strength 0 is the base bit for bit; many changes == one fresh fuse."""
    path, paths = dora_file(tmp_path, input_axis=input_axis)
    tensors = load_file(path)
    base = load_base("tiny")
    pipe = load_base("tiny")
    mixer = Mixer(pipe)
    name = mixer.add(path, strength=0.7)
    for p in paths:
        w0 = base.unet.get_submodule(p).weight.detach()
        want = w0 + 0.7 * by_hand(w0, tensors, flat_name("unet", p), input_axis)
        close(pipe.unet.get_submodule(p).base.weight, want)
    fused = run_unet(pipe, inputs)
    assert (fused - run_unet(base, inputs)).abs().max() > 1e-3
    weights = {p: pipe.unet.get_submodule(p).base.weight.detach().clone() for p in paths}
    mixer.set_fused(name, False)
    close(run_unet(pipe, inputs), fused)
    exported = merged_state_dict(pipe.unet, torch.float32)  # export merges it exactly
    for p in paths:
        close(exported[f"{p}.weight"], weights[p], tol=1e-6)
    mixer.set_fused(name, True)
    for s in torch.linspace(-2, 3, 50).tolist():
        mixer.set_strength(name, s)
    mixer.set_strength(name, 0.0)
    for p in paths:
        assert torch.equal(
            pipe.unet.get_submodule(p).base.weight, base.unet.get_submodule(p).weight
        )
    mixer.set_strength(name, 0.7)
    again = load_base("tiny")
    Mixer(again).add(path, strength=0.7)
    for p in paths:
        assert torch.equal(
            pipe.unet.get_submodule(p).base.weight, again.unet.get_submodule(p).base.weight
        )
    mixer.remove(name)
    assert torch.equal(run_unet(pipe, inputs), run_unet(base, inputs))


def test_several_dora_adapters_any_order(tmp_path, inputs):
    """Each DoRA adapter is decomposed against the pristine W0 and the changes add: the order
    of loading does not matter, and a plain LoRA beside them adds its ΔW as usual."""
    a, paths = dora_file(tmp_path, "a.safetensors", seed=1)
    b, _ = dora_file(tmp_path, "b.safetensors", seed=2, input_axis=True)
    base = load_base("tiny")
    results = []
    for order in ((a, b), (b, a)):
        pipe = load_base("tiny")
        mixer = Mixer(pipe)
        for path in order:
            mixer.add(path, strength=0.8 if path == a else 1.3)
        results.append({p: pipe.unet.get_submodule(p).base.weight.detach().clone() for p in paths})
        unfused = run_unet(pipe, inputs)
        for entry in list(mixer.entries):  # one unfused beside one fused, then both
            mixer.set_fused(entry, False)
            close(run_unet(pipe, inputs), unfused)
    ta, tb = load_file(a), load_file(b)
    for p in paths:
        w0 = base.unet.get_submodule(p).weight.detach()
        key = flat_name("unet", p)
        want = w0 + 0.8 * by_hand(w0, ta, key, False) + 1.3 * by_hand(w0, tb, key, True)
        close(results[0][p], want)
        close(results[1][p], results[0][p], tol=1e-6)


def test_several_dora_adapters_add_peft_single_adapter_changes():
    """Two DoRA adapters on a Linear and a Conv2d, in either order, fused or not: W0·x plus each
    adapter's own change as PEFT computes it with that adapter alone (both decomposed against
    W0). PEFT itself, with both active, rescales the output so far by the second adapter's
    m / ‖W0 + ΔW‖ instead (order-dependent); docs/formats.md compares the rules."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(12, 10)
            self.conv = nn.Conv2d(3, 6, 3, padding=1)

    torch.manual_seed(0)
    net = Net()
    w0s = {"lin": net.lin.weight.detach().clone(), "conv": net.conv.weight.detach().clone()}
    config = dict(target_modules=["lin", "conv"], use_dora=True, init_lora_weights=False)
    peft = get_peft_model(net, LoraConfig(r=2, lora_alpha=3, **config), adapter_name="one")
    peft.add_adapter("two", LoraConfig(r=3, lora_alpha=3, **config))
    g = torch.Generator().manual_seed(3)
    for name, p in peft.named_parameters():
        with torch.no_grad():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=g)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
    inputs = {"lin": torch.randn(5, 12, generator=g), "conv": torch.randn(2, 3, 7, 7, generator=g)}
    for part in ("lin", "conv"):
        module, x, w0 = getattr(peft.base_model.model, part), inputs[part], w0s[part]
        with torch.no_grad():
            alone = {}
            for adapter in ("one", "two"):
                module.set_adapter(adapter)
                alone[adapter] = module(x)
            plain = module.get_base_layer()
            want = alone["one"] + alone["two"] - plain(x)
        base = nn.Linear(12, 10) if part == "lin" else nn.Conv2d(3, 6, 3, padding=1)
        base.load_state_dict(plain.state_dict())
        layer = LoRALayer(base)
        for order in (["one", "two"], ["two", "one"]):
            for adapter in order:
                m = module.lora_magnitude_vector[adapter].weight.detach()
                layer.add(
                    adapter,
                    LoRAWeights(
                        module.lora_A[adapter].weight.detach().clone(),
                        module.lora_B[adapter].weight.detach().clone(),
                        scale=module.scaling[adapter],
                        conv=layer.conv_args(),
                        magnitude=m.reshape(w0.shape[0], *[1] * (w0.dim() - 1)).clone(),
                    ),
                )
            layer.fuse(["one", "two"])
            with torch.no_grad():
                close(layer(x), want)
            layer.fuse([])
            with torch.no_grad():
                close(layer(x), want)  # unfused
            for adapter in order:
                layer.remove(adapter)
        assert torch.equal(base.weight, w0)


def test_trained_dora_matches_peft_formula_and_saves_exactly(tmp_path, inputs):
    """add_trainable(dora=True): init changes nothing; after changing B and m the fused weight
    is PEFT's DoRA merge of the same factors, the unfused forward and its gradients are PEFT's,
    and save -> load gives the same adapter and weights."""
    pipe = load_base("tiny")
    before = run_unet(pipe, inputs), run_text(pipe, inputs)
    g = torch.Generator().manual_seed(0)
    injected = add_trainable(
        pipe.unet, "unet", ("to_q", "to_v", "conv1"), 4, 2.0, dora=True, generator=g
    )
    injected.update(
        add_trainable(pipe.text_encoder, "text_encoder", ("q_proj",), 2, dora=True, generator=g)
    )
    assert torch.equal(run_unet(pipe, inputs), before[0])  # m = ‖W0‖, B = 0
    assert torch.equal(run_text(pipe, inputs), before[1])
    for w in injected.values():
        with torch.no_grad():
            w.up.normal_(0, 0.2, generator=g)
            w.magnitude.mul_(1 + 0.3 * torch.rand(w.magnitude.shape, generator=g))

    # one Linear and one Conv2d against PEFT's own DoRA layer with the same factors
    layers = {p: m for p, m in pipe.unet.named_modules() if isinstance(m, LoRALayer)}
    for path in (
        next(p for p in layers if p.endswith("to_q")),
        next(p for p in layers if p.endswith("conv1")),
    ):
        layer = layers[path]
        ours = layer.get("train")

        class Holder(nn.Module):
            def __init__(self, base):
                super().__init__()
                self.target = base

        copy = type(layer.base)(
            *(
                (layer.base.in_features, layer.base.out_features)
                if isinstance(layer.base, nn.Linear)
                else (layer.base.in_channels, layer.base.out_channels, layer.base.kernel_size)
            ),
            bias=layer.base.bias is not None,
        )
        if isinstance(copy, nn.Conv2d):
            copy.stride, copy.padding = layer.base.stride, layer.base.padding
        copy.load_state_dict(layer.base.state_dict())
        peft = get_peft_model(
            Holder(copy), LoraConfig(r=4, lora_alpha=2.0, target_modules=["target"], use_dora=True)
        )
        module = peft.base_model.model.target
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(ours.down)
            module.lora_B["default"].weight.copy_(ours.up)
            peft_m = module.lora_magnitude_vector["default"].weight
            peft_m.copy_(ours.magnitude.reshape(peft_m.shape))
        # forward and gradients (training path, unfused)
        x = (
            torch.randn(3, layer.base.in_features, generator=g)
            if isinstance(copy, nn.Linear)
            else torch.randn(2, layer.base.in_channels, 8, 8, generator=g)
        )
        y_ours, y_peft = layer(x), module(x)
        close(y_ours, y_peft)
        y_ours.square().sum().backward()
        y_peft.square().sum().backward()
        close(ours.magnitude.grad.reshape(-1), peft_m.grad.reshape(-1), tol=1e-4)
        close(ours.up.grad, module.lora_B["default"].weight.grad, tol=1e-4)
        # fused weight == PEFT's merge
        merged = layer.merged_weight(torch.float32)
        module.merge()
        close(merged, module.get_base_layer().weight.detach())

    for w in injected.values():
        w.down.grad = w.up.grad = w.magnitude.grad = None
    adapter = collect_adapter(injected)
    assert adapter.metadata["ss_network_module"] == "lycoris.kohya"
    path = save_adapter(adapter, tmp_path / "trained.safetensors")
    tensors = load_file(path)
    scales = {k: v for k, v in tensors.items() if k.endswith(".dora_scale")}
    assert len(scales) == len(injected)
    conv_key = next(k for k in scales if k.endswith("conv1.dora_scale"))
    assert scales[conv_key].shape == (32, 1, 1, 1)  # LyCORIS' wd_on_output layout
    loaded = load_adapter(path)
    for key, factors in adapter.modules.items():
        back = loaded.modules[key]
        assert torch.equal(back.magnitude.reshape(-1), factors.magnitude.reshape(-1))
        assert torch.equal(back.down, factors.down) and torch.equal(back.up, factors.up)
    with torch.no_grad():
        live = run_unet(pipe, inputs), run_text(pipe, inputs)
    fresh = load_base("tiny")
    Mixer(fresh).add(path)
    close(run_unet(fresh, inputs), live[0])
    close(run_text(fresh, inputs), live[1])


def test_dora_refusals(tmp_path):
    """DoRA with a nonlinearity is refused (it has no ΔW to renormalise), as is a magnitude of
    a foreign shape; merging DoRA files is refused by name."""
    from sdlora.train import TrainConfig

    with pytest.raises(SdloraError, match="renormalises W0") as err:
        TrainConfig(data_dir="d", output="o", dora=True, nonlinearity="relu").check()
    assert err.value.setting == "dora"
    pipe = load_base("tiny")
    with pytest.raises(SdloraError, match="DoRA renormalises"):
        add_trainable(pipe.unet, "unet", ("to_q",), 2, nonlinearity="relu", dora=True)
    path, _ = dora_file(tmp_path)
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("to_q.dora_scale"))
    tensors[key] = torch.ones(5, 1)
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(SdloraError, match="fits neither"):
        load_adapter(tmp_path / "bad.safetensors")
    from sdlora.tools.merge import check_mergeable

    with pytest.raises(SdloraError, match="DoRA"):
        check_mergeable([load_adapter(path), load_adapter(path)])


def test_diffusers_load_lora_weights_drops_dora_scale(tmp_path, inputs):
    """How far diffusers reads our DoRA file: `load_lora_weights` warns and drops every
    `dora_scale`, so it applies the plain LoRA B·A part only (the magnitudes are lost)."""
    pipe = load_base("tiny")
    g = torch.Generator().manual_seed(0)
    injected = add_trainable(pipe.unet, "unet", ("to_q", "to_v"), 4, dora=True, generator=g)
    for w in injected.values():
        with torch.no_grad():
            w.up.normal_(0, 0.2, generator=g)
            w.magnitude.mul_(1.5)
    adapter = collect_adapter(injected)
    path = save_adapter(adapter, tmp_path / "dora.safetensors")
    for factors in adapter.modules.values():
        factors.magnitude = None
    plain = save_adapter(adapter, tmp_path / "plain.safetensors")
    theirs = load_base("tiny")
    theirs.load_lora_weights(str(path))
    as_plain = load_base("tiny")
    Mixer(as_plain).add(plain)
    as_dora = load_base("tiny")
    Mixer(as_dora).add(path)
    close(run_unet(theirs, inputs), run_unet(as_plain, inputs))
    assert (run_unet(theirs, inputs) - run_unet(as_dora, inputs)).abs().max() > 1e-3


@pytest.mark.usefixtures("one_thread")
def test_dora_training_resumes_exactly(tmp_path):
    """--dora trains the magnitude; a run stopped after its step-2 checkpoint and resumed ends
    where an uninterrupted run ends."""
    from PIL import Image

    from sdlora.train import TrainConfig, train

    data = tmp_path / "data"
    data.mkdir()
    for i, color in enumerate(((200, 30, 30), (30, 60, 220))):
        Image.new("RGB", (64, 64), color).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a shape {i}")
    values = dict(
        data_dir=str(data),
        base="tiny",
        resolution=64,
        batch_size=2,
        steps=4,
        lr=1e-2,
        save_every=2,
        tensorboard=False,
        workers=0,
        seed=7,
        dora=True,
        targets="locon",
    )
    straight = train(TrainConfig(output=str(tmp_path / "straight"), **values))
    cut = TrainConfig(output=str(tmp_path / "cut"), **values)
    first = train(cut)
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-000004")  # as if stopped after 2
    first.unlink()
    resumed = train(TrainConfig(**(vars(cut) | {"resume": "latest"})))
    a, b = load_adapter(resumed), load_adapter(straight)
    assert a.modules.keys() == b.modules.keys() and a.is_dora
    moved = 0.0
    for key in a.modules:
        for part in ("down", "up", "magnitude"):
            torch.testing.assert_close(
                getattr(a.modules[key], part), getattr(b.modules[key], part), rtol=1e-5, atol=1e-6
            )
    base = load_base("tiny")
    for key, factors in b.modules.items():
        if key.endswith("conv1"):
            path = key.removeprefix("lora_unet_")
            module = next(m for p, m in base.unet.named_modules() if p.replace(".", "_") == path)
            w0 = module.weight.detach()
            moved = max(
                moved,
                (factors.magnitude.reshape(-1) - w0.flatten(1).norm(dim=1)).abs().max().item(),
            )
    assert moved > 1e-4  # the magnitudes learned
