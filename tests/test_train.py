"""The training loop on the tiny base (CPU, 64 px, a few steps each).

What must hold: training changes the LoRA factors and nothing else; a run killed by a signal and
resumed ends where an uninterrupted run ends; `accelerate launch` with two processes writes one
adapter; broken images are skipped by name; the output-folder rules hold before any model loads.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image, ImageDraw

from sdlora.bases.base import load_base
from sdlora.errors import SdloraError
from sdlora.io.formats import load_adapter
from sdlora.lora.layer import LoRALayer
from sdlora.train import TrainConfig, train
from sdlora.train import models as models_module
from sdlora.train import setup as train_setup

ROOT = Path(__file__).resolve().parents[1]
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 60, 220),
    "yellow": (230, 210, 40),
}


pytestmark = pytest.mark.usefixtures("one_thread")


# for the training processes these tests start
ENV = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """Four 64 px pictures of shapes with .txt captions."""
    folder = tmp_path_factory.mktemp("shapes")
    for i, (name, color) in enumerate(COLORS.items()):
        img = Image.new("RGB", (64, 64), (245, 240, 230))
        draw = ImageDraw.Draw(img)
        box = (8 + 4 * i, 12, 44 + 4 * i, 52)
        (draw.ellipse if i % 2 else draw.rectangle)(box, fill=color)
        img.save(folder / f"{i}.png")
        shape = "circle" if i % 2 else "square"
        (folder / f"{i}.txt").write_text(f"a {name} {shape}", encoding="utf-8")
    return folder


def settings(data: Path, output: Path, **kw) -> TrainConfig:
    values = dict(
        data_dir=str(data),
        base="tiny",
        output=str(output),
        resolution=64,
        batch_size=2,
        steps=3,
        lr=1e-2,
        save_every=0,
        tensorboard=False,
        workers=0,
        seed=7,
    )
    return TrainConfig(**(values | kw))


def cli_args(config: TrainConfig) -> list[str]:
    """The same run as `config`, as `sdlora train` flags."""
    args = [config.data_dir, "--output", config.output]
    for key in ("base", "resolution", "batch_size", "steps", "lr", "save_every", "seed", "workers"):
        args += ["--" + key.replace("_", "-"), str(getattr(config, key))]
    return args + ["--no-tensorboard"]


def base_state(pipe) -> dict[str, torch.Tensor]:
    """Every non-LoRA weight of the pipeline, under the names a plain base has."""
    state = {}
    for component in ("unet", "text_encoder", "vae"):
        for key, value in getattr(pipe, component).state_dict().items():
            if ".adapters." not in key:
                state[f"{component}.{key.replace('.base.', '.')}"] = value
    return state


def losses_in(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"step \d+: loss (\S+),", text)]


def test_training_changes_only_lora_factors_and_loss_is_finite(
    shapes, tmp_path, monkeypatch, caplog
):
    held = {}

    def keep(*args, **kwargs):
        held["pipe"] = load_base(*args, **kwargs)
        return held["pipe"]

    monkeypatch.setattr(models_module, "load_base", keep)
    caplog.set_level(logging.DEBUG, logger="sdlora.train")
    config = settings(shapes, tmp_path / "out", train_text_encoder=True, trigger="sks")
    path = train(config)

    losses = losses_in(caplog.text)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    pipe = held["pipe"]
    before, after = base_state(load_base("tiny")), base_state(pipe)
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, msg=key)
    layers = [
        m for c in (pipe.unet, pipe.text_encoder) for m in c.modules() if isinstance(m, LoRALayer)
    ]
    assert layers
    for layer in layers:
        weights = layer.get(models_module.ADAPTER_NAME)
        assert weights.down.requires_grad and weights.up.dtype == torch.float32
        assert weights.up.abs().max() > 0  # B starts at zero: it trained

    # attention runs through PyTorch's scaled_dot_product_attention
    processors = pipe.unet.attn_processors.values()
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors)
    # the closing summary says what was done and where the file is
    done = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("done:"))
    assert re.match(
        r"done: 3 steps in [\d.]+ s \(first step [\d.]+ s, then [\d.e+-]+ steps/s, "
        r"[\d.e+-]+ images/s\), peak memory "
        r"[\d.]+ GiB \(process RSS\); adapter: ",
        done,
    ), done
    assert done.endswith(str(path))

    adapter = load_adapter(path)
    assert path == tmp_path / "out" / f"{shapes.name}.safetensors"
    counts = {
        name: sum(isinstance(m, LoRALayer) for m in getattr(pipe, name).modules())
        for name in ("unet", "text_encoder")
    }
    assert adapter.components() == counts and counts["text_encoder"] == 8
    assert adapter.trigger_words() == ["sks"]
    assert adapter.metadata["sdlora_base_model"] == "tiny"
    assert '"steps_done": 3' in adapter.metadata["sdlora_training"]


def tensorboard_events(folder: Path) -> dict[str, list]:
    """Scalar tag -> [(step, value)], and "images:" + tag -> [(step, (height, width))]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    found = {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}
    for tag in events.Tags()["images"]:
        found["images:" + tag] = [(e.step, (e.height, e.width)) for e in events.Images(tag)]
    return found


def test_every_option_path_runs(shapes, tmp_path, monkeypatch, caplog):
    """bf16, v-prediction, min-SNR, noise offset, checkpointing, fresh encodes in a worker, tag
    shuffle, caption dropout, text encoder, nonlinearity, accumulation, samples, TensorBoard."""
    held = {}

    def keep(*args, **kwargs):
        held["pipe"] = load_base(*args, **kwargs)
        return held["pipe"]

    monkeypatch.setattr(models_module, "load_base", keep)
    caplog.set_level(logging.DEBUG, logger="sdlora.train")
    config = settings(
        shapes, tmp_path / "out", steps=2, grad_accum=2, mixed_precision="bf16",
        prediction_type="v_prediction", min_snr_gamma=5.0, noise_offset=0.1,
        gradient_checkpointing=True, crop="random", flip=True, workers=1, shuffle_tags=True,
        caption_dropout=0.3, train_text_encoder=True, text_encoder_lr=1e-3, nonlinearity="relu",
        alpha=4.0, dropout=0.1, targets="all", lr_scheduler="cosine", warmup_steps=1,
        sample_every=1, sample_steps=2, sample_prompts=["a red square", "a blue circle"],
        tensorboard=True, trigger="sks",
    )  # fmt: skip
    path = train(config)
    losses = losses_in(caplog.text)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    adapter = load_adapter(path)
    assert adapter.nonlinearity == "relu" and adapter.metadata["ss_mixed_precision"] == "bf16"
    assert adapter.metadata["sdlora_scale_folded_into"] == "down"
    samples = sorted(p.name for p in (tmp_path / "out" / "samples").iterdir())
    assert samples == ["step-000001.png", "step-000002.png"]
    assert Image.open(tmp_path / "out" / "samples" / samples[0]).size == (128, 64)
    # frozen weights in the compute dtype, LoRA factors in fp32, checkpointing on
    pipe = held["pipe"]
    assert pipe.unet.conv_in.weight.dtype == torch.bfloat16
    assert pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.unet.is_gradient_checkpointing
    lora = [p for n, p in pipe.unet.named_parameters() if ".adapters." in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    # TensorBoard: loss and both learning rates per step (warm-up: 0 at step 1), sample grids
    events = tensorboard_events(tmp_path / "out" / "logs")
    assert [step for step, _ in events["loss"]] == [1, 2]
    assert all(math.isfinite(v) for _, v in events["loss"])
    assert [round(v, 6) for _, v in events["lr/unet"]] == [0.0, 1e-2]
    assert [round(v, 6) for _, v in events["lr/text_encoder"]] == [0.0, 1e-3]
    assert events["images:samples"] == [(1, (64, 128)), (2, (64, 128))]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended early (exit {proc.returncode})")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.02)


def test_run_killed_by_a_signal_resumes_to_the_same_adapter(shapes, tmp_path, caplog):
    killed = settings(shapes, tmp_path / "killed", steps=12, save_every=2)
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdlora.train.command", *cli_args(killed)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=ENV,
    )
    try:
        wait_for(tmp_path / "killed" / "checkpoints" / "step-000002" / "checkpoint.json", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not killed.adapter_path.exists()  # it really died in the middle

    caplog.set_level(logging.INFO, logger="sdlora.train")
    resumed = train(TrainConfig(**(vars(killed) | {"resume": "latest"})))
    step = int(re.search(r"resumed from .* at step (\d+)", caplog.text).group(1))
    assert 2 <= step < 12 and step % 2 == 0
    assert not list((tmp_path / "killed" / "checkpoints").glob(".tmp-*"))

    straight = train(TrainConfig(**(vars(killed) | {"output": str(tmp_path / "straight")})))
    a, b = load_adapter(resumed), load_adapter(straight)
    assert a.modules.keys() == b.modules.keys()
    for key in a.modules:
        torch.testing.assert_close(a.modules[key].down, b.modules[key].down, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.modules[key].up, b.modules[key].up, rtol=1e-5, atol=1e-6)
    assert b.modules[key].up.abs().max() > 0

    # resuming with settings that change what the checkpoint means is refused
    with pytest.raises(SdloraError, match=r"other settings: rank=8 \(now 4\)"):
        train(TrainConfig(**(vars(killed) | {"resume": "latest", "rank": 4})))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_through_accelerate_launch_write_one_adapter(shapes, tmp_path):
    config = settings(shapes, tmp_path / "out", batch_size=1, steps=2, save_every=2)
    launch = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        "-m", "sdlora.train.command",
    ]  # fmt: skip
    result = subprocess.run(
        [*launch, *cli_args(config)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert files == [f"{shapes.name}.safetensors"]
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["step-000002"]
    # one run of two processes (not two runs of one), and only the main process talks
    assert result.stderr.count("x 2 process(es)") == 1
    assert result.stderr.count("done:") == 1
    # the progress bar shows the loss, learning rate, images/s and ETA
    bar = result.stderr.replace("\r", "\n").splitlines()
    assert any(re.search(r"training: 100%.*<00:00.*img_s=.*loss=[\d.]+, lr=", line) for line in bar)
    adapter = load_adapter(tmp_path / "out" / files[0])
    assert adapter.metadata["ss_steps"] == "2"


def test_broken_and_odd_images_train_on_the_good_ones(tmp_path, caplog):
    from test_train_data import odd_images

    good, bad = odd_images(tmp_path / "data")
    caplog.set_level(logging.INFO, logger="sdlora.train")
    path = train(settings(tmp_path / "data", tmp_path / "out", steps=2))
    assert path.exists()
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert (
        f"skipped {len(bad)} unreadable image file(s) of {len(good) + len(bad)}" in warning.message
    )
    for name in bad:
        assert name in warning.message
    assert f"{len(good)} images" in caplog.text


def test_nan_loss_stops_with_a_clear_message(shapes, tmp_path, monkeypatch):
    unbounded_lr(monkeypatch)  # a rate far past --lr's bound makes the loss blow up
    out = tmp_path / "out"
    with pytest.raises(SdloraError, match=r"loss became .* at step (\d+); training stopped") as err:
        train(settings(shapes, out, lr=1e20, steps=4, save_every=1))
    bad = int(re.search(r"at step (\d+)", str(err.value)).group(1))
    assert bad >= 2  # the first loss is computed before any update
    assert not list(out.glob("*.safetensors"))
    # the checkpoints saved before the bad loss stay, and the message says how to go on
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == [f"step-{step:06d}" for step in range(1, bad)]
    assert (
        f"The last checkpoint is {out / 'checkpoints' / kept[-1]}; run the same command with "
        "--resume" in str(err.value)
    )


def unbounded_lr(monkeypatch):
    from dataclasses import replace

    from sdlora.train.config import OPTIONS

    monkeypatch.setitem(OPTIONS, "lr", replace(OPTIONS["lr"], max=None))


def test_weights_that_stop_being_finite_are_never_checkpointed(shapes, tmp_path, monkeypatch):
    """An infinite learning rate: step 1's loss is finite, the update after it is not."""
    unbounded_lr(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(SdloraError, match=r"stopped being finite at step 1; .* not saved"):
        train(settings(shapes, out, lr=float("inf"), steps=3, save_every=1))
    assert not list(out.glob("*.safetensors"))
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())


def test_same_seed_same_adapter_with_fresh_random_encodes(shapes, tmp_path):
    """Random crops, flips, tag shuffle, caption dropout and LoRA dropout all come from the seed."""
    kw = dict(
        steps=2, crop="random", flip=True, shuffle_tags=True, caption_dropout=0.5, dropout=0.2
    )
    a = load_adapter(train(settings(shapes, tmp_path / "a", **kw)))
    b = load_adapter(train(settings(shapes, tmp_path / "b", **kw)))
    c = load_adapter(train(settings(shapes, tmp_path / "c", **kw | {"seed": 8})))
    for key in a.modules:
        torch.testing.assert_close(a.modules[key].up, b.modules[key].up, rtol=0, atol=0)
        torch.testing.assert_close(a.modules[key].down, b.modules[key].down, rtol=0, atol=0)
    assert any(not torch.equal(a.modules[k].up, c.modules[k].up) for k in a.modules)


def test_interrupted_run_says_how_to_resume(shapes, tmp_path, caplog):
    def interrupt(step):
        if step == 3:
            raise KeyboardInterrupt

    caplog.set_level(logging.INFO, logger="sdlora.train")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        train(settings(shapes, out, steps=6, save_every=2), on_step=interrupt)
    assert not list(out.glob("*.safetensors"))
    assert (
        f"stopped at step 3. The last checkpoint is {out / 'checkpoints' / 'step-000002'}; "
        "run the same command with --resume to continue." in caplog.text
    )


class ModelLoaded(Exception):
    pass


@pytest.fixture
def no_model(monkeypatch):
    """Make loading a base fail loudly: the checks under test must come before it."""

    def refuse(*args, **kwargs):
        raise ModelLoaded

    monkeypatch.setattr(models_module, "load_base", refuse)


def test_output_folder_rules(shapes, tmp_path, no_model):
    out = tmp_path / "out"
    config = settings(shapes, out)
    out.mkdir()
    config.adapter_path.write_bytes(b"x")
    with pytest.raises(
        SdloraError,
        match=r"already holds .*\.safetensors; run the same command with --resume .* --overwrite",
    ):
        train(config)
    config.adapter_path.unlink()

    ckpt = out / "checkpoints" / "step-000002"
    ckpt.mkdir(parents=True)
    (ckpt / "checkpoint.json").write_text("{}")
    with pytest.raises(SdloraError, match=r"already holds 1 checkpoint"):
        train(config)
    with pytest.raises(ModelLoaded):  # --resume passes the folder rules
        train(TrainConfig(**(vars(config) | {"resume": "latest"})))
    with pytest.raises(ModelLoaded):  # --overwrite too, and deletes the old checkpoints
        train(TrainConfig(**(vars(config) | {"overwrite": True})))
    assert not (out / "checkpoints").exists()
    with pytest.raises(SdloraError, match=r"resume found no checkpoint"):
        train(TrainConfig(**(vars(config) | {"resume": "latest"})))
    with pytest.raises(SdloraError, match=r"resume .*elsewhere: not a checkpoint folder"):
        train(TrainConfig(**(vars(config) | {"resume": str(tmp_path / "elsewhere")})))

    (tmp_path / "file").write_text("")
    with pytest.raises(SdloraError, match=r"is a file"):
        train(settings(shapes, tmp_path / "file"))


def test_bad_data_and_sizes_are_refused_before_the_model_loads(shapes, tmp_path, no_model):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SdloraError, match=r"no images found"):
        train(settings(empty, tmp_path / "out"))
    with pytest.raises(SdloraError, match=r"--batch-size 5 is larger than the 4"):
        train(settings(shapes, tmp_path / "out", batch_size=5))
    with pytest.raises(SdloraError, match=r"resolution must be a multiple of 64"):
        train(settings(shapes, tmp_path / "out", resolution=96))
    assert not (tmp_path / "out").exists()


def test_small_images_at_a_large_resolution_are_named_in_a_warning(
    shapes, tmp_path, no_model, caplog
):
    with pytest.raises(ModelLoaded):
        train(settings(shapes, tmp_path / "out", resolution=128))
    assert "4 of 4 images are enlarged 2x or more to reach --resolution 128" in caplog.text
    assert "0.png, 64x64 in a 128x128 bucket" in caplog.text
    caplog.clear()
    with pytest.raises(ModelLoaded):
        train(settings(shapes, tmp_path / "out", resolution=64))
    assert "enlarged" not in caplog.text


def test_cli_reports_errors_in_one_line(shapes, tmp_path, capsys, no_model):
    from sdlora.train.command import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / f"{shapes.name}.safetensors").write_bytes(b"x")
    mistakes = {
        "missing: no such folder": [str(tmp_path / "missing"), "-o", str(tmp_path / "out")],
        "empty: no images found": [str(tmp_path / "empty"), "-o", str(tmp_path / "out")],
        "already holds": [str(shapes), "-o", str(tmp_path / "done")],
        "--resolution must be a multiple of 64": [str(shapes), "-o", "x", "--resolution", "100"],
        # a value that is not a number: one line too (it used to be argparse's usage and error)
        "--resolution must be a whole number, a multiple of 64 from 64 to 2048 (got 'abc')": [
            str(shapes),
            "-o",
            "x",
            "--resolution",
            "abc",
        ],
        "no output folder given": [str(shapes)],
    }
    for message, argv in mistakes.items():
        assert main(argv) == 2, message
        err = capsys.readouterr().err
        assert err.startswith("sdlora: ") and message in err
        assert err.count("\n") == 1, err
    # a flag argparse cannot read: the short usage line and the error, not every option
    with pytest.raises(SystemExit) as exit_:
        main([str(shapes), "-o", "x", "--resolution"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("usage: sdlora train DATA_DIR --output DIR [options]")
    assert err[1:] == ["sdlora train: error: argument --resolution: expected one argument"]


def test_epochs_count_whole_passes_over_the_data():
    from sdlora.train.data import BatchPlan, ImageItem

    items = [ImageItem(path=None, caption="", repeats=r, size=(64, 64)) for r in (1, 3)]
    plan = BatchPlan(items, batch_size=2, seed=0)  # 4 images per epoch: 2 batches
    assert train_setup.count_steps(TrainConfig(epochs=3), plan) == 6
    assert train_setup.count_steps(TrainConfig(epochs=3, grad_accum=2), plan) == 3
    assert train_setup.count_steps(TrainConfig(steps=5), plan) == 5
    assert train_setup.count_steps(TrainConfig(), plan) == 1000


def test_optimizer_has_separate_learning_rates_and_fuses_on_cuda():
    from types import SimpleNamespace

    def weights():
        down, up = torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(3, 2))
        return SimpleNamespace(down=down, up=up, params=lambda: [down, up])

    injected = {"lora_unet_a": weights(), "lora_te_b": weights(), "lora_unet_c": weights()}
    config = TrainConfig(lr=1e-4, text_encoder_lr=5e-5)
    optimizer = models_module.make_optimizer(config, injected, torch.device("cpu"))
    unet, text = optimizer.param_groups
    assert unet["lr"] == 1e-4 and len(unet["params"]) == 4
    assert text["lr"] == 5e-5 and text["params"][0] is injected["lora_te_b"].down
    assert not optimizer.defaults["fused"]
    same = models_module.make_optimizer(TrainConfig(lr=1e-4), injected, torch.device("cpu"))
    assert [g["lr"] for g in same.param_groups] == [1e-4, 1e-4]
    # fused AdamW is asked for on CUDA (the parameters stay on the CPU here; only the flag counts)
    assert models_module.make_optimizer(config, injected, torch.device("cuda")).defaults["fused"]


def test_8bit_adamw_without_bitsandbytes_says_how_to_get_it():
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    with pytest.raises(SdloraError, match=r"needs bitsandbytes: pip install"):
        models_module.make_optimizer(TrainConfig(optimizer="adamw8bit"), {}, torch.device("cpu"))


def test_pace_keeps_the_first_step_apart_from_the_rate():
    from sdlora.train.progress import Pace

    pace = Pace(images_per_step=8, first_step=0, started=100.0)
    assert pace.mark(1, 160.0) == pytest.approx(8 / 60)  # a 60 s first step (compiling)
    assert pace.mark(11, 161.0) == pytest.approx(80.0)  # then 10 steps a second
    assert pace.mark(21, 163.0) == pytest.approx(40.0)  # the recent rate, not the average
    summary = pace.summary(21, 170.0)  # the adapter was written after the last read
    assert summary == (
        "21 steps in 70.0 s (first step 60.0 s, then 6.67 steps/s, 53.3 images/s)"
    ), summary
