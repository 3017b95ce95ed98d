"""The maintainers' adversarial script (issue 29): the trainer's output safety and the silent
wrong results, tried as a new user would, through the `sdlora` command in-process.

Every refusal must be exit code 2 and one line on stderr, with no traceback, and every file
that was in the folder before must keep its bytes. The runs that do train use the tiny base:
three 64 px images, 1-2 steps, no compile, no TensorBoard.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_adapter_file
from PIL import Image
from safetensors import safe_open

from sdlora.bases.base import load_base
from sdlora.cli import main
from sdlora.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

ZEROS17, ZEROS12 = ",".join(["0"] * 17), ",".join(["0"] * 12)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Three 64 px images with captions, shared by every case."""
    folder = tmp_path_factory.mktemp("data")
    for i, color in enumerate([(200, 40, 40), (40, 160, 60), (40, 60, 200)]):
        Image.new("RGB", (64, 64), color).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a plain picture {i}", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """An SD 1.x adapter (tiny) and an SDXL one (tiny-xl), UNet only."""
    folder = tmp_path_factory.mktemp("adapters")
    sd, _ = make_adapter_file(lambda: load_base("tiny"), folder / "sd.safetensors")
    xl, _ = make_adapter_file(
        lambda: load_base("tiny-xl"), folder / "xl.safetensors", text_encoder=False
    )
    return {"sd": sd, "xl": xl}


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        str(data),
        "--output",
        str(out),
        "--base",
        "tiny",
        "--resolution",
        "64",
        "--steps",
        "2",
        "--save-every",
        "0",
        "--workers",
        "0",
        "--compile",
        "off",
        "--no-tensorboard",
        "--name",
        "data",
        *extra,
    ]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def refused(capsys, args: list[str], message: str) -> str:
    """Run the command: exit 2, one line on stderr holding `message`, no traceback."""
    assert main(args) == 2, args
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdlora: "), err
    assert message in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- data loss


@pytest.mark.parametrize(
    "existing, extra",
    [
        ("data.safetensors", []),
        ("data-best.safetensors", ["--keep-best", "--validation-split", "0.34"]),
        ("embeddings/ohwx.safetensors", ["--new-token", "ohwx"]),
        ("samples/step-000002.png", ["--sample-every", "1", "--sample-steps", "1"]),
        ("samples/step-000001.png", ["--sample-every", "1", "--sample-steps", "1"]),
    ],
)
def test_a_file_in_the_output_is_never_replaced_without_overwrite(
    data, tmp_path, capsys, existing, extra
):
    out = tmp_path / "out"
    (out / existing).parent.mkdir(parents=True)
    (out / existing).write_bytes(b"the user's own file")
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    refused(capsys, train_args(data, out, *extra), f"--output {out} already holds {existing}; ")
    assert snapshot(out) == before


@pytest.mark.parametrize(
    "words",
    [["x/y", "x_y"], ["\U0001f431", "\U0001f436"]],  # two emoji words: both token.safetensors
)
def test_two_words_of_one_file_name_are_refused(data, tmp_path, capsys, words):
    args = train_args(data, tmp_path / "out")
    for word in words:
        args += ["--new-token", word]
    refused(capsys, args, f"--new-token {words[0]!r} and {words[1]!r} would both be saved as")
    assert not (tmp_path / "out").exists()


def test_a_run_writes_only_its_planned_files_and_a_rerun_keeps_them(data, tmp_path, capsys):
    """The plan is the whole truth: a real run writes nothing outside it; the same command
    again is refused with every byte kept; --resume continues it, replacing its own files."""
    from sdlora.train.finish import planned_outputs

    out = tmp_path / "out"
    extra = ["--new-token", "ohwx", "--keep-best", "--validation-split", "0.34"]
    extra += ["--sample-every", "1", "--sample-steps", "1", "--save-every", "1"]
    args = train_args(data, out, *extra)
    assert main(args) == 0
    capsys.readouterr()
    config = TrainConfig(
        name="data",
        data_dir=str(data),
        output=str(out),
        steps=2,
        new_tokens=["ohwx"],
        keep_best=True,
        validation_split=0.34,
        sample_every=1,
        save_every=1,
        tensorboard=False,
    )
    planned = planned_outputs(config, 2)
    written = snapshot(out)
    assert all(p.exists() for p in planned), [p for p in planned if not p.exists()]
    outside = [f for f in written if not any((out / f).is_relative_to(p) for p in planned)]
    assert outside == []
    refused(
        capsys,
        args,
        f"--output {out} already holds data.safetensors; run the same command with --resume",
    )
    assert snapshot(out) == written
    # another run's adapter in the folder: a resume under that name may not replace it
    (out / "other.safetensors").write_bytes(b"another run")
    refused(capsys, [*args, "--resume", "--name", "other"], "which the run being resumed did")
    assert (out / "other.safetensors").read_bytes() == b"another run"
    assert main([*args, "--resume"]) == 0  # its own files: allowed
    capsys.readouterr()
    assert (out / "other.safetensors").read_bytes() == b"another run"


# ---------------------------------------------------------------- silent wrong results


@pytest.mark.parametrize(
    "base, adapter, vector, message",
    [
        ("tiny-xl", "xl", ZEROS17, "an SDXL adapter has 12 values"),
        ("tiny", "sd", ZEROS12, "an SD 1.x adapter has 17 values"),
    ],
)
def test_a_block_vector_of_the_wrong_family_is_refused(
    adapters, tmp_path, capsys, base, adapter, vector, message
):
    """17 zeros on SDXL left 48 of 152 modules on; 12 zeros on SD 1.x left 24 of 56 on."""
    out = tmp_path / "o.png"
    generate = ["generate", "--base", base, "--device", "cpu", "--prompt", "x", "--steps", "1"]
    refused(
        capsys, [*generate, "--out", str(out), "--lora", f"{adapters[adapter]}@{vector}"], message
    )
    merged = tmp_path / "m.safetensors"
    refused(capsys, ["merge", f"{adapters[adapter]}@{vector}", "--out", str(merged)], message)
    assert not out.exists() and not merged.exists()


def test_embedding_only_steps_covering_every_epoch_step_are_refused(data, tmp_path, capsys):
    args = train_args(data, tmp_path / "out", "--new-token", "ohwx")
    args[args.index("--steps") : args.index("--steps") + 2] = ["--epochs", "1"]
    refused(
        capsys,
        [*args, "--embedding-only-steps", "3"],
        "--embedding-only-steps 3 leaves no step of the 3 (from --epochs 1) for the LoRA",
    )
    assert not (tmp_path / "out").exists()


def test_reg_data_and_the_training_images_stay_apart(data, tmp_path, capsys):
    import shutil

    folder = tmp_path / "data"
    shutil.copytree(data, folder)
    (folder / "reg").mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (90, 90, 30 * i)).save(folder / "reg" / f"dog_{i}.png")
    out = tmp_path / "out"
    # DATA_DIR inside --reg-data: its images would be class images too
    refused(
        capsys,
        train_args(folder / "reg", out, "--reg-data", str(folder)),
        "holds the training images of",
    )
    # --reg-data inside DATA_DIR: class images only, not training images
    args = train_args(folder, out, "--reg-data", str(folder / "reg"), "--steps", "1")
    assert main(args) == 0
    capsys.readouterr()
    with safe_open(str(out / "data.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_num_train_images"] == "3"  # not 7
    assert json.loads(meta["sdlora_training"])["reg_data"] == str(folder / "reg")
