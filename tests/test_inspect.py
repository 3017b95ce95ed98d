"""`sdlora inspect`: the numbers it prints are the file's, coverage counts shapes, text and JSON agree."""

import json

import pytest
import torch
from conftest import make_adapter_file
from safetensors.torch import load_file, save_file
from test_formats import kohya_file

from sdlora.bases.base import load_base
from sdlora.cli import main
from sdlora.errors import SdloraError
from sdlora.io.files import read_safetensors
from sdlora.tools.inspect import inspect_file


def field(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(name + ":")).split(":", 1)[1]


def test_text_and_json_report_alpha_and_effective_scale(tmp_path, capsys):
    """kohya LoCon with alpha ≠ rank and one module without alpha: scale = alpha / rank per module."""
    path, _ = kohya_file(tmp_path)
    tensors = load_file(path)
    expected = {}  # module -> (rank, alpha, scale), read from the tensors themselves
    for name, down in tensors.items():
        if name.endswith(".lora_down.weight"):
            module = name.removesuffix(".lora_down.weight")
            rank = down.shape[0]
            alpha = (
                float(tensors[f"{module}.alpha"]) if f"{module}.alpha" in tensors else float(rank)
            )
            expected[module] = (rank, alpha, alpha / rank)
    assert main(["inspect", str(path), "--json", "--base", "tiny"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "kohya-locon"
    assert info["ranks"] == sorted({r for r, _, _ in expected.values()})
    torch.testing.assert_close(
        torch.tensor(info["alphas"]), torch.tensor(sorted({a for _, a, _ in expected.values()}))
    )
    torch.testing.assert_close(
        torch.tensor(info["scales"]), torch.tensor(sorted({s for _, _, s in expected.values()}))
    )
    assert info["modules"] == {"unet": 4, "text_encoder": 2}
    assert info["coverage"] == {
        "matched": 6,
        "unmatched": 0,
        "unmatched_examples": [],
        "mismatched": 0,
        "mismatched_examples": [],
    }
    assert main(["inspect", str(path), "--base", "tiny"]) == 0
    text = capsys.readouterr().out
    assert field(text, "format").strip() == "kohya-locon"
    scales = [float(s) for s in field(text, "scale").split("(")[0].split(",")]
    torch.testing.assert_close(torch.tensor(scales), torch.tensor(info["scales"]))
    assert field(text, "coverage").strip() == "6 matched, 0 unmatched, 0 of another shape"


def test_trigger_words_and_training_settings_shown(tmp_path, capsys):
    path, _ = make_adapter_file(lambda: load_base("tiny"), tmp_path / "ink.safetensors", alpha=2.0)
    tensors, meta = read_safetensors(path)
    meta["sdlora_trigger_words"] = json.dumps(["sks ink", "blot"])
    meta["sdlora_training"] = json.dumps({"steps": 7, "learning_rate": 1e-4})
    save_file(tensors, tmp_path / "tw.safetensors", metadata=meta)
    assert main(["inspect", str(tmp_path / "tw.safetensors")]) == 0
    text = capsys.readouterr().out
    assert field(text, "trigger words").strip() == "sks ink, blot"
    assert json.loads(field(text, "training")) == {"steps": 7, "learning_rate": 1e-4}
    assert field(text, "scale").split("(")[0].strip() == "1"  # folded on save: alpha = rank
    info = inspect_file(tmp_path / "tw.safetensors")
    assert info["trigger_words"] == ["sks ink", "blot"] and info["alphas"] == [4.0]


def test_coverage_counts_other_shapes_apart(tmp_path, capsys):
    """A key naming a real module whose weight has another shape is not 'matched'."""
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # 32×32
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    save_file(
        {
            f"{q}.lora_down.weight": torch.ones(2, 48),  # 48 wide: made for another base
            f"{q}.lora_up.weight": torch.ones(32, 2),
            f"{k}.lora_down.weight": torch.ones(2, 32),
            f"{k}.lora_up.weight": torch.ones(32, 2),
            "lora_unet_nowhere.lora_down.weight": torch.ones(2, 8),
            "lora_unet_nowhere.lora_up.weight": torch.ones(8, 2),
        },
        tmp_path / "mixed.safetensors",
    )
    cov = inspect_file(tmp_path / "mixed.safetensors", load_base("tiny"))["coverage"]
    assert (cov["matched"], cov["unmatched"], cov["mismatched"]) == (1, 1, 1)
    assert cov["mismatched_examples"] == [q] and cov["unmatched_examples"] == ["lora_unet_nowhere"]
    assert main(["inspect", str(tmp_path / "mixed.safetensors"), "--base", "tiny"]) == 0
    text = capsys.readouterr().out
    assert field(text, "coverage").strip() == "1 matched, 1 unmatched, 1 of another shape"
    assert f"other shape e.g. {q}" in text


def test_a_file_with_too_many_tensors_is_refused_from_its_header(tmp_path, monkeypatch):
    """Reading 100,000 tiny tensors took minutes; the header's count is enough to refuse."""
    from sdlora.io import files

    path = tmp_path / "many.safetensors"
    count = files.MAX_TENSORS + 1
    save_file({f"x{i}": torch.zeros(1) for i in range(count)}, str(path))

    def never(*args, **kwargs):
        raise AssertionError("the tensors were read")

    monkeypatch.setattr(files, "load_file", never)
    with pytest.raises(SdloraError, match=f"holds {count:,} tensors"):
        inspect_file(path)


def proj_file(tmp_path, kernel: int, name: str, metadata: dict | None = None):
    """A kohya SD 1.x file: attention q, k (its width shows SD 1.x) and the 1x1-conv proj_in (as kohya's plain LoRA wraps
    it), plus a resnet conv1 with a `kernel`×`kernel` down factor when kernel > 1."""
    g = torch.Generator().manual_seed(3)
    prefix = "lora_unet_down_blocks_0_attentions_0_"
    tensors = {
        f"{prefix}transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(
            2, 32, generator=g
        ),
        f"{prefix}transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(32, 2, generator=g),
        f"{prefix}transformer_blocks_0_attn2_to_k.lora_down.weight": torch.randn(
            2, 32, generator=g
        ),
        f"{prefix}transformer_blocks_0_attn2_to_k.lora_up.weight": torch.randn(32, 2, generator=g),
        f"{prefix}proj_in.lora_down.weight": torch.randn(2, 32, 1, 1, generator=g),
        f"{prefix}proj_in.lora_up.weight": torch.randn(32, 2, 1, 1, generator=g),
    }
    if kernel > 1:
        conv = "lora_unet_down_blocks_0_resnets_0_conv1"
        tensors[f"{conv}.lora_down.weight"] = torch.randn(2, 32, kernel, kernel, generator=g)
        tensors[f"{conv}.lora_up.weight"] = torch.randn(32, 2, 1, 1, generator=g)
    path = tmp_path / name
    save_file(tensors, path, metadata=metadata or {"ss_network_module": "networks.lora"})
    return path


def test_plain_kohya_lora_with_1x1_proj_convs_is_lora_and_3x3_is_locon(tmp_path, capsys):
    """kohya's plain SD 1.x LoRA wraps the 1x1 proj_in/proj_out convs: still LoRA. k×k convs, or
    training metadata that says LoCon (conv_dim in ss_network_args), make LoCon."""
    plain = proj_file(tmp_path, 1, "plain.safetensors")
    assert inspect_file(plain)["format"] == "kohya-lora"
    assert inspect_file(proj_file(tmp_path, 3, "locon.safetensors"))["format"] == "kohya-locon"
    args = {"ss_network_module": "networks.lora", "ss_network_args": '{"conv_dim": "4"}'}
    said = proj_file(tmp_path, 1, "said.safetensors", args)
    assert inspect_file(said)["format"] == "kohya-locon"
    lycoris = {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "locon"}'}
    assert inspect_file(proj_file(tmp_path, 1, "ly.safetensors", lycoris))["format"] == (
        "kohya-locon"
    )
    assert main(["inspect", str(plain)]) == 0
    assert field(capsys.readouterr().out, "format").strip() == "kohya-lora"


def test_family_as_other_tools_read_it(tmp_path, capsys):
    """inspect prints the family A1111 reads from the labels, and warns when the labels and the
    weights disagree (an SD 1.x file labelled SD 2.x is hidden on SD 1.x models)."""
    path, _ = make_adapter_file(lambda: load_base("tiny"), tmp_path / "a.safetensors")
    info = inspect_file(path)
    assert info["read_as"] == {"a1111": "SD 1.x", "modelspec": "stable-diffusion-v1/lora"}
    wrong = proj_file(tmp_path, 1, "wrong.safetensors", {"ss_v2": "True"})
    assert main(["inspect", str(wrong)]) == 0
    line = field(capsys.readouterr().out, "read as").strip()
    assert line.startswith("A1111: SD 2.x; model spec: none (not SD 1.x")
    xl, _ = make_adapter_file(lambda: load_base("tiny-xl"), tmp_path / "xl.safetensors")
    assert inspect_file(xl)["read_as"]["a1111"] == "SDXL"
