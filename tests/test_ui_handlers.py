"""The web UI's handlers on CPU with the tiny base: path safety, uploads, per-session mixes,
PNG recipes, exports (a merged LoRA equals the live blend) and grids (training: test_ui_training)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_adapter_file, run_text, run_unet
from PIL import Image
from safetensors import safe_open

from sdlora.bases.base import load_base
from sdlora.errors import SdloraError
from sdlora.lora.blend import Mixer
from sdlora.ui import exporting as ex
from sdlora.ui import handlers as h
from sdlora.ui import paths
from sdlora.ui.engine import Engine
from sdlora.ui.state import Session

STEPS = 2  # denoising steps: enough to show a difference, cheap on CPU


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from threads, and on a busy 2-core machine they cost 10x."""
    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # training runs in a child process
    yield
    torch.set_num_threads(before)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Adapters folder with two adapters (`style` rank 4, `detail` rank 2), datasets, outputs."""
    root = tmp_path_factory.mktemp("ui")
    adapters = root / "adapters"
    adapters.mkdir()
    make_adapter_file(lambda: load_base("tiny"), adapters / "style.safetensors", seed=1)
    make_adapter_file(lambda: load_base("tiny"), adapters / "detail.safetensors", rank=2, seed=2)
    datasets = root / "datasets"
    shutil.copytree(Path(__file__).parents[1] / "samples" / "style", datasets / "style")
    return {"root": root, "adapters": adapters, "datasets": datasets, "outputs": root / "outputs"}


@pytest.fixture(scope="module")
def ctx(folders) -> h.Context:
    return h.Context(
        "tiny", folders["adapters"], folders["datasets"], folders["outputs"], Engine("cpu")
    )


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def settings(seed: int = 3) -> h.GenerateSettings:
    return h.make_settings("a red circle", steps=STEPS, seed=seed)


# ---------------------------------------------------------------- paths


@pytest.mark.parametrize(
    "name",
    ["../style", "a/../../style", "/etc/passwd", "~/x", "C:/x", "a\\..\\b", "", ".", "x\x00"],
)
def test_names_that_leave_the_folder_are_refused(ctx, name):
    with pytest.raises(SdloraError):
        paths.inside(ctx.adapters, name)
    with pytest.raises(SdloraError):
        h.adapter_info(ctx, name)


def test_symlink_out_of_the_folder_is_refused_and_not_listed(ctx, folders):
    outside = folders["root"] / "outside.safetensors"
    shutil.copy(folders["adapters"] / "style.safetensors", outside)
    link = folders["adapters"] / "sneaky.safetensors"
    link.symlink_to(outside)
    try:
        assert "sneaky" not in h.list_adapters(ctx)
        with pytest.raises(SdloraError, match="outside"):
            h.mix_files(ctx, {"sneaky": 1.0})
    finally:
        link.unlink()
    assert h.list_adapters(ctx) == ["detail", "style"]


@pytest.mark.parametrize("name", ["../x", "a/b", "/tmp/x", ".hidden", "x" * 200, "a:b"])
def test_export_names_are_single_safe_file_names(ctx, name):
    with pytest.raises(SdloraError):
        ex.run_export(ctx, "tiny", {}, "lora", name=name)


def test_only_listed_bases_are_loaded(ctx):
    assert h.base_choices(ctx)[0] == "tiny" and "toy" in h.base_choices(ctx)
    for bad in ["/etc", "../x", "exports/../../x", "adapters"]:
        with pytest.raises(SdloraError):
            h.resolve_base(ctx, bad)


# ---------------------------------------------------------------- uploads


def test_upload_accepts_a_lora_and_refuses_everything_else(ctx, folders, tmp_path):
    good = tmp_path / "new.safetensors"
    shutil.copy(folders["adapters"] / "detail.safetensors", good)
    assert h.upload_adapter(ctx, good) == "new"
    assert (ctx.adapters / "new.safetensors").is_file()
    with pytest.raises(SdloraError, match="already"):
        h.upload_adapter(ctx, good)
    (ctx.adapters / "new.safetensors").unlink()

    pickle = tmp_path / "evil.ckpt"
    pickle.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(SdloraError, match=".safetensors"):
        h.upload_adapter(ctx, pickle)
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"not a safetensors file at all")
    with pytest.raises(SdloraError, match="safetensors"):
        h.upload_adapter(ctx, fake)
    small = h.Context(
        "tiny", ctx.adapters, ctx.datasets, ctx.outputs, ctx.engine, max_upload_bytes=100
    )
    with pytest.raises(SdloraError, match="upload limit"):
        h.upload_adapter(small, good)
    assert h.list_adapters(ctx) == ["detail", "style"]


# ---------------------------------------------------------------- mixes and generation


def test_two_sessions_mixes_do_not_leak(ctx):
    """One shared pipeline: A's adapters never show in B's images, in either order."""
    a, b = Session("tiny"), Session("tiny")
    h.add_adapter(ctx, a, "style")
    h.add_adapter(ctx, a, "detail", 0.5)
    assert b.mix == [] and [i.name for i in a.mix] == ["style", "detail"]

    reference = Engine("cpu")  # a pristine base that has never seen an adapter
    with reference.mixed("tiny", {}) as (pipe, _):
        base_image = np.asarray(h.generate(pipe, settings())[0].convert("RGB"), dtype=np.int16)

    b_first = pixels(h.run_generate(ctx, b.base, b.strengths(), settings())[0])
    a_image = pixels(h.run_generate(ctx, a.base, a.strengths(), settings())[0])
    b_after = pixels(h.run_generate(ctx, b.base, b.strengths(), settings())[0])
    assert np.abs(b_first - base_image).max() <= 1
    assert np.abs(b_after - base_image).max() <= 1
    assert np.abs(a_image - base_image).max() > 8  # A's mix really changes the picture

    a.mix[0].enabled = False
    a.mix[1].strength = 0.0
    a_off = pixels(h.run_generate(ctx, a.base, a.strengths(), settings())[0])
    assert np.abs(a_off - base_image).max() <= 1


def test_generated_png_carries_its_recipe(ctx):
    s = h.make_settings("a blue star", "blurry", STEPS, 5.0, 11, 0, 0, "ddim", 2)
    files = h.run_generate(ctx, "tiny", {"style": 0.8, "detail": 0.35}, s)
    assert len(files) == 2 and all(f.parent == ctx.outputs / "images" for f in files)
    record = json.loads(Image.open(files[1]).text["sdlora"])
    assert record["prompt"] == "a blue star" and record["negative_prompt"] == "blurry"
    assert record["seed"] == 12 and record["scheduler"] == "ddim"
    assert record["adapters"] == {"style": 0.8, "detail": 0.35}
    assert "<lora:style:0.8> <lora:detail:0.35>" in Image.open(files[0]).text["parameters"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt=""), "prompt"),
        (dict(prompt="x", scheduler="magic"), "scheduler"),
        (dict(prompt="x", num_images=99), "num_images must be from 1 to 64"),
        (dict(prompt="x", width=99999), "width"),
        (dict(prompt="x", steps=0), "steps"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(SdloraError, match=message):
        h.make_settings(**kwargs)


def test_seed_text_of_any_length_is_exact_or_refused_and_negative_is_random():
    """Issue 32: the seed box holds text, so a 25-digit seed is refused in one line (not an
    overflow), a 20-digit one is kept exactly, and -7 (as in A1111) draws a random seed."""
    for text, message in [
        ("1234567890123456789012345", r"from 0 to 2\*\*64 - 1 \(got 1234567890123456789012345\)"),
        ("2e30", "from 0 to"),
        ("1.5", "whole number"),
        ("lots", "must be a number"),
    ]:
        with pytest.raises(SdloraError, match=message) as refused:
            h.make_settings("x", seed=text)
        assert refused.value.setting == "seed"
    assert h.make_settings("x", seed=" 18446744073709551614 ").seed == 2**64 - 2
    for text in ["-7", "-1", "", None, -3]:
        assert 0 <= h.make_settings("x", seed=text).seed < 2**31
    assert h.valid_form_value("seed", "-7") and h.valid_form_value("seed", "42")
    assert not h.valid_form_value("seed", "1234567890123456789012345")
    assert not h.valid_form_value("steps", 1e30) and not h.valid_form_value("width", 7.5)


def test_number_boxes_pass_numbers_beyond_64_bits_on_as_floats():
    """Gradio's JSON refuses ints beyond 64 bits: the event stream died when one was sent back."""
    import orjson

    from sdlora.ui.controls import SettingNumber, SettingSlider

    number = SettingNumber(precision=0, minimum=0, maximum=10)
    slider = SettingSlider(1, 150, step=1)
    for control in (number, slider):
        for typed in (2e30, -2e30, 1e24):
            value = control.preprocess(typed)
            assert value == typed and orjson.dumps(value)
    assert number.preprocess(7.0) == 7 and isinstance(number.preprocess(7.0), int)
    with pytest.raises(SdloraError, match="steps must be from 1 to 1000"):
        h.make_settings("x", steps=slider.preprocess(2e30))


def test_adapters_are_found_in_runs_and_more_folders_and_stay_inside_them(folders, tmp_path):
    """Issue 32: `runs/*/` and extra --adapters folders are listed under their folder's name;
    checkpoints deeper in a run, names leaving a folder and links out are not."""
    runs, more, outside = tmp_path / "runs", tmp_path / "loras", tmp_path / "outside"
    for folder in (runs / "style", runs / "style" / "checkpoints" / "step-5", more, outside):
        folder.mkdir(parents=True)
    src = folders["adapters"] / "style.safetensors"
    for path in (runs / "style" / "style.safetensors", more / "pastel.safetensors"):
        shutil.copy(src, path)
    shutil.copy(src, runs / "style" / "checkpoints" / "step-5" / "style.safetensors")
    shutil.copy(src, outside / "secret.safetensors")
    (runs / "style" / "link.safetensors").symlink_to(outside / "secret.safetensors")
    ctx = h.Context(
        "tiny",
        tmp_path / "adapters",
        tmp_path / "d",
        tmp_path / "o",
        more_adapters=[more],
        runs=runs,
    )
    assert "No adapters yet" in h.adapters_hint(ctx, [])
    assert h.list_adapters(ctx) == ["loras/pastel", "runs/style/style"]
    assert h.adapters_hint(ctx, h.list_adapters(ctx)) is None
    assert (
        h.adapter_path(ctx, "runs/style/style") == (runs / "style" / "style.safetensors").resolve()
    )
    assert h.adapter_path(ctx, "loras/pastel.safetensors").parent == more.resolve()
    for name, message in [
        ("runs/style/link", "outside its folder"),
        ("runs/../outside/secret", "not allowed"),
        ("runs/style/checkpoints/step-5/style", "no such file"),
        ("loras/../outside/secret", "not allowed"),
        ("runs/nothere/x", "no such file"),
    ]:
        with pytest.raises(SdloraError, match=message):
            h.adapter_path(ctx, name)
    session = Session(base="tiny")
    h.add_adapter(ctx, session, "runs/style/style")
    assert session.names() == ["runs/style/style"]


def test_bad_strengths_and_unknown_adapters_are_refused(ctx):
    for mix, message in [
        ({"style": float("nan")}, "finite"),
        ({"style": "lots"}, "number"),
        ({"nothere": 1.0}, "no such file"),
    ]:
        with pytest.raises(SdloraError, match=message):
            h.run_generate(ctx, "tiny", mix, settings())
    with pytest.raises(SdloraError):
        h.parse_strengths("0, half, 1")
    assert h.parse_strengths("0, 0.5;1") == [0.0, 0.5, 1.0]


def test_compare_makes_one_labelled_grid(ctx):
    sweep = Image.open(
        h.run_compare(ctx, "tiny", {"detail": 0.5}, settings(), "style", [0, 0.5, 1])
    )
    path = h.run_compare(
        ctx, "tiny", {"style": 1.0}, settings(), "style", [0, 0.5, 1], "detail", [0, 1]
    )
    grid = Image.open(path)
    assert path.parent == ctx.outputs / "compare"
    assert sweep.width > 3 * 64 and 64 < sweep.height < 2 * 64  # 3 columns, 1 row, labels
    assert grid.width > 3 * 64 and grid.height > 2 * 64  # 3 columns, 2 rows, plus labels
    assert json.loads(sweep.text["sdlora"])["adapters"] == {"detail": 0.5}
    with pytest.raises(SdloraError, match="different"):
        h.run_compare(ctx, "tiny", {}, settings(), "style", [0, 1], "style", [0, 1])


# ---------------------------------------------------------------- export


def test_merged_lora_export_equals_the_live_blend(ctx, inputs):
    out = ex.run_export(ctx, "tiny", {"style": 0.7, "detail": 0.4}, "lora", name="merged")
    assert out == ctx.outputs / "exports" / "merged.safetensors"

    live = load_base("tiny")
    mixer = Mixer(live)
    mixer.add(ctx.adapters / "style.safetensors", strength=0.7)
    mixer.add(ctx.adapters / "detail.safetensors", strength=0.4)
    merged = load_base("tiny")
    Mixer(merged).add(out, strength=1.0)
    torch.testing.assert_close(
        run_unet(merged, inputs), run_unet(live, inputs), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        run_text(merged, inputs), run_text(live, inputs), atol=1e-5, rtol=1e-5
    )
    with pytest.raises(SdloraError, match="already exists"):
        ex.run_export(ctx, "tiny", {"style": 0.7}, "lora", name="merged")


def test_checkpoint_exports_land_in_outputs(ctx):
    single = ex.run_export(ctx, "tiny", {"style": 0.5}, "single-file", "fp32", "mix-single")
    folder = ex.run_export(ctx, "tiny", {"style": 0.5}, "diffusers", "fp16", "mix-folder")
    assert single == ctx.outputs / "exports" / "mix-single.safetensors" and single.is_file()
    assert (folder / "model_index.json").is_file()
    with safe_open(single, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    with safe_open(folder / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert "exports/mix-folder" in h.base_choices(ctx)  # an exported folder can be the base
    assert h.resolve_base(ctx, "exports/mix-folder") == str(folder)
    with pytest.raises(SdloraError, match="format"):
        ex.run_export(ctx, "tiny", {}, "zip", name="x")


def test_inspect_reports_the_file_and_coverage(ctx):
    text = h.inspect_adapter(ctx, "detail")
    assert "detail.safetensors" in text and "rank:          2" in text
    assert "coverage" in text and str(ctx.adapters) not in text


# ---------------------------------------------------------------- command


def test_ui_command_is_local_and_private_by_default():
    from sdlora.cli import build_parser

    args = build_parser().parse_args(["ui"])
    assert (args.host, args.port, args.share, args.base) == ("127.0.0.1", 7860, False, "toy")
    args = build_parser().parse_args(["ui", "--host", "0.0.0.0", "--share", "--outputs", "o"])
    assert (args.host, args.share, args.outputs) == ("0.0.0.0", True, "o")


# ---------------------------------------------------------------- the page's rules (issue 14)


def test_strengths_outside_0_1_are_refused_alike_in_mix_and_compare():
    from sdlora.ui.common import sync_mix
    from sdlora.ui.state import MAX_ADAPTERS

    session = Session("tiny")
    session.add("style", 0.4)
    pad = [0.0] * (MAX_ADAPTERS - 1)
    for bad in (1.5, -0.1, 3.0):
        with pytest.raises(SdloraError, match="from 0 to 1"):
            sync_mix(session, "tiny", (True, *[False] * (MAX_ADAPTERS - 1), bad, *pad))
        with pytest.raises(SdloraError, match="from 0 to 1"):
            h.parse_strengths(f"0, {bad}", "X strengths")
    assert session.mix[0].strength == 0.4  # a refused value changes nothing
    sync_mix(session, "tiny", (True, *[False] * (MAX_ADAPTERS - 1), 1.0, *pad))
    assert session.mix[0].strength == 1.0 and h.parse_strengths("0, 1") == [0.0, 1.0]


def test_lora_tags_in_the_prompt_join_the_mix(ctx):
    from sdlora.lora.prompt_tags import split_lora_tags

    clean, strengths, blocks = split_lora_tags(
        "a cat <lora:style:0.7>, sitting <LORA:sub/detail> <lora:x.safetensors:1:lbw=IN=0>"
    )
    assert clean == "a cat, sitting"
    assert strengths == {"style": 0.7, "sub/detail": 1.0, "x": 1.0} and blocks == {"x": "IN=0"}
    for bad in ("<lora:style:lots>", "<lora:style:nan>"):
        with pytest.raises(SdloraError, match="lora:style"):
            split_lora_tags(bad)

    session = Session("tiny")
    session.add("detail", 0.2)
    prompt, names = h.add_from_prompt(ctx, session, "a red circle <lora:style:0.5> <lora:detail>")
    assert prompt == "a red circle" and names == ["style", "detail"]
    assert [(i.name, i.strength) for i in session.mix] == [("detail", 1.0), ("style", 0.5)]
    # issue 32: a shared prompt's weight outside the sliders' range is clamped with a note
    session, notes = Session("tiny"), []
    h.add_from_prompt(ctx, session, "x <lora:style:1.5> <lora:detail:-0.5>", notes)
    assert [(i.name, i.strength) for i in session.mix] == [("style", 1.0), ("detail", 0.0)]
    assert "<lora:style:1.5> clamped to 1" in notes[0] and "Extended range" in notes[0]
    assert "<lora:detail:-0.5> clamped to 0" in notes[1]


def test_extended_range_takes_weights_from_minus_1_to_2(ctx):
    from sdlora.ui.common import sync_mix
    from sdlora.ui.state import MAX_ADAPTERS

    session, notes = Session("tiny", extended=True), []
    h.add_from_prompt(ctx, session, "x <lora:style:1.2> <lora:detail:-3>", notes)
    assert [(i.name, i.strength) for i in session.mix] == [("style", 1.2), ("detail", -1.0)]
    assert len(notes) == 1 and "clamped to -1" in notes[0]
    pad = [0.0] * (MAX_ADAPTERS - 2)
    sync_mix(session, "tiny", (True, True, *[False] * (MAX_ADAPTERS - 2), 2.0, -0.5, *pad))
    assert session.strengths() == {"style": 2.0, "detail": -0.5}
    with pytest.raises(SdloraError, match="from -1 to 2"):
        sync_mix(session, "tiny", (True, True, *[False] * (MAX_ADAPTERS - 2), 2.5, 0, *pad))
    assert h.parse_strengths("-1, 2", "X", *session.strength_range) == [-1.0, 2.0]
    kept = Session("tiny")  # a stored mix read back with the range off keeps what fits 0-1
    kept.set_mix(session.mix_record() + [{"name": "inside", "strength": 0.5}])
    assert kept.strengths() == {"inside": 0.5}
    kept.extended = True
    kept.set_mix(session.mix_record())
    assert kept.strengths() == {"style": 2.0, "detail": -0.5}
    with pytest.raises(SdloraError, match="no such file"):
        h.add_from_prompt(ctx, Session("tiny"), "x <lora:nothere:0.5>")


def test_parameters_text_reads_back_what_png_info_wrote():
    from sdlora.bases.generate import GenerateSettings, png_info
    from sdlora.lora.prompt_tags import parse_parameters

    s = GenerateSettings(
        "a cat, red",
        "blurry",
        steps=7,
        guidance=3.5,
        seed=40,
        scheduler="euler",
        num_images=2,
        adapters={"style": 0.8, "detail": 0.25},
        blocks={"detail": "IN=0,OUT=0.5"},
    )
    text = next(chunk[1] for chunk in png_info(s, 1).chunks if chunk[1].startswith(b"parameters"))
    parsed = parse_parameters(text.split(b"\0", 1)[1].decode())
    assert parsed == {
        "prompt": "a cat, red",
        "negative_prompt": "blurry",
        "adapters": {"style": 0.8, "detail": 0.25},
        "blocks": {"detail": "IN=0,OUT=0.5"},
        "steps": 7,
        "scheduler": "euler",
        "guidance": 3.5,
        "seed": 41,
    }
    with pytest.raises(SdloraError, match="settings line"):
        parse_parameters("just a prompt")


def test_block_panel_at_s_everywhere_equals_whole_strength_s(ctx):
    """All blocks at s == the whole adapter at s, bit for bit; a block at 0 is the base's."""
    assert h.blocks_spec(1, 1, 1, 1) == "" and h.blocks_spec(1, 0, 1, 0.5) == "IN=0,OUT=0.5"
    assert h.blocks_spec(0.5, 0.5, 0.5, 0.5) == "BASE=0.5,IN=0.5,MID=0.5,OUT=0.5"
    assert h.blocks_spec(1, 0, 1, 1, " IN04=0 ") == "IN04=0"

    def weights(strength: float, blocks: dict | None) -> dict[str, torch.Tensor]:
        path = paths.adapter_file(ctx.adapters, "style")
        with ctx.engine.mixed("tiny", {"style": (path, strength)}, blocks) as (pipe, _):
            return {
                f"{c}.{k}": v.clone()
                for c in ("unet", "text_encoder")
                for k, v in getattr(pipe, c).state_dict().items()
                if ".adapters." not in k
            }

    s = 0.35
    whole = weights(s, None)
    spec = h.blocks_spec(s, s, s, s)
    assert all(torch.equal(whole[k], v) for k, v in weights(1.0, {"style": spec}).items())
    base = weights(0.0, None)
    in_off = weights(1.0, {"style": "IN=0"})
    down = [k for k in base if k.startswith("unet.down_blocks") and "to_q" in k]
    up = [k for k in base if k.startswith("unet.up_blocks") and "to_q" in k]
    assert down and up
    assert all(torch.equal(in_off[k], base[k]) for k in down)
    assert not all(torch.equal(in_off[k], base[k]) for k in up)

    session = Session("tiny")
    session.add("style")
    assert h.set_blocks(session, 0, spec) == spec and session.blocks() == {"style": spec}
    for bad, message in (("IN=2", "from 0 to 1"), ("LEFT=1", "unknown block")):
        with pytest.raises(SdloraError, match=message):
            h.set_blocks(session, 0, bad)
    assert session.mix[0].blocks == spec


def test_history_recipe_redraws_the_image_exactly(ctx):
    from sdlora.ui import history

    first = h.run_generate(
        ctx,
        "tiny",
        {"style": 0.6, "detail": 0.3},
        h.make_settings("a green ring", steps=STEPS, seed=-1),
        blocks={"detail": "OUT=0.5"},
    )[0]
    recipe = history.read_recipe(ctx.outputs, first.name)
    assert recipe["adapters"] == {"style": 0.6, "detail": 0.3}
    assert recipe["blocks"] == {"detail": "OUT=0.5"} and recipe["seed"] >= 0  # -1 drew one
    again = h.run_generate(
        ctx,
        "tiny",
        recipe["adapters"],
        h.make_settings(
            recipe["prompt"],
            recipe["negative_prompt"],
            recipe["steps"],
            recipe["guidance"],
            recipe["seed"],
            0,
            0,
            recipe["scheduler"],
        ),
        blocks=recipe["blocks"],
    )[0]
    assert np.array_equal(pixels(again), pixels(first))
    assert first in history.list_images(ctx.outputs)
    with pytest.raises(SdloraError, match="outside|not allowed"):
        history.read_recipe(ctx.outputs, "../../secret.png")

    name = history.save_mix(
        ctx.outputs,
        "favourite",
        "tiny",
        Session("tiny", []).mix_record()
        or [{"name": "style", "strength": 0.6, "enabled": True, "blocks": ""}],
    )
    assert history.list_mixes(ctx.outputs) == ["favourite"] and name == "favourite"
    base, record = history.load_mix(ctx.outputs, "favourite")
    restored = Session("tiny")
    restored.set_mix(record + [{"name": "bad", "strength": 7}, "junk"])
    assert base == "tiny" and [(i.name, i.strength) for i in restored.mix] == [("style", 0.6)]
    with pytest.raises(SdloraError, match="mix name"):
        history.save_mix(ctx.outputs, "../x", "tiny", record)


def test_interrupt_stops_a_generation_and_saves_nothing(ctx):
    before = set((ctx.outputs / "images").glob("*.png"))
    with pytest.raises(h.Interrupted, match="interrupted at step 1"):
        h.run_generate(ctx, "tiny", {}, settings(), interrupted=lambda: True)
    with pytest.raises(h.Interrupted, match="no grid saved"):
        h.run_compare(ctx, "tiny", {}, settings(), "style", [0, 1], interrupted=lambda: True)
    assert set((ctx.outputs / "images").glob("*.png")) == before


def test_export_asks_before_writing_the_base_alone_and_speaks_ui_words(ctx):
    with pytest.raises(ex.BaseAlone, match="full copy of the base"):
        ex.run_export(ctx, "tiny", {"style": 0.0}, "single-file", name="alone", base_alone_ok=False)
    assert not list((ctx.outputs / "exports").glob("alone*"))
    plan = ex.export_plan(ctx, "tiny", {}, "single-file", "fp16")
    assert "the base alone" in plan and "MiB" in plan  # the base is loaded: size is known
    plan = ex.export_plan(ctx, "tiny", {"detail": 0.5}, "lora", "fp16", {"detail": "IN=0"})
    assert "detail 0.5 [IN=0]" in plan and "KiB" in plan
    folder = ex.run_export(ctx, "tiny", {"detail": 0.5}, "diffusers", name="zipped")
    from sdlora.ui.exporting import zip_folder

    archive = zip_folder(folder, lambda *_: None)
    import zipfile

    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
    assert "zipped/model_index.json" in names and "zipped/unet/config.json" in names
    with pytest.raises(SdloraError, match="tick Overwrite") as err:
        ex.run_export(ctx, "tiny", {"detail": 0.5}, "diffusers", name="zipped")
    assert "--" not in str(err.value)


def test_messages_in_ui_words(ctx, tmp_path):
    """Errors about a setting name it by its label, not a flag; an upload's message names the
    file, not where the server keeps it; messages are text, never markup."""
    from sdlora.ui.common import failed, message

    err = SdloraError("must be from 0 to 100", setting="guidance")
    assert message(err) == "Guidance must be from 0 to 100" and "--" not in failed(err)
    assert "&lt;b&gt;" in failed("<b>")  # messages are text, never markup
    assert "<b>x</b>" in failed("**x** and a lone **")
    held = ctx.cache / "0a1b2c3d" / "x.safetensors"  # where Gradio keeps an upload
    held.parent.mkdir(parents=True)
    held.write_bytes(b"not a safetensors file")
    with pytest.raises(SdloraError) as refused:
        h.upload_adapter(ctx, held)
    assert str(refused.value).startswith("x.safetensors: ") and str(ctx.cache) not in str(
        refused.value
    )
    assert not held.exists()  # a refused upload does not stay in the cache


def test_a_file_for_another_base_says_which(ctx, folders):
    from safetensors.torch import save_file

    foreign = folders["adapters"] / "for-toy.safetensors"
    make_adapter_file(lambda: load_base("toy"), foreign, text_encoder=False)
    with safe_open(foreign, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata() | {"sdlora_base_model": "toy"}
    save_file(tensors, foreign, metadata)
    try:
        with pytest.raises(
            SdloraError, match="trained for base toy, not tiny; switch Base model to toy"
        ):
            h.add_adapter(ctx, Session("tiny"), "for-toy")
    finally:
        foreign.unlink()


def test_export_distills_nonlinear_adapters_to_plain_loras(ctx, folders):
    make_adapter_file(
        lambda: load_base("tiny"),
        folders["adapters"] / "bent.safetensors",
        nonlinearity="relu",
        seed=5,
        text_encoder=False,
    )
    with pytest.raises(SdloraError, match="nonlinear"):
        ex.run_export(ctx, "tiny", {"bent": 0.5}, "lora", name="bent-plain")
    notes: list[str] = []
    out = ex.run_export(
        ctx,
        "tiny",
        {"bent": 0.5, "style": 0.3},
        "lora",
        name="bent-merged",
        distill_rank=2,
        prompts=["a red circle"],
        notes=notes,
    )
    distilled = folders["adapters"] / "bent.distilled-r2.safetensors"
    assert out.is_file() and distilled.is_file()
    assert notes and "relative error" in notes[0]
    from sdlora.io.formats import load_adapter

    assert load_adapter(distilled).is_linear and load_adapter(out).is_linear
    assert set(load_adapter(distilled).ranks()) == {2}
    assert json.loads(load_adapter(out).metadata["sdlora_merged_from"]) == {
        "bent.distilled-r2": 0.5,
        "style": 0.3,
    }


def test_merged_lora_export_keeps_conv_shapes_and_new_words(ctx, folders, inputs):
    """The UI's "one merged LoRA" is the library's merge: LoCon conv factors (kernel-shaped in
    one file, flattened in another) and a pivotal-tuning word come through, and the file
    equals the live blend."""
    from dataclasses import replace

    from sdlora.io.files import save_adapter
    from sdlora.io.formats import load_adapter
    from sdlora.lora.adapter import ModuleFactors

    made = [folders["adapters"] / f"{n}.safetensors" for n in ("conv", "flatword")]
    path, _ = make_adapter_file(
        lambda: load_base("tiny"), made[0], targets="locon", text_encoder=False, seed=4
    )
    conv = load_adapter(path)
    kernels = [k for k, m in conv.modules.items() if m.down.dim() == 4 and m.down.shape[2] == 3]
    assert kernels  # 3×3 convolutions
    word = torch.randn(2, 32, generator=torch.Generator().manual_seed(5)) * 0.2
    flat = replace(
        conv,
        modules={  # the same modules as (r, in·kh·kw) and (out, r) matrices, as some tools save
            k: ModuleFactors(m.down.flatten(1) * 0.5, m.up.flatten(1), m.alpha)
            for k, m in conv.modules.items()
        },
        embeddings={"ohwx": {"text_encoder": word}},
    )
    save_adapter(flat, made[1])
    mix = {"conv": 0.7, "flatword": 0.4, "style": 0.5}
    try:
        out = ex.run_export(ctx, "tiny", mix, "lora", name="conv-words")
        merged = load_adapter(out)
        assert merged.embeddings.keys() == {"ohwx"}
        assert torch.equal(merged.embeddings["ohwx"]["text_encoder"], word)
        for key in kernels:
            assert merged.modules[key].down.shape[2:] == (3, 3) and merged.modules[key].rank == 8
        live = load_base("tiny")
        mixer = Mixer(live)
        for name, strength in mix.items():
            mixer.add(folders["adapters"] / f"{name}.safetensors", strength=strength)
        ours = load_base("tiny")
        Mixer(ours).add(out)
        assert (run_unet(live, inputs) - run_unet(load_base("tiny"), inputs)).abs().max() > 1e-3
        torch.testing.assert_close(
            run_unet(ours, inputs), run_unet(live, inputs), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            run_text(ours, inputs), run_text(live, inputs), atol=1e-5, rtol=1e-5
        )
    finally:
        for path in made:
            path.unlink()


def test_a_very_long_adapter_name_is_one_short_line(ctx):
    """Issue 29: a 10,000-character `<lora:…>` name gave a raw OSError (file name too long)."""
    long = "a" * 10_000
    for attempt in (
        lambda: h.add_from_prompt(ctx, Session("tiny"), f"x <lora:{long}:0.5>"),
        lambda: h.mix_files(ctx, {long: 1.0}),
        lambda: h.mix_files(ctx, {"a/" * 3000 + "b": 1.0}),
        lambda: h.adapter_info(ctx, long),
    ):
        with pytest.raises(SdloraError) as refused:
            attempt()
        text = str(refused.value)
        assert "too long" in text and " characters): " in text  # the name cut short
        assert "\n" not in text and len(text) < 300, text


def test_gradio_cache_is_the_uis_own_folder_emptied_at_start(tmp_path):
    """Issue 29: uploads stayed in the system's temp folder with no limit; now they go to a
    hidden folder of the outputs, emptied when the app starts and aged out while it runs."""
    from sdlora.ui.app import CACHE_LIMITS, build_app

    outputs = tmp_path / "outputs"
    stale = outputs / ".cache" / "0a1b" / "old.safetensors"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by an earlier run")
    before = os.environ.get("GRADIO_TEMP_DIR")
    try:
        app = build_app("tiny", tmp_path / "adapters", tmp_path / "datasets", outputs, device="cpu")
        cache = outputs.resolve() / ".cache"
        assert os.environ["GRADIO_TEMP_DIR"] == str(cache) == app.GRADIO_CACHE
        assert app.delete_cache == CACHE_LIMITS and cache.is_dir() and not any(cache.iterdir())
        uploads = [b for b in app.blocks.values() if isinstance(getattr(b, "GRADIO_CACHE", 0), str)]
        assert uploads and all(b.GRADIO_CACHE == str(cache) for b in uploads)
    finally:
        if before is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = before


def test_the_ui_process_keeps_its_temporary_files_in_its_outputs(tmp_path):
    """`sdlora ui` sends this process's and its training runs' temporary files into the outputs
    folder (the README: it writes only inside its three folders); torch's compile cache stays."""
    import subprocess
    import sys

    folder = tmp_path / "outputs" / ".cache" / "tmp"
    code = (
        "import os, tempfile; from pathlib import Path; "
        "from sdlora.ui.app import keep_temporary_files_in as k; "
        f"k(Path({str(folder)!r})); "
        "print(tempfile.gettempdir()); print(os.environ['TMPDIR']); "
        "print(os.environ['TORCHINDUCTOR_CACHE_DIR'])"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TMPDIR", "TORCHINDUCTOR_CACHE_DIR")}
    lines = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    assert lines[:2] == [str(folder), str(folder)] and folder.is_dir()
    assert not lines[2].startswith(str(tmp_path))


def test_lora_cards_show_family_words_and_dim_another_familys_adapter(ctx, folders, tmp_path):
    """Issue 32: a card per adapter with its family; one made for another base is dimmed with
    the reason (once the base is loaded); the search matches name, family and words."""
    from sdlora.ui.cards import cards_html

    other = folders["adapters"] / "other-family.safetensors"
    make_adapter_file(lambda: load_base("tiny-v2"), other, seed=6)
    try:
        h.add_adapter(ctx, Session("tiny"), "style")  # loads the tiny base
        page = cards_html(ctx, "tiny", ["style"])
        assert 'data-name="style"' in page and "in the mix" in page
        assert 'class="sd-card sd-off" data-name="other-family"' in page
        assert "made for SD 2.x" in page and "the base is SD 1.x (tiny" in page
        assert 'data-name="style"' not in cards_html(ctx, "tiny", [], "sd 2.x")
        assert "No adapter matches" in cards_html(ctx, "tiny", [], "zzz")
    finally:
        other.unlink()


def test_interrupt_keeps_the_partial_image_outside_history(ctx):
    """Issue 32: Interrupt shows the image as far as it got (kept in partial/, not History)."""
    before = set((ctx.outputs / "images").glob("*.png"))
    asked = []

    def after_two_steps() -> bool:
        asked.append(1)
        return len(asked) >= 2

    with pytest.raises(h.Interrupted, match="interrupted at step 2 of [67]; the partial") as err:
        h.run_generate(
            ctx, "tiny", {}, h.make_settings("x", steps=6, seed=3), interrupted=after_two_steps
        )
    assert len(err.value.partial) == 1 and err.value.partial[0].parent == ctx.outputs / "partial"
    partial = pixels(err.value.partial[0])
    full = h.run_generate(ctx, "tiny", {}, h.make_settings("x", steps=6, seed=3))
    assert partial.shape == pixels(full[0]).shape and not np.array_equal(partial, pixels(full[0]))
    assert set((ctx.outputs / "images").glob("*.png")) == before | set(full)
    assert ctx.engine.pipe._interrupt is False  # the next generation runs all its steps


def test_a_base_switch_checks_the_mix_at_once_in_ui_words(ctx, folders):
    """Issue 32: switching the base names each adapter that does not fit, with both families."""
    session = Session("tiny")
    h.add_adapter(ctx, session, "style")
    assert h.check_mix_for_base(ctx, session, "tiny") == []
    lines = h.check_mix_for_base(ctx, session, "tiny-v2")
    assert lines == [
        "style is made for SD 1.x (tiny, sdlora built-in); the base tiny-v2 is SD 2.x (tiny-v2, "
        "sdlora built-in)"
    ], lines


def test_a_window_in_the_ui_acts_as_in_the_library_and_the_recipe_keeps_it(ctx):
    """A `<lora:style:0.8:start=0.5>` window reaches generate as a schedule: the page's image is
    the library's with the same schedule, and History's recipe keeps the window."""
    from sdlora.bases.base import load_base
    from sdlora.bases.generate import generate
    from sdlora.lora.blend import Mixer
    from sdlora.ui import history

    windows = {"style": "start=0.5"}
    made = h.run_generate(ctx, "tiny", {"style": 0.8}, settings(seed=4), windows=windows)[0]
    recipe = history.read_recipe(ctx.outputs, made.name)
    assert recipe["schedules"] == windows
    pipe = load_base("tiny")
    mixer = Mixer(pipe)
    mixer.add(ctx.adapters / "style.safetensors", name="style", strength=0.8)
    s = settings(seed=4)
    s.schedules = dict(windows)
    image = generate(pipe, s, mixer=mixer)[0]
    assert np.array_equal(pixels(made), np.asarray(image.convert("RGB"), dtype=np.int16))
    plain = h.run_generate(ctx, "tiny", {"style": 0.8}, settings(seed=4))[0]
    assert not np.array_equal(pixels(made), pixels(plain))  # the window changed the image
