"""What a run writes in --output (train/finish.py planned_outputs), and the rules that keep
files already there: a fresh run refuses any of them, --overwrite replaces them, --resume only
the files of the run it continues. Everything here is decided before a model loads."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from test_train import ModelLoaded, no_model, settings, shapes  # noqa: F401 (fixtures)

from sdlora.errors import SdloraError
from sdlora.train import train


def named(config, total_steps: int, start: int = 0) -> list[str]:
    from sdlora.train.finish import planned_outputs

    out = Path(config.output)
    return [p.relative_to(out).as_posix() for p in planned_outputs(config, total_steps, start)]


def test_the_plan_lists_every_file_a_run_writes(tmp_path):
    from sdlora.train.finish import every_steps

    config = settings(
        tmp_path / "data",
        tmp_path / "out",
        name="style",
        validation_split=0.25,
        keep_best=True,
        new_tokens=["ohwx:2", "zq"],
        sample_every=2,
        save_every=4,
        tensorboard=True,
    )
    assert named(config, 5) == [
        "style.safetensors",
        "style-best.safetensors",
        "embeddings/ohwx.safetensors",
        "embeddings/zq.safetensors",
        "samples/step-000002.png",
        "samples/step-000004.png",
        "samples/step-000005.png",
        "checkpoints/step-000004",
        "checkpoints/step-000005",
        "logs",
    ]
    # resumed at step 4: what is left to write
    assert named(config, 5, start=4)[4:] == [
        "samples/step-000005.png",
        "checkpoints/step-000005",
        "logs",
    ]
    assert every_steps(0, 10) == [] and every_steps(3, 9) == [3, 6, 9]
    assert every_steps(3, 10, start=6) == [9, 10] and every_steps(3, 6, start=6) == []


def test_the_plan_knows_its_steps_without_listing_them(tmp_path):
    """A million-step run that samples every step: asking and checking cost what the folder
    holds (the grids are asked by step number, never listed one by one)."""
    from sdlora.train.finish import planned_outputs
    from sdlora.train.setup import first_taken

    out = tmp_path / "out"
    config = settings(tmp_path / "data", out, steps=10**6, sample_every=1, save_every=500)
    plan = planned_outputs(config, 10**6)
    samples = out / "samples"
    assert samples / "step-999999.png" in plan and samples / "step-1000000.png" in plan
    assert out / "checkpoints" / "step-000500" in plan
    for stranger in ("step-1000001.png", "step-0000002.png", "step-000002.jpg", "step-000000.png"):
        assert samples / stranger not in plan
    assert out / "checkpoints" / "step-000501" not in plan
    samples.mkdir(parents=True)
    for name in ("step-1000000.png", "step-700000.png", "notes.txt", "step-0000003.png"):
        (samples / name).write_bytes(b"x")
    assert [p.name for p in plan.samples.existing()] == ["step-700000.png", "step-1000000.png"]
    (samples / "step-000007.png").write_bytes(b"x")
    assert first_taken(plan) == samples / "step-000007.png"  # the first by step


@pytest.mark.parametrize(
    "words, message",
    [
        (["x/y", "x_y"], r"--new-token 'x/y' and 'x_y' would both be saved as x_y\.safetensors"),
        (["\U0001f431", "\U0001f436"], r"'\U0001f431' and '\U0001f436' would both be saved as "),
        (["Sks", "sks"], r"'Sks' and 'sks' would both be saved as sks\.safetensors"),
    ],
)
def test_two_words_of_one_file_name_are_refused_before_loading(
    shapes,  # noqa: F811
    tmp_path,
    no_model,  # noqa: F811
    words,
    message,
):
    """The second word's file used to replace the first one's in embeddings/."""
    config = settings(shapes, tmp_path / "out", new_tokens=words)
    with pytest.raises(SdloraError, match=message) as err:
        train(config)
    assert "\n" not in str(err.value)
    with pytest.raises(SdloraError, match=message):  # --overwrite cannot make them one file
        train(replace(config, overwrite=True))


@pytest.mark.parametrize(
    "change, existing",
    [
        (dict(keep_best=True, validation_split=0.25), "style-best.safetensors"),
        (dict(new_tokens=["ohwx"]), "embeddings/ohwx.safetensors"),
        (dict(sample_every=2), "samples/step-000002.png"),
        (dict(sample_every=2), "samples/step-000003.png"),  # the last step samples too
        (dict(save_every=2), "checkpoints/step-000002"),  # a folder save() would move away
        (dict(tensorboard=True), "logs/events.out.tfevents.1.old"),
    ],
)
def test_a_fresh_run_refuses_every_file_it_would_replace(
    shapes,  # noqa: F811
    tmp_path,
    no_model,  # noqa: F811
    change,
    existing,
):
    out = tmp_path / "out"
    config = settings(shapes, out, name="style", steps=3, **change)
    path = out / existing
    if existing.startswith("checkpoints/"):
        path.mkdir(parents=True)
        path = path / "notes.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"keep me")
    shown = existing.removesuffix("/events.out.tfevents.1.old")
    with pytest.raises(
        SdloraError, match=rf"already holds {shown}; run the same command with --resume"
    ) as err:
        train(config)
    assert err.value.setting == "output" and str(err.value).startswith(f"output {out} already")
    assert path.read_bytes() == b"keep me"
    with pytest.raises(ModelLoaded):  # --overwrite lets the run replace them
        train(replace(config, overwrite=True))


def test_files_the_run_does_not_write_do_not_stop_it(shapes, tmp_path, no_model):  # noqa: F811
    out = tmp_path / "out"
    for name in ("other.safetensors", "samples/step-000001.png", "embeddings/zq.safetensors"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"x")
    (out / "logs").mkdir()  # empty: TensorBoard adds its own files
    config = settings(
        shapes, out, name="style", steps=4, sample_every=2, new_tokens=["ohwx"], tensorboard=True
    )
    with pytest.raises(ModelLoaded):
        train(config)


def checkpoint_of(out: Path, step: int, adapter_name: str | None, **saved) -> Path:
    """A checkpoint folder as a run leaves it (its info only: the rules read no more)."""
    folder = out / "checkpoints" / f"step-{step:06d}"
    folder.mkdir(parents=True)
    info = {"step": step, "settings": {"steps": 6, "sample_every": 0, "keep_best": False, **saved}}
    if adapter_name:
        info["adapter_name"] = adapter_name
    (folder / "checkpoint.json").write_text(json.dumps(info))
    return folder


def test_resume_replaces_only_its_own_runs_files(shapes, tmp_path, no_model):  # noqa: F811
    out = tmp_path / "out"
    checkpoint_of(out, 2, "style", sample_every=2)
    for name in ("style.safetensors", "samples/step-000004.png", "other.safetensors"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"x")
    config = settings(shapes, out, name="style", steps=6, sample_every=2, resume="latest")
    with pytest.raises(ModelLoaded):  # its adapter and its later samples are its own
        train(config)
    with pytest.raises(SdloraError, match=r"already holds other\.safetensors, which the run "):
        train(replace(config, name="other"))  # another run's adapter
    (out / "samples" / "step-000003.png").write_bytes(b"x")
    with pytest.raises(SdloraError, match=r"holds samples/step-000003\.png, which the run being"):
        train(replace(config, sample_every=3))  # that run never sampled step 3
    assert all(p.read_bytes() == b"x" for p in out.rglob("*.png"))
    (out / "style-best.safetensors").write_bytes(b"x")
    with pytest.raises(SdloraError, match=r"style-best\.safetensors, which the run being resumed"):
        train(replace(config, keep_best=True, validation_split=0.25))


def test_checkpoints_without_a_recorded_name_resume_as_before(shapes, tmp_path, no_model):  # noqa: F811
    out = tmp_path / "out"
    checkpoint_of(out, 2, None)
    (out / "style.safetensors").write_bytes(b"x")
    with pytest.raises(ModelLoaded):
        train(settings(shapes, out, name="style", steps=6, resume="latest"))


def test_overwrite_never_swaps_a_folder_for_a_file(shapes, tmp_path, no_model):  # noqa: F811
    """A folder where a sample grid goes used to fail only when the first grid was written."""
    out = tmp_path / "out"
    (out / "samples" / "step-000002.png").mkdir(parents=True)
    config = settings(shapes, out, steps=2, sample_every=2, overwrite=True)
    with pytest.raises(SdloraError, match=r"samples/step-000002\.png is a folder, where this run"):
        train(config)
    (out / "samples" / "step-000002.png").rmdir()
    (out / "logs").write_text("not a folder")
    with pytest.raises(SdloraError, match=r": logs is a file, where this run writes a folder"):
        train(replace(config, tensorboard=True))


def test_a_file_where_a_folder_of_the_run_goes_is_refused(shapes, tmp_path, no_model):  # noqa: F811
    """embeddings/ or samples/ as a file used to fail only when the run came to write there."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "samples").write_text("a file")
    for overwrite in (False, True):
        with pytest.raises(SdloraError, match=r": samples is a file, where this run writes a fo"):
            train(settings(shapes, out, steps=2, sample_every=1, overwrite=overwrite))
    with pytest.raises(ModelLoaded):  # no samples planned: samples/ is not in the way
        train(settings(shapes, out, steps=2))
