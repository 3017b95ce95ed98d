"""Nothing lost, nothing silently dropped (issue 18): linked folders, odd metadata, long
captions, adapters that share a file name, absurd sizes and blank images."""

from __future__ import annotations

import pytest
import torch

from sdlora.bases.base import load_base
from sdlora.bases.generate import GenerateSettings, generate
from sdlora.cli import main
from sdlora.errors import SdloraError
from sdlora.train.config import TrainConfig


def one_line_error(capsys, args: list[str], message: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdlora: ") and message in err and "\n" not in err, err
    assert "Traceback" not in err


# ---------------------------------------------------------------- upper bounds, blank images

GENERATE = ["generate", "--base", "tiny", "--device", "cpu", "--prompt", "x", "--steps", "1"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-images", "100000"], "--num-images must be from 1 to 64 (got 100000)"),
        (["--num-images", "0"], "--num-images must be from 1 to 64 (got 0)"),
        (["--width", "100000"], "--width must be from 8 to 4096 pixels (got 100000)"),
        (["--height", "8192"], "--height must be from 8 to 4096 pixels (got 8192)"),
    ],
)
def test_generate_refuses_absurd_sizes_before_loading(
    tmp_path, capsys, monkeypatch, extra, message
):
    import sdlora.bases.base

    def refuse(*args, **kwargs):
        raise AssertionError("the base was loaded before the numbers were checked")

    monkeypatch.setattr(sdlora.bases.base, "load_base", refuse)
    out = tmp_path / "o.png"
    one_line_error(capsys, [*GENERATE, "--out", str(out), *extra], message)
    assert not out.exists()


def test_train_refuses_an_absurd_resolution_at_once():
    with pytest.raises(SdloraError, match=r"resolution must be a multiple of 64 from 64 to 2048"):
        TrainConfig(data_dir="x", output="y", resolution=6400000).check()
    TrainConfig(data_dir="x", output="y", resolution=2048).check()


def _break_decoder(pipe, how: str) -> None:
    conv = pipe.vae.decoder.conv_out
    with torch.no_grad():
        if how == "nan":
            pipe.unet.conv_out.weight.fill_(float("nan"))
        else:  # every pixel -1e3 before the clamp to [-1, 1]: all black
            conv.weight.zero_()
            conv.bias.fill_(-1e3)


@pytest.mark.parametrize(
    "how, message",
    [("black", r"seed 5 came out blank \(all pixels 0\)"), ("nan", r"seed 5 came out broken")],
)
def test_a_blank_or_broken_image_is_an_error_not_a_file(
    tmp_path, capsys, monkeypatch, how, message
):
    pipe = load_base("tiny")
    _break_decoder(pipe, how)
    with pytest.raises(
        SdloraError, match=message + r".*check the guidance and the adapter strengths"
    ):
        generate(pipe, GenerateSettings(prompt="x", steps=1, seed=5))
    # the CLI says it in one line and writes nothing
    import sdlora.bases.base

    real = sdlora.bases.base.load_base

    def broken(*args, **kwargs):
        loaded = real(*args, **kwargs)
        _break_decoder(loaded, how)
        return loaded

    monkeypatch.setattr(sdlora.bases.base, "load_base", broken)
    out = tmp_path / "o.png"
    one_line_error(capsys, [*GENERATE, "--seed", "5", "--out", str(out)], "came out")
    assert not out.exists()


def test_ordinary_images_pass_the_blank_check(tmp_path):
    pipe = load_base("tiny")
    images = generate(pipe, GenerateSettings(prompt="x", steps=2, num_images=2))
    assert [im.size for im in images] == [(64, 64)] * 2
    assert all(im.mode == "RGB" for im in images)


# ---------------------------------------------------------------- adapters that share a name


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("a.safetensors", ("a.safetensors", 1.0, None)),
        ("a.safetensors:0.25", ("a.safetensors", 0.25, None)),
        ("a.safetensors@ink", ("a.safetensors", 1.0, "ink")),
        ("a.safetensors:0.5@ink", ("a.safetensors", 0.5, "ink")),
        ("a.safetensors:-1@my.style", ("a.safetensors", -1.0, "my.style")),
        ("dir:x/a.safetensors", ("dir:x/a.safetensors", 1.0, None)),
        (r"C:\loras\a.safetensors", (r"C:\loras\a.safetensors", 1.0, None)),
        (r"C:\loras\a.safetensors:0.7", (r"C:\loras\a.safetensors", 0.7, None)),
        (r"C:\loras\a.safetensors:0.7@a", (r"C:\loras\a.safetensors", 0.7, "a")),
        ("me@home.safetensors", ("me@home.safetensors", 1.0, None)),
        ("me@home.safetensors:0.5", ("me@home.safetensors", 0.5, None)),
        ("me@home.safetensors:0.5@x", ("me@home.safetensors", 0.5, "x")),
        ("a@b/c.safetensors", ("a@b/c.safetensors", 1.0, None)),
        ("a:b@c:d.safetensors", ("a:b@c:d.safetensors", 1.0, None)),
    ],
)
def test_lora_spec_parses_name_after_the_last_at(spec, expected):
    from sdlora.io.lora_spec import LoraSpec, parse_lora, parse_lora_spec

    assert parse_lora_spec(spec) == LoraSpec(*expected)
    assert parse_lora(spec) == expected[:2]


def test_empty_name_after_at_is_an_error():
    from sdlora.io.lora_spec import parse_lora_spec

    with pytest.raises(SdloraError, match=r"--lora a.safetensors:0.5@: give a name after '@'"):
        parse_lora_spec("a.safetensors:0.5@")


def test_adapter_names_are_made_unique_by_folder():
    from sdlora.io.lora_spec import adapter_names, parse_lora_spec

    def names(*specs):
        return adapter_names([parse_lora_spec(s) for s in specs])

    assert names("a/style.safetensors", "b/ink.safetensors") == (["style", "ink"], [])
    got, notes = names("a/style.safetensors", "b/style.safetensors:0.5", "c/ink.safetensors")
    assert got == ["a/style", "b/style", "ink"]
    assert len(notes) == 2 and "'a/style'" in notes[0] and "FILE@NAME" in notes[0]
    assert names("x/a/style.safetensors", "y/a/style.safetensors")[0] == [
        "x/a/style",
        "y/a/style",
    ]
    assert names("a/style.safetensors@one", "b/style.safetensors")[0] == ["one", "style"]
    assert names("a/style.safetensors", "b/x.safetensors@style")[0] == ["a/style", "style"]
    with pytest.raises(SdloraError, match=r"two adapters are given the name 'k'"):
        names("a.safetensors@k", "b.safetensors@k")
    with pytest.raises(SdloraError, match=r"is given twice"):
        names("a/style.safetensors", "a/../a/style.safetensors:0.5")


def test_cli_blends_two_files_of_one_name(tmp_path, capsys):
    import json

    from conftest import make_adapter_file
    from PIL import Image

    for folder, seed in (("a", 0), ("b", 1)):
        (tmp_path / folder).mkdir()
        make_adapter_file(
            lambda: load_base("tiny"), tmp_path / folder / "style.safetensors", seed=seed
        )
    out = tmp_path / "o.png"
    a, b = tmp_path / "a" / "style.safetensors", tmp_path / "b" / "style.safetensors"
    assert main([*GENERATE, "--out", str(out), "--lora", f"{a}:0.5", "--lora", str(b)]) == 0
    err = capsys.readouterr().err
    assert "is loaded as 'a/style'" in err and "is loaded as 'b/style'" in err
    record = json.loads(Image.open(out).text["sdlora"])
    assert record["adapters"] == {"a/style": 0.5, "b/style": 1.0}
    # @NAME picks the names, and nothing is said
    out.unlink()
    assert main([*GENERATE, "--out", str(out), "--lora", f"{a}:0.5@one", "--lora", f"{b}@two"]) == 0
    assert "loaded as" not in capsys.readouterr().err
    assert json.loads(Image.open(out).text["sdlora"])["adapters"] == {"one": 0.5, "two": 1.0}


# ---------------------------------------------------------------- linked folders and files


def _png(path, color=(200, 30, 30)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), color).save(path)
    return path


def _config(data, **kw):
    return TrainConfig(data_dir=str(data), output=str(data.parent / "out"), resolution=64, **kw)


def test_linked_folders_and_files_are_read_once_and_loops_named(tmp_path):
    from sdlora.train.data import discover

    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    _png(data / "a.png")
    for i in range(4):
        _png(elsewhere / "set" / f"{i}.png")
    (elsewhere / "set" / "0.txt").write_text("linked caption")
    (data / "3_linked").symlink_to(elsewhere / "set", target_is_directory=True)
    (elsewhere / "set" / "back").symlink_to(data, target_is_directory=True)  # a loop
    (data / "again").symlink_to(elsewhere / "set", target_is_directory=True)  # a second way in
    (data / "link.png").symlink_to(_png(tmp_path / "single" / "b.png"))
    items, skipped, warnings = discover(_config(data))
    names = sorted(str(item.path.relative_to(data)) for item in items)
    assert names == ["3_linked/0.png", "3_linked/1.png", "3_linked/2.png", "3_linked/3.png"] + [
        "a.png",
        "link.png",
    ]
    by_name = {str(item.path.relative_to(data)): item for item in items}
    assert by_name["3_linked/0.png"].caption == "linked caption"
    assert by_name["3_linked/1.png"].repeats == 3
    assert skipped == []
    assert len(warnings) == 1
    assert warnings[0].startswith("2 linked folder(s) not read again")
    assert "again: leads to" in warnings[0] and "read already as" in warnings[0]


def test_a_link_to_the_data_folder_itself_is_a_loop(tmp_path):
    from sdlora.train.data import discover

    data = tmp_path / "data"
    _png(data / "sub" / "a.png")
    (data / "sub" / "up").symlink_to(data, target_is_directory=True)
    items, _, warnings = discover(_config(data))
    assert [item.path.name for item in items] == ["a.png"]
    assert "which holds it (a loop)" in warnings[0] and str(data / "sub" / "up") in warnings[0]


def test_a_link_to_a_missing_image_is_named_as_skipped(tmp_path):
    from sdlora.train.data import discover

    data = tmp_path / "data"
    _png(data / "a.png")
    (data / "gone.png").symlink_to(tmp_path / "nowhere.png")
    _, skipped, _ = discover(_config(data))
    assert [(p.name, why) for p, why in skipped] == [
        ("gone.png", f"a link to {tmp_path / 'nowhere.png'}, which does not exist")
    ]


def test_training_on_a_linked_folder_uses_all_its_images(tmp_path, caplog, monkeypatch):
    """The reported case: 1 image trained instead of 5."""
    import logging

    from sdlora.train import models as models_module
    from sdlora.train import train

    class Loaded(Exception):
        pass

    def stop(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(models_module, "load_base", stop)
    data = tmp_path / "data"
    _png(data / "a.png")
    for i in range(4):
        _png(tmp_path / "set" / f"{i}.png")
    (data / "set").symlink_to(tmp_path / "set", target_is_directory=True)
    caplog.set_level(logging.INFO, logger="sdlora.train")
    with pytest.raises(Loaded):
        train(_config(data, base="tiny", batch_size=1, steps=1))
    assert "5 images" in caplog.text


# ---------------------------------------------------------------- metadata and long captions


def _metadata(data, *rows):
    import json

    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"file_name": "a.png", "text": 5}, r'metadata\.jsonl:2: "text" is 5, not a string'),
        ({"file_name": "a.png", "text": None}, r'metadata\.jsonl:2: "text" is null, not a string'),
        ({"file_name": "a.png", "caption": ["x"]}, r'"caption" is \["x"\], not a string'),
        (
            {"file_name": "a.png", "prompt": "x"},
            r'metadata\.jsonl:2: no "text" .*file_name, prompt',
        ),
        (
            {"file_name": "../a.png", "text": "x"},
            r"metadata\.jsonl:2: file_name '\.\./a\.png' is outside",
        ),
        (
            {"file_name": "/tmp/a.png", "text": "x"},
            r"file_name '/tmp/a\.png' is outside the data folder",
        ),
        (
            {"file_name": "C:\\a.png", "text": "x"},
            r"is outside the data folder; give the image's path",
        ),
    ],
)
def test_metadata_lines_that_would_be_lost_are_errors(tmp_path, row, message):
    from sdlora.train.data import discover

    data = tmp_path / "data"
    _png(data / "a.png")
    _png(data / "b.png")
    _metadata(data, {"file_name": "b.png", "text": "fine"}, row)
    with pytest.raises(SdloraError, match=message):
        discover(_config(data))


def test_metadata_outside_check_holds_for_a_relative_data_folder(tmp_path, monkeypatch):
    from sdlora.train.data import discover

    _png(tmp_path / "a.png")
    _metadata(tmp_path, {"file_name": "../a.png", "text": "x"})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SdloraError, match=r"file_name '\.\./a\.png' is outside"):
        discover(TrainConfig(data_dir=".", output="out", resolution=64))


def test_metadata_may_name_files_in_subfolders_and_sibling_folders(tmp_path):
    from sdlora.train.data import discover

    data = tmp_path / "data"
    _png(data / "one" / "a.png")
    _png(data / "two" / "b.png")
    _metadata(data, {"file_name": "one/a.png", "text": "first"})
    _metadata(data / "two", {"file_name": "../one/../two/b.png", "text": "second"})
    items, _, warnings = discover(_config(data))
    assert {i.path.name: i.caption for i in items} == {"a.png": "first", "b.png": "second"}
    assert warnings == []


def test_metadata_lines_for_missing_images_are_named_in_a_warning(tmp_path):
    from sdlora.train.data import discover

    data = tmp_path / "data"
    _png(data / "a.png")
    _metadata(
        data,
        {"file_name": "a.png", "text": "ok"},
        {"file_name": "typo.png", "text": "lost"},
        {"file_name": "also.png", "text": "lost"},
    )
    _, _, warnings = discover(_config(data))
    assert warnings == [
        "2 metadata.jsonl line(s) name no image in the data folder, so their captions are unused "
        f"(first: {data / 'metadata.jsonl'}:2: typo.png not found)"
    ]


def test_long_captions_are_counted_and_the_first_named_before_training(
    tmp_path, caplog, monkeypatch
):
    import logging

    from sdlora.train import models as models_module
    from sdlora.train import train

    class Injecting(Exception):
        pass

    def stop(*args, **kwargs):
        raise Injecting

    monkeypatch.setattr(models_module, "add_trainable", stop)  # the step after the warnings
    data = tmp_path / "data"
    for name, words in (("img_001", 5), ("img_004", 110), ("img_007", 200)):
        _png(data / f"{name}.png")
        (data / f"{name}.txt").write_text(" ".join(["red"] * words))
    caplog.set_level(logging.INFO, logger="sdlora.train")
    with pytest.raises(Injecting):
        train(_config(data, base="tiny", batch_size=1, steps=1))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    long = [w for w in warnings if "longer than" in w]
    assert long == [
        "2 caption(s) are longer than the text encoder's 77 tokens and will be cut "
        "(first: img_004.png, 112 tokens); shorten them to keep their end"
    ]
    caplog.clear()
    with pytest.raises(Injecting):  # the trigger word counts too
        train(_config(data, base="tiny", batch_size=1, steps=1, trigger="sks"))
    assert "(first: img_004.png, 114 tokens)" in caplog.text


def test_web_ui_generate_gets_the_blank_image_error(tmp_path, monkeypatch):
    from sdlora.ui import engine as engine_module
    from sdlora.ui import handlers as h

    def broken(*args, **kwargs):
        pipe = load_base("tiny")
        _break_decoder(pipe, "black")
        return pipe

    monkeypatch.setattr(engine_module, "load_base", broken)
    for name in ("adapters", "datasets"):
        (tmp_path / name).mkdir()
    ctx = h.Context(
        "tiny", tmp_path / "adapters", tmp_path / "datasets", tmp_path / "outputs",
        engine_module.Engine("cpu"),
    )  # fmt: skip
    with pytest.raises(SdloraError, match=r"came out blank \(all pixels 0\)"):
        h.run_generate(ctx, "tiny", {}, h.make_settings("x", steps=1, seed=2))
    assert not list((tmp_path / "outputs").rglob("*.png"))
