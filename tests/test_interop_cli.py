"""`convert`, `merge`, `inspect`, `extract` on bad input: `sdlora: <file>: <why>`, exit 2, nothing written."""

import pytest
import torch
from conftest import make_adapter_file
from safetensors.torch import save_file

from sdlora.bases.base import load_base
from sdlora.cli import main

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # 32×32 in the tiny base
KQ = "lora_unet_" + Q.replace(".", "_")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A good adapter and one bad file per case of issue 4, with the reason the error must give."""
    folder = tmp_path_factory.mktemp("interop")
    good, _ = make_adapter_file(lambda: load_base("tiny"), folder / "good.safetensors")
    save_file({"something.weight": torch.ones(2)}, folder / "unknown.safetensors")
    save_file({"model.diffusion_model.out.0.weight": torch.ones(2)}, folder / "full.safetensors")
    (folder / "adapter.pt").write_bytes(b"\x80\x04K\x01.")
    (folder / "cut.safetensors").write_bytes(good.read_bytes()[:5000])
    deep = dict(down=torch.ones(40, 32), up=torch.ones(32, 40))
    save_file(
        {f"{KQ}.lora_down.weight": deep["down"], f"{KQ}.lora_up.weight": deep["up"]},
        folder / "kohya_deep.safetensors",
    )
    save_file(
        {f"unet.{Q}.lora_A.weight": deep["down"], f"unet.{Q}.lora_B.weight": deep["up"]},
        folder / "peft_deep.safetensors",
    )
    save_file(
        {
            f"{KQ}.hada_w1_a": torch.ones(32, 40),
            f"{KQ}.hada_w1_b": torch.ones(40, 32),
            f"{KQ}.hada_w2_a": torch.ones(32, 40),
            f"{KQ}.hada_w2_b": torch.ones(40, 32),
        },
        folder / "loha_deep.safetensors",
    )
    return (
        folder,
        good,
        {
            "unknown.safetensors": "unknown adapter format",
            "full.safetensors": "full model checkpoint, not an adapter",
            "adapter.pt": "pickle files are never loaded",
            "cut.safetensors": "not a readable safetensors file",
            "kohya_deep.safetensors": "rank 40 is larger than the module's dims (32×32)",
            "peft_deep.safetensors": "rank 40 is larger than the module's dims (32×32)",
            "loha_deep.safetensors": "rank 40 is larger than the module's dims (32×32)",
        },
    )


def one_line(capsys, names: str, reason: str) -> None:
    """The error is `sdlora: ...` on one line, naming `names` (the file) and giving `reason`."""
    err = capsys.readouterr().err
    assert err.startswith("sdlora: ") and err.count("\n") == 1, err
    assert names in err and reason in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "command", ["inspect", "inspect-base", "convert-kohya", "convert-diffusers", "merge"]
)
def test_bad_files(files, tmp_path, capsys, command):
    folder, good, reasons = files
    out = tmp_path / "out.safetensors"
    for name, reason in reasons.items():
        path = str(folder / name)
        argv = {
            "inspect": ["inspect", path],
            "inspect-base": ["inspect", path, "--base", "tiny", "--json"],
            "convert-kohya": ["convert", path, "--to", "kohya", "--out", str(out)],
            "convert-diffusers": ["convert", path, "--to", "diffusers", "--out", str(out)],
            "merge": ["merge", str(good), f"{path}:0.5", "--out", str(out)],
        }[command]
        assert main(argv) == 2, name
        one_line(capsys, f"{name}: ", reason)
        assert list(tmp_path.iterdir()) == [], name


def test_merge_of_adapters_for_different_bases(files, tmp_path, capsys):
    """By architecture (an SD 1.5-wide cross-attention) and by a module's shape (48 wide here)."""
    _, good, _ = files
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file(
        {f"{k}.lora_down.weight": torch.ones(2, 768), f"{k}.lora_up.weight": torch.ones(320, 2)},
        tmp_path / "sd15.safetensors",
    )
    save_file(
        {f"{KQ}.lora_down.weight": torch.ones(2, 48), f"{KQ}.lora_up.weight": torch.ones(32, 2)},
        tmp_path / "wide.safetensors",
    )
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(good), str(tmp_path / "sd15.safetensors"), "--out", str(out)]) == 2
    one_line(
        capsys, "sd15.safetensors (SD 1.x)", "adapters made for different bases cannot be merged"
    )
    assert main(["merge", str(good), str(tmp_path / "wide.safetensors"), "--out", str(out)]) == 2
    one_line(capsys, "wide.safetensors: ", "is 32×48 but good.safetensors has it 32×32")
    assert not out.exists()


def test_extract_from_bad_checkpoints(tmp_path, capsys):
    (tmp_path / "tuned.ckpt").write_bytes(b"\x80\x04")  # a pickle cut short
    out = tmp_path / "x.safetensors"
    argv = ["extract", "--base", "tiny", "--rank", "2", "--out", str(out), "--tuned"]
    assert main([*argv, str(tmp_path / "tuned.ckpt")]) == 2
    one_line(capsys, "tuned.ckpt: ", "not a readable checkpoint")
    good, _ = make_adapter_file(lambda: load_base("tiny"), tmp_path / "lora.safetensors")
    assert main([*argv, str(good)]) == 2  # an adapter is not a model
    one_line(
        capsys, "lora.safetensors: ", "not a Stable Diffusion 1.x/2.x/XL single-file checkpoint"
    )
    assert (
        main(["extract", "--base", "tiny", "--tuned", "tiny", "--rank", "0", "--out", str(out)])
        == 2
    )
    one_line(capsys, "--rank", "must be at least 1 (got 0)")
    assert not out.exists()
