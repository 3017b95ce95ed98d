"""The Mix tab's Conflicts panel (`ui/conflicts.py`) on the tiny base: the same numbers as the
library's `compare`, the heat map under outputs/conflicts/, the notes and refusals, the button."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import make_adapter_file
from PIL import Image

from sdlora.bases.base import load_base
from sdlora.errors import SdloraError
from sdlora.io.formats import load_adapter
from sdlora.tools.conflict import compare, heatmap_size
from sdlora.ui import conflicts
from sdlora.ui import handlers as h
from sdlora.ui.common import failed
from sdlora.ui.engine import Engine
from sdlora.ui.state import MAX_ADAPTERS, Session


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Adapters `style`, `detail` (another seed and rank), `twin` (a copy of style) and `bent`
    (nonlinear); empty datasets and outputs folders."""
    root = tmp_path_factory.mktemp("conflicts")
    adapters = root / "adapters"
    adapters.mkdir()
    make_adapter_file(lambda: load_base("tiny"), adapters / "style.safetensors", seed=1)
    make_adapter_file(lambda: load_base("tiny"), adapters / "detail.safetensors", rank=2, seed=2)
    shutil.copy(adapters / "style.safetensors", adapters / "twin.safetensors")
    make_adapter_file(
        lambda: load_base("tiny"), adapters / "bent.safetensors", nonlinearity="tanh", seed=3
    )
    names = {"adapters": adapters, "datasets": root / "datasets", "outputs": root / "outputs"}
    names["datasets"].mkdir()
    return names


@pytest.fixture(scope="module")
def ctx(folders) -> h.Context:
    return h.Context(
        "tiny", folders["adapters"], folders["datasets"], folders["outputs"], Engine("cpu")
    )


def library_report(folders, *names: str) -> dict:
    return compare([load_adapter(folders["adapters"] / f"{n}.safetensors") for n in names])


def test_same_numbers_as_compare(ctx, folders):
    result = conflicts.compare_mix(ctx, {"style": 1.0, "detail": 0.5, "twin": 0.8})
    expected = library_report(folders, "style", "detail", "twin")
    assert [row[:2] for row in result.rows] == [
        ["style", "detail"],
        ["style", "twin"],
        ["detail", "twin"],
    ]
    for row, pair in zip(result.rows, expected["pairs"], strict=True):
        assert row[2] == pytest.approx(pair["overall"]["cosine"], abs=1e-4)
        assert row[3] == pytest.approx(pair["overall"]["overlap"], abs=1e-4)
        assert row[4] == (", ".join(pair["conflicts"]) or "none")
    # an adapter with (a copy of) itself: cosine and overlap 1 in every block
    assert result.rows[1][2:] == [pytest.approx(1.0, abs=1e-4)] * 2 + ["none"]
    for block in result.report["pairs"][1]["blocks"].values():
        assert block["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert abs(result.rows[0][2]) < 0.5  # two independent random adapters: far from 1
    # the page names adapters, never the server's paths
    assert str(folders["adapters"]) not in conflicts.per_block(result.report) + result.note


def test_heatmap_written_inside_outputs(ctx, folders):
    first = conflicts.compare_mix(ctx, {"style": 1.0, "twin": 1.0})
    second = conflicts.compare_mix(ctx, {"style": 1.0, "twin": 1.0})
    outputs = folders["outputs"].resolve()
    for result in (first, second):
        assert result.heatmap.is_file()
        assert result.heatmap.parent == outputs / conflicts.FOLDER
        assert result.heatmap.name.endswith(".png")
        with Image.open(result.heatmap) as image:
            assert image.format == "PNG"
            assert image.size == heatmap_size(result.report)
    assert first.heatmap != second.heatmap  # a second press in the same second: a new file
    assert "conflicts/" in first.note and "1 = style, 2 = twin" in first.note


@pytest.mark.parametrize("mix", [{}, {"style": 1.0}])
def test_fewer_than_two_gives_the_note(ctx, mix):
    result = conflicts.compare_mix(ctx, mix)
    assert result.report is None and result.rows == [] and result.heatmap is None
    assert result.note == conflicts.NEEDS_TWO.format(n=len(mix))
    assert "two or more" in result.note


def test_nonlinear_refused_in_one_line(ctx):
    with pytest.raises(SdloraError) as info:
        conflicts.compare_mix(ctx, {"style": 1.0, "bent": 1.0})
    shown = failed(info.value)
    assert "bent" in shown and "nonlinearity" in shown and "\n" not in shown
    assert "sd-error" in shown


def test_the_button_in_the_built_app(folders):
    """The Mix tab has the button, and pressing it reads the page's mix: switched-off
    adapters are left out, the table, heat map and status line come back."""
    from sdlora.ui.app import build_app

    app = build_app("tiny", folders["adapters"], folders["datasets"], folders["outputs"])
    blocks = {b.elem_id: b for b in app.blocks.values() if getattr(b, "elem_id", None)}
    button = blocks["compare-conflicts"]
    assert button.value == "Compare the mix's adapters"
    (event,) = [f for f in app.fns.values() if any(t[0] == button._id for t in f.targets)]
    session = Session(base="tiny")
    for name in ("style", "detail", "twin"):
        session.add(name)
    ons = [True, False, True] + [False] * (MAX_ADAPTERS - 3)
    strengths = [1.0] * MAX_ADAPTERS
    table, image, per_block, status = event.fn(session, "tiny", *ons, *strengths)
    assert [row[:2] for row in table.value["data"]] == [["style", "twin"]]
    assert Path(image).is_file() and "OUT" in per_block and "sd-ok" in status
    ons[2] = False  # one left on
    *_, status = event.fn(session, "tiny", *ons, *strengths)
    assert "two or more adapters" in status and "sd-error" not in status
    session.add("bent")  # style and bent on: refused, in the status line
    ons[3] = True
    *_, status = event.fn(session, "tiny", *ons, *strengths)
    assert "sd-error" in status and "bent" in status
