"""Distillation of a nonlinear adapter into a linear LoRA (sdlora.tools.distill, sdlora.lora.activations)."""

import json

import pytest
import torch
from conftest import make_adapter_file, run_text, run_unet

from sdlora.bases.base import load_base
from sdlora.cli import main
from sdlora.io.files import save_adapter
from sdlora.io.formats import load_adapter
from sdlora.lora.activations import LayerStats, Probe, collect
from sdlora.lora.adapter import Adapter, ModuleFactors
from sdlora.lora.blend import Mixer
from sdlora.lora.inject import add_trainable, collect_adapter
from sdlora.tools.distill import (
    adapted_layers,
    distill_adapter,
    fit_reduced_rank,
    prompts_from_metadata,
)

PROMPTS = ["a red circle on the left", "a blue star"]


def stats_of(x: torch.Tensor, y: torch.Tensor) -> LayerStats:
    d, out = x.shape[1], y.shape[1]
    stats = LayerStats(
        torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, out, dtype=torch.float64)
    )
    stats.add(x, y)
    return stats


def mirrored(adapter: Adapter) -> Adapter:
    """relu adapter of rank 2r whose function is linear on every input: down [A; −A], up [B, −B].

    B·relu(A·x) − B·relu(−A·x) = B·A·x, since relu(z) − relu(−z) = z: its exact ΔW is B·A.
    """
    modules = {
        key: ModuleFactors(
            down=torch.cat([m.down * m.scale, -m.down * m.scale]),
            up=torch.cat([m.up, -m.up], dim=1),
            alpha=float(2 * m.rank),
        )
        for key, m in adapter.modules.items()
    }
    return Adapter(modules=modules, nonlinearity="relu", metadata=dict(adapter.metadata))


def delta_of(m: ModuleFactors) -> torch.Tensor:
    """ΔW (out, in·kh·kw) of file factors."""
    return m.scale * m.up.reshape(m.up.shape[0], -1).double() @ m.down.reshape(m.rank, -1).double()


# ---------------------------------------------------------------------------------- the solver


def test_reduced_rank_regression_matches_brute_force():
    """On explicit data: the fit equals the truncated SVD of the least-squares fitted values,
    the residual formula is right, and it beats truncating the least-squares weights."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=g, dtype=torch.float64) @ torch.randn(
        12, 12, generator=g, dtype=torch.float64
    )
    y = torch.tanh(x @ torch.randn(12, 9, generator=g, dtype=torch.float64)) + 0.1 * torch.randn(
        500, 9, generator=g, dtype=torch.float64
    )
    stats = stats_of(x, y)
    w_ls = torch.linalg.lstsq(x, y).solution  # (12, 9)
    fitted = x @ w_ls
    u, s, vh = torch.linalg.svd(fitted, full_matrices=False)
    for rank in (1, 3, 9):
        up, down, err = fit_reduced_rank(stats, rank)
        delta = up @ down  # (out, d)
        best = u[:, :rank] * s[:rank] @ vh[:rank]  # best rank-R fitted values (Eckart-Young)
        torch.testing.assert_close(x @ delta.T, best, atol=1e-7, rtol=1e-7)
        torch.testing.assert_close(err, float(((x @ delta.T - y) ** 2).sum()), atol=1e-7, rtol=1e-7)
        uw, sw, vw = torch.linalg.svd(w_ls.T, full_matrices=False)  # naive: truncate W itself
        naive = (uw[:, :rank] * sw[:rank]) @ vw[:rank]
        assert err <= float(((x @ naive.T - y) ** 2).sum()) + 1e-9
        assert up.norm(dim=0).allclose(down.norm(dim=1))  # balanced factors


def test_rank_deficient_inputs_give_zero_change_off_the_data():
    """Inputs in a 3-dim subspace of 8: ΔW is exact there and (nearly) zero on directions never seen."""
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0]
    x = torch.randn(200, 3, generator=g, dtype=torch.float64) @ basis[:, :3].T
    true = torch.randn(5, 8, generator=g, dtype=torch.float64)
    up, down, err = fit_reduced_rank(stats_of(x, x @ true.T), 5)
    delta = up @ down
    torch.testing.assert_close(x @ delta.T, x @ true.T, atol=1e-7, rtol=1e-7)
    assert (delta @ basis[:, 3:]).norm() < 1e-4 * true.norm()  # rounding in XᵀX / λ only
    assert err < 1e-12 * float((x @ true.T).square().sum())


# ---------------------------------------------------------------------------- on the tiny base


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """gelu adapter (attn, UNet + text encoder), its mirrored relu twin, conv-target twin."""
    folder = tmp_path_factory.mktemp("distill")
    gelu, _ = make_adapter_file(
        lambda: load_base("tiny"), folder / "gelu.safetensors", nonlinearity="gelu"
    )
    relu, _ = make_adapter_file(
        lambda: load_base("tiny"), folder / "relu.safetensors", nonlinearity="relu", seed=5
    )
    save_adapter(mirrored(load_adapter(relu)), folder / "mirrored.safetensors")
    pipe = load_base("tiny")  # relu on 1x1 (proj_in) and 3x3 (resnet conv1) convs too
    g = torch.Generator().manual_seed(7)
    injected = add_trainable(
        pipe.unet, "unet", ("to_q", "proj_in", "conv1"), 3, None, "relu", generator=g
    )
    for weights in injected.values():
        with torch.no_grad():
            weights.up.normal_(0.0, 0.2, generator=g)
    convs = collect_adapter(injected, {"sdlora_base_model": "tiny"})
    save_adapter(mirrored(convs), folder / "convs.safetensors")
    linear, _ = make_adapter_file(lambda: load_base("tiny"), folder / "linear.safetensors")
    return folder


@pytest.mark.parametrize("name", ["mirrored.safetensors", "convs.safetensors"])
def test_adapter_linear_on_its_inputs_is_recovered(files, name):
    """A relu adapter that is linear on every input gives back its ΔW = B·A at rank r, on the
    span of the inputs each layer saw (linear layers, 1x1 and 3x3 convs)."""
    source = load_adapter(files / name)
    rank = source.ranks()[0] // 2
    probe = Probe(PROMPTS + [""], samples=8 if name == "mirrored.safetensors" else 3, seed=0)
    linear, report = distill_adapter(
        load_base("tiny"), source, rank, PROMPTS, probe.samples, probe.seed
    )
    assert set(linear.modules) == set(source.modules)
    assert max(report.errors.values()) <= 1e-4, report.errors
    pipe = load_base("tiny")  # the same probe again, for each layer's inputs
    mixer = Mixer(pipe)
    mixer.add(source, name="relu")
    stats = collect(pipe, adapted_layers(mixer, "relu"), "relu", probe)
    for key, m in linear.modules.items():
        assert m.down.shape == (rank, *source.modules[key].down.shape[1:])
        true = delta_of(source.modules[key]) / 2  # [B, −B]·[A; −A] = 2·B·A; the function is B·A
        gram, diff = stats[key].gram, delta_of(m) - true
        seen = lambda delta, g=gram: float((delta @ g * delta).sum()) ** 0.5  # noqa: E731  ‖X·ΔWᵀ‖
        assert seen(diff) <= 1e-4 * seen(true), key
        if gram.shape[0] <= 64:  # linear and 1x1: ΔW itself, on directions the inputs clearly visit
            evals, q = torch.linalg.eigh(gram)
            span = q[:, evals > 1e-6 * evals[-1]]
            assert (diff @ span).norm() <= 1e-4 * true.norm(), key
    if name == "mirrored.safetensors":  # enough rows at every layer: fresh noise agrees too
        assert report.output_difference <= 1e-4, report


def test_error_does_not_grow_with_rank(files):
    """A gelu adapter with random weights: per layer and overall, more rank never fits worse."""
    source = load_adapter(files / "gelu.safetensors")
    pipe = load_base("tiny")
    mixer = Mixer(pipe)
    mixer.add(source, name="gelu")
    stats = collect(pipe, adapted_layers(mixer, "gelu"), "gelu", Probe(PROMPTS + [""], samples=2))
    errors = {
        rank: {k: fit_reduced_rank(s, rank)[2] for k, s in stats.items()} for rank in (1, 2, 3, 4)
    }
    for key in stats:
        sequence = [errors[rank][key] for rank in (1, 2, 3, 4)]
        assert all(a >= b * (1 - 1e-9) for a, b in zip(sequence[:-1], sequence[1:], strict=True)), (
            key,
            sequence,
        )
    total = sum(s.y_norm2 for s in stats.values())
    overall = [(sum(errors[rank].values()) / total) ** 0.5 for rank in (1, 2, 3, 4)]
    assert overall[0] > overall[1] > overall[2] > overall[3] > 0.01  # gelu is not linear


def test_distilled_file_loads_in_diffusers_and_fuses(files, tmp_path, inputs):
    """CLI end to end: the written kohya file gives diffusers' outputs = ours (fused), and its
    metadata names the source and the errors."""
    out = tmp_path / "lin.safetensors"
    argv = ["distill", str(files / "gelu.safetensors"), "--base", "tiny", "--rank", "2"]
    assert (
        main(
            [
                *argv,
                "--out",
                str(out),
                "--prompts",
                *PROMPTS,
                "--samples",
                "2",
                "--held-out",
                "a green heart",
            ]
        )
        == 0
    )
    adapter = load_adapter(out)
    assert adapter.is_linear and adapter.ranks() == [2]
    meta = adapter.metadata
    assert meta["sdlora_distilled_from"] == "gelu.safetensors"
    assert meta["ss_network_module"] == "networks.lora"
    assert set(json.loads(meta["sdlora_distill_errors"])) == set(adapter.modules)
    assert 0 < float(meta["sdlora_distill_relative_error"]) < 1
    assert 0 < float(meta["sdlora_distill_effect_difference"]) < 1
    assert json.loads(meta["sdlora_distill_prompts"]) == PROMPTS
    theirs = load_base("tiny")
    theirs.load_lora_weights(str(out), adapter_name="distilled")
    ours = load_base("tiny")
    Mixer(ours).add(out)
    assert (run_unet(ours, inputs) - run_unet(load_base("tiny"), inputs)).abs().max() > 1e-3
    torch.testing.assert_close(
        run_unet(theirs, inputs), run_unet(ours, inputs), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        run_text(theirs, inputs), run_text(ours, inputs), atol=1e-5, rtol=1e-5
    )


def test_prompts_come_from_the_training_metadata():
    meta = {
        "sdlora_training": json.dumps(
            {"sample_prompts": ["sks dog on grass"], "caption": "a dog", "trigger": "sks"}
        ),
        "sdlora_trigger_words": json.dumps(["sks"]),
        "ss_tag_frequency": json.dumps({"10_dogs": {"grass": 2, "dog": 9}}),
    }
    assert prompts_from_metadata(meta) == ["sks dog on grass", "sks, a dog", "sks", "dog, grass"]
    assert prompts_from_metadata({"sdlora_training": "not json"}) == []


def one_line(capsys, *parts: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("sdlora: ") and err.count("\n") == 1, err
    assert all(p in err for p in parts) and "Traceback" not in err, err


def test_bad_requests_are_one_line_errors_and_write_nothing(files, tmp_path, capsys):
    gelu, out = str(files / "gelu.safetensors"), tmp_path / "out.safetensors"
    ok = ["--base", "tiny", "--out", str(out), "--prompts", "a star", "--samples", "1"]
    cases = [
        (
            [str(files / "linear.safetensors"), "--rank", "2", *ok],
            ("linear.safetensors: ", "already a linear adapter", "merge"),
        ),
        ([gelu, "--rank", "0", *ok], ("--rank must be at least 1 (got 0)",)),
        ([gelu, "--rank", "33", *ok], ("--rank 33 is larger than module", "allows (32)")),
        ([gelu, "--rank", "2", *ok, "--samples", "0"], ("--samples must be at least 1",)),
        (
            [str(tmp_path / "nope.safetensors"), "--rank", "2", *ok],
            ("nope.safetensors: no such file",),
        ),
        (
            [gelu, "--rank", "2", "--base", "toy", "--out", str(out), "--prompts", "a star"],
            ("gelu.safetensors ", "pick the base it was made for"),
        ),
        (
            [gelu, "--rank", "2", "--base", "tiny", "--out", str(out)],
            ("gelu.safetensors: records no training prompts", "--prompts"),
        ),
        (
            [
                gelu,
                "--rank",
                "2",
                "--base",
                "tiny",
                "--out",
                str(out),
                "--prompts-file",
                str(tmp_path / "p.txt"),
            ],
            ("--prompts-file", "no such file"),
        ),
        (
            [gelu, "--rank", "2", "--base", "tiny", "--out", str(tmp_path / "out.ckpt")],
            (".safetensors; change the name",),
        ),
    ]
    for argv, parts in cases:
        assert main(["distill", *argv]) == 2, argv
        one_line(capsys, *parts)
        assert list(tmp_path.iterdir()) == [], argv
    out.write_bytes(b"keep")
    assert main(["distill", gelu, "--rank", "2", *ok]) == 2
    one_line(capsys, "out.safetensors already exists", "--overwrite")
    assert out.read_bytes() == b"keep"


def test_wrong_base_keys_are_refused(files, tmp_path, capsys):
    """Keys the base has no module for: the existing mismatch check names the file."""
    source = load_adapter(files / "gelu.safetensors")
    foreign = Adapter(
        modules={
            k.replace("lora_unet_", "lora_unet_x"): m
            for k, m in source.modules.items()
            if k.startswith("lora_unet_")
        },
        nonlinearity="gelu",
    )
    save_adapter(foreign, tmp_path / "foreign.safetensors")
    out = tmp_path / "out.safetensors"
    argv = ["distill", str(tmp_path / "foreign.safetensors"), "--base", "tiny", "--rank", "2"]
    assert main([*argv, "--out", str(out), "--prompts", "a star"]) == 2
    one_line(capsys, "foreign.safetensors: ", "do not exist in this base")
    assert not out.exists()


def test_distill_cli_on_tiny_xl_writes_a_file_diffusers_loads(tmp_path, capsys):
    """`sdlora distill --base tiny-xl` of a relu adapter: the UNet runs with SDXL's pooled text
    and size ids (the family's conditioning), and diffusers applies the file as we do."""
    from diffusers import StableDiffusionXLPipeline

    pipe = load_base("tiny-xl")
    g = torch.Generator().manual_seed(2)
    injected = add_trainable(pipe.unet, "unet", ("to_q", "to_v"), 2, None, "relu", generator=g)
    for weights in injected.values():
        with torch.no_grad():
            weights.up.normal_(0.0, 0.2, generator=g)
    source = save_adapter(collect_adapter(injected, {}), tmp_path / "relu.safetensors")
    out = tmp_path / "linear.safetensors"
    argv = ["distill", str(source), "--base", "tiny-xl", "--rank", "2", "--samples", "2"]
    assert main([*argv, "--prompts", "a red circle", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith(str(out))
    meta = load_adapter(out).metadata
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    gen = torch.Generator().manual_seed(4)
    x = dict(
        latents=torch.randn(2, 4, 8, 8, generator=gen),
        hidden=torch.randn(2, 77, 80, generator=gen),
        added={
            "text_embeds": torch.randn(2, 48, generator=gen),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        },
    )

    def unet(p):
        with torch.no_grad():
            t = torch.tensor([10, 700])
            return p.unet(x["latents"], t, x["hidden"], added_cond_kwargs=x["added"]).sample

    theirs = StableDiffusionXLPipeline(**load_base("tiny-xl").components)
    base = unet(theirs)
    theirs.load_lora_weights(str(out))
    ours = load_base("tiny-xl")
    Mixer(ours).add(out)
    assert (unet(theirs) - base).abs().max() > 1e-4
    torch.testing.assert_close(unet(theirs), unet(ours), rtol=0, atol=1e-5)
