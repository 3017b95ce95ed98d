"""The conflict report (`sdlora inspect A B …`): cosines, overlaps, conflicts, JSON, heat map."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from sdlora.cli import main
from sdlora.errors import SdloraError
from sdlora.io.files import save_adapter
from sdlora.lora.adapter import Adapter, ModuleFactors
from sdlora.tools.conflict import compare, format_report, heatmap_size

# SD 1.x names (cross-attention width 768 makes the family SD 1.x); tiny widths elsewhere
DOWN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # IN01
DOWN_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # IN01
MID = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"  # M00
UP = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # OUT03
TEXT = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # BASE


def factors(seed: int, out: int = 16, width: int = 16, rank: int = 2) -> ModuleFactors:
    g = torch.Generator().manual_seed(seed)
    return ModuleFactors(torch.randn(rank, width, generator=g), torch.randn(out, rank, generator=g))


def adapter(keys, seed: int = 0, source: str = "a.safetensors", width_k: int = 768) -> Adapter:
    modules = {
        k: factors(seed + n, width=width_k if k.endswith("attn2_to_k") else 16)
        for n, k in enumerate(keys)
    }
    return Adapter(modules=modules, source=source)


def negated(a: Adapter, source: str = "neg.safetensors") -> Adapter:
    modules = {k: ModuleFactors(m.down, -m.up, m.alpha) for k, m in a.modules.items()}
    return Adapter(modules=modules, source=source)


def test_itself_cosine_one_everywhere():
    a = adapter([DOWN, DOWN_K, MID, UP, TEXT])
    pair = compare([a, a])["pairs"][0]
    assert set(pair["blocks"]) == {"BASE", "IN01", "M00", "OUT03"}
    for row in [*pair["blocks"].values(), pair["overall"]]:
        assert row["cosine"] == pytest.approx(1.0, abs=1e-5)
        assert row["overlap"] == pytest.approx(1.0, abs=1e-5)
    assert pair["conflicts"] == []


def test_negation_minus_one_and_conflicts():
    a = adapter([DOWN, DOWN_K, MID, UP, TEXT])
    pair = compare([a, negated(a)])["pairs"][0]
    for row in [*pair["blocks"].values(), pair["overall"]]:
        assert row["cosine"] == pytest.approx(-1.0, abs=1e-5)
        assert row["overlap"] == pytest.approx(1.0, abs=1e-5)  # same magnitudes
    assert pair["conflicts"] == ["BASE", "IN01", "M00", "OUT03"]


def test_small_block_is_no_conflict():
    """A block whose ΔW is tiny next to the adapter's largest is left out of the conflicts."""
    a = adapter([DOWN, MID])
    a.modules[MID] = ModuleFactors(a.modules[MID].down, a.modules[MID].up * 1e-3)
    pair = compare([a, negated(a)])["pairs"][0]
    assert pair["blocks"]["M00"]["cosine"] == pytest.approx(-1.0, abs=1e-5)
    assert pair["conflicts"] == ["IN01"]


def test_disjoint_blocks_zero_and_reported_one_sided():
    a = adapter([DOWN, MID], source="a.safetensors")
    b = adapter([UP, TEXT], seed=5, source="b.safetensors")
    pair = compare([a, b])["pairs"][0]
    assert pair["overall"]["cosine"] == pytest.approx(0.0, abs=1e-7)
    assert pair["overall"]["overlap"] == pytest.approx(0.0, abs=1e-7)
    status = {block: row["status"] for block, row in pair["blocks"].items()}
    assert status == {"IN01": "only A", "M00": "only A", "OUT03": "only B", "BASE": "only B"}
    assert pair["conflicts"] == []
    assert "only A" in format_report(compare([a, b]))


def test_partly_shared_overall_counts_missing_as_zero():
    """Overall, a module one adapter lacks is ΔW = 0 there: the cosine is <a,b> / (‖a‖‖b‖)."""
    a = adapter([DOWN, MID])
    b = Adapter(modules={DOWN: a.modules[DOWN]}, source="b.safetensors")
    pair = compare([a, b])["pairs"][0]
    da = torch.cat([(m.up @ m.down).flatten() for m in a.modules.values()])
    db = torch.cat([(b.modules[DOWN].up @ b.modules[DOWN].down).flatten(), torch.zeros(256)])
    expected = float(da.dot(db) / (da.norm() * db.norm()))
    assert pair["overall"]["cosine"] == pytest.approx(expected, rel=1e-5)
    assert pair["blocks"]["IN01"]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert pair["blocks"]["M00"]["status"] == "only A"


def test_three_adapters_three_pairs():
    a, b = adapter([DOWN, MID]), adapter([DOWN, MID], seed=9, source="b.safetensors")
    report = compare([a, b, negated(a)])
    assert [(p["a"], p["b"]) for p in report["pairs"]] == [
        ("a.safetensors", "b.safetensors"),
        ("a.safetensors", "neg.safetensors"),
        ("b.safetensors", "neg.safetensors"),
    ]
    assert report["pairs"][1]["overall"]["cosine"] == pytest.approx(-1.0, abs=1e-5)


def test_nonlinear_refused():
    a = adapter([DOWN])
    b = Adapter(modules=dict(a.modules), nonlinearity="tanh", source="nl.safetensors")
    with pytest.raises(SdloraError, match="nl.safetensors: has nonlinearity 'tanh'.*input"):
        compare([a, b])


def save(a: Adapter, path) -> str:
    return str(save_adapter(a, path, overwrite=True))


def test_cli_json_agrees_with_text_and_heatmap(tmp_path, capsys):
    a = adapter([DOWN, DOWN_K, MID, UP, TEXT])
    b = adapter([DOWN, MID], seed=3)
    files = [save(a, tmp_path / "a.safetensors"), save(b, tmp_path / "b.safetensors")]
    files.append(save(negated(a), tmp_path / "n.safetensors"))
    png = tmp_path / "map.png"
    assert main(["inspect", *files, "--heatmap", str(png)]) == 0
    text = capsys.readouterr().out
    assert main(["inspect", *files, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["pairs"]) == 3
    # every number the text shows is the JSON's, to the printed precision
    shown = re.findall(r"^  (\S+) +(-?\d\.\d{4}) +(\d\.\d{4}) ", text, flags=re.M)
    expected = []
    for pair in report["pairs"]:
        rows = {**pair["blocks"], "overall": pair["overall"]}
        expected += [
            (b, r["cosine"], r["overlap"])
            for b, r in rows.items()
            if r.get("status", "both") == "both"
        ]
    assert len(shown) == len(expected)
    for (block, cos, ov), (want_block, want_cos, want_ov) in zip(shown, expected, strict=True):
        assert block == want_block
        assert float(cos) == pytest.approx(want_cos, abs=6e-5)
        assert float(ov) == pytest.approx(want_ov, abs=6e-5)
    assert "push against each other: BASE, IN01, M00, OUT03" in text
    with Image.open(png) as image:
        assert image.size == heatmap_size(report)
        assert image.size == (48 + 24 * (len(report["blocks"]) + 1), 48 + 24 * 3)
        # row 2 (a vs its negation), the overall column: full red
        x, y = 48 + 24 * len(report["blocks"]) + 12, 48 + 24 * 1 + 12
        assert image.convert("RGB").getpixel((x, y)) == (255, 0, 0)
    # the heat map is not replaced without --overwrite
    assert main(["inspect", *files, "--heatmap", str(png)]) == 2
    assert "--heatmap" in capsys.readouterr().err


def test_cli_family_mismatch_one_line(tmp_path, capsys):
    sd = adapter([DOWN_K], source="sd")
    xl = adapter([DOWN_K], source="xl", width_k=2048)
    files = [save(sd, tmp_path / "sd.safetensors"), save(xl, tmp_path / "xl.safetensors")]
    assert main(["inspect", *files]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "different model families" in err and "sd.safetensors" in err


def test_cli_heatmap_needs_two_files(tmp_path, capsys):
    path = save(adapter([DOWN]), tmp_path / "a.safetensors")
    assert main(["inspect", path, "--heatmap", str(tmp_path / "m.png")]) == 2
    assert "--heatmap needs two or more" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()


def test_cli_trained_adapters_on_the_tiny_base(tmp_path, capsys):
    """Adapters made on the tiny base (every attention module, both components), checked
    against it with --base: with itself 1, two seeds somewhere strictly between -1 and 1."""
    from conftest import make_adapter_file

    from sdlora.bases.base import load_base

    a, _ = make_adapter_file(lambda: load_base("tiny"), tmp_path / "a.safetensors", seed=1)
    b, _ = make_adapter_file(lambda: load_base("tiny"), tmp_path / "b.safetensors", seed=2)
    assert main(["inspect", str(a), str(a), str(b), "--base", "tiny", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    same, other = report["pairs"][0], report["pairs"][1]
    assert "BASE" in report["blocks"] and len(report["blocks"]) > 2
    assert all(r["cosine"] == pytest.approx(1.0, abs=1e-5) for r in same["blocks"].values())
    assert -1.0 < other["overall"]["cosine"] < 1.0
    assert 0.0 < other["overall"]["overlap"] < 1.0
