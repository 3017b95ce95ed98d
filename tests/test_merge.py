"""Merging adapters: exact merge == live blend, SVD compression error, refusals, CLI."""

import pytest
import torch
from conftest import make_adapter_file, run_text, run_unet
from safetensors.torch import save_file
from test_formats import close, kohya_file

from sdlora.bases.base import load_base
from sdlora.cli import main
from sdlora.errors import SdloraError
from sdlora.io.files import save_adapter
from sdlora.io.formats import load_adapter
from sdlora.lora.adapter import Adapter, ModuleFactors
from sdlora.lora.blend import Mixer
from sdlora.tools.merge import compress, merge_adapters, merge_exact


@pytest.fixture
def files(tmp_path):
    """Two sdlora adapters (rank 4, alpha 8; rank 2 UNet only) and a kohya LoCon with alpha ≠ rank."""
    a, _ = make_adapter_file(
        lambda: load_base("tiny"), tmp_path / "a.safetensors", alpha=8.0, seed=1
    )
    b, _ = make_adapter_file(
        lambda: load_base("tiny"), tmp_path / "b.safetensors", rank=2, seed=2, text_encoder=False
    )
    k, _ = kohya_file(tmp_path)
    return [a, b, k]


def live_blend(files, strengths):
    pipe = load_base("tiny")
    mixer = Mixer(pipe)
    for f, s in zip(files, strengths, strict=True):
        mixer.add(f, strength=s)
    return pipe


def test_exact_merge_equals_live_blend(files, inputs, tmp_path):
    strengths = (0.7, -0.4, 1.3)
    merged, report = merge_adapters(
        [(load_adapter(f), s) for f, s in zip(files, strengths, strict=True)]
    )
    assert report.overall == 0.0
    save_adapter(merged, tmp_path / "m.safetensors")
    ours = load_base("tiny")
    Mixer(ours).add(tmp_path / "m.safetensors")
    live = live_blend(files, strengths)
    close(run_unet(ours, inputs), run_unet(live, inputs))
    close(run_text(ours, inputs), run_text(live, inputs))
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert load_adapter(tmp_path / "m.safetensors").modules[key].rank == 4 + 2 + 4  # concatenated


def test_svd_error_shrinks_and_vanishes_at_full_rank(files, inputs, tmp_path):
    merged, _ = merge_adapters(
        [(load_adapter(f), s) for f, s in zip(files, (1.0, 0.5, 0.8), strict=True)]
    )
    errors = [compress(merged, r)[1].overall for r in (1, 2, 4, 6, 10)]
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:-1], strict=False)), errors
    assert errors[0] > 0.05 and errors[-1] < 1e-6
    full, report = merge_adapters(
        [(load_adapter(f), s) for f, s in zip(files, (1.0, 0.5, 0.8), strict=True)], rank=10
    )
    assert set(report.errors) == set(full.modules) and max(report.errors.values()) < 1e-6
    save_adapter(full, tmp_path / "full.safetensors")
    ours = load_base("tiny")
    Mixer(ours).add(tmp_path / "full.safetensors")
    live = live_blend(files, (1.0, 0.5, 0.8))
    close(run_unet(ours, inputs), run_unet(live, inputs))
    close(run_text(ours, inputs), run_text(live, inputs))


def test_refusals(files, tmp_path):
    n, _ = make_adapter_file(
        lambda: load_base("tiny"), tmp_path / "n.safetensors", nonlinearity="gelu"
    )
    with pytest.raises(SdloraError, match="n.safetensors: has nonlinearity 'gelu'"):
        merge_adapters([(load_adapter(files[0]), 1.0), (load_adapter(n), 1.0)])
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file(
        {
            f"{key}.lora_down.weight": torch.ones(2, 768),
            f"{key}.lora_up.weight": torch.ones(320, 2),
        },
        tmp_path / "sd15.safetensors",
    )
    with pytest.raises(
        SdloraError, match=r"different bases cannot be merged: .*sd15.safetensors \(SD 1.x\)"
    ):
        merge_adapters(
            [(load_adapter(files[0]), 1.0), (load_adapter(tmp_path / "sd15.safetensors"), 1.0)]
        )


def test_cli(files, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["merge", f"{files[0]}:0.7", str(files[1]), "--out", str(out), "--rank", "3"]) == 0
    text = capsys.readouterr().out
    assert "rank 3: overall relative error" in text and load_adapter(out).ranks() == [3]
    assert main(["merge", str(files[0]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdlora: ") and "already exists" in err and err.count("\n") == 1
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 4)
    assert (
        main(
            [
                "merge",
                str(files[0]),
                str(tmp_path / "bad.safetensors"),
                "--out",
                str(tmp_path / "x.safetensors"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "bad.safetensors: not a readable safetensors" in err and "Traceback" not in err
    assert not (tmp_path / "x.safetensors").exists()


def test_exact_merge_above_layer_rank_stays_loadable(files, inputs, tmp_path):
    """Concatenated ranks past a layer's dims (36 > 32) are re-factored exactly to min(out, in)."""
    a, b = load_adapter(files[0]), load_adapter(files[1])
    strengths_a = (0.3, -0.2, 0.5, 0.1, 0.4, -0.6, 0.2, 0.7, -0.1)  # 9 x rank 4 = 36
    strengths_b = (0.9, -0.5, 0.3)  # 3 x rank 2, UNet only
    items = [(a, s) for s in strengths_a] + [(b, s) for s in strengths_b]
    merged, _ = merge_adapters(items)
    for key, m in merged.modules.items():
        assert m.rank <= min(m.up.shape[0], m.down[0].numel()), key
    q32 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # 32×32
    q64 = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # 64×64
    assert merged.modules[q32].rank == 32 and merged.modules[q64].rank == 36 + 6
    save_adapter(merged, tmp_path / "m.safetensors")
    ours = load_base("tiny")
    Mixer(ours).add(tmp_path / "m.safetensors")
    live = load_base("tiny")
    mixer = Mixer(live)
    for i, (adapter, s) in enumerate(items):
        mixer.add(adapter, name=f"in{i}", strength=s)
    assert (run_unet(live, inputs) - run_unet(load_base("tiny"), inputs)).abs().max() > 1e-3
    close(run_unet(ours, inputs), run_unet(live, inputs))
    close(run_text(ours, inputs), run_text(live, inputs))


def test_ui_mix_merge_above_layer_rank_stays_loadable(files, inputs, tmp_path):
    """The web UI's "save the mix as one LoRA" (the library's merge keyed by the base) caps
    concatenated ranks the same way, exactly."""
    a = load_adapter(files[0])
    items = [
        (f"in{i}", a, s) for i, s in enumerate((0.3, -0.2, 0.5, 0.1, 0.4, -0.6, 0.2, 0.7, 0.9))
    ]
    live = load_base("tiny")
    mixer = Mixer(live)
    merged = merge_exact([(adapter, s) for _, adapter, s in items], mixer.models)
    for key, m in merged.modules.items():
        assert m.rank <= min(m.up.shape[0], m.down[0].numel()), key
    save_adapter(merged, tmp_path / "mix.safetensors")
    ours = load_base("tiny")
    Mixer(ours).add(tmp_path / "mix.safetensors")
    for name, adapter, s in items:
        mixer.add(adapter, name=name, strength=s)
    close(run_unet(ours, inputs), run_unet(live, inputs))
    close(run_text(ours, inputs), run_text(live, inputs))


def test_merge_refuses_adapters_of_different_families_before_writing(files, tmp_path, capsys):
    """Issue 29: an SD 1.x and an SDXL adapter made one file that both bases refuse. Refused in
    one line naming both files and families, however the family shows: the cross-attention
    width, the new words' encoders and width, or kohya's metadata."""
    xl, _ = make_adapter_file(lambda: load_base("tiny-xl"), tmp_path / "xl.safetensors")
    with pytest.raises(SdloraError) as refused:
        merge_adapters([(load_adapter(files[0]), 1.0), (load_adapter(xl), 0.5)])
    text = str(refused.value)
    assert f"{files[0].name} is an SD 1.x adapter and {xl.name} an SDXL one" in text, text
    assert "different model families cannot be merged" in text and "\n" not in text
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(files[0]), str(xl), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdlora: ") and err.count("\n") == 1 and "SDXL" in err
    assert not out.exists() and not list(tmp_path.glob(".m.safetensors*"))

    attn1 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    factors = ModuleFactors(down=torch.randn(2, 32), up=torch.randn(32, 2))
    worded = Adapter(  # nothing but its word (32 wide: tiny's text encoder) says SD 1.x
        {attn1: factors},
        source="worded.safetensors",
        embeddings={"ohwx": {"text_encoder": torch.zeros(1, 32)}},
    )
    versioned = Adapter(  # only kohya's metadata says SD 1.x
        {attn1: factors}, metadata={"ss_base_model_version": "sd_v1"}, source="v1.safetensors"
    )
    for sd1 in (worded, versioned):
        with pytest.raises(SdloraError, match=rf"{sd1.source} is an SD 1.x adapter and .*SDXL"):
            merge_adapters([(sd1, 1.0), (load_adapter(xl), 1.0)])


def test_adapters_of_one_family_merge_however_their_family_shows(files, inputs, tmp_path):
    """A file whose base shows only in its metadata merges with one whose widths show it."""
    attn1 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    named = Adapter(
        {attn1: ModuleFactors(down=torch.randn(2, 32), up=torch.randn(32, 2))},
        metadata={"sdlora_base_model": "tiny"},
        source="named.safetensors",
    )
    save_adapter(named, tmp_path / "named.safetensors")
    merged, _ = merge_adapters([(load_adapter(files[0]), 0.6), (named, 0.5)])
    save_adapter(merged, tmp_path / "m.safetensors")
    ours = load_base("tiny")
    Mixer(ours).add(tmp_path / "m.safetensors")
    live = live_blend([files[0], tmp_path / "named.safetensors"], (0.6, 0.5))
    close(run_unet(ours, inputs), run_unet(live, inputs))
