"""Merge methods on ΔW (svd, ties, dare, dare-ties, magnitude-prune) against PEFT's merge_utils,
DARE against its paper's formula, refusals, and `sdlora merge --method` end to end."""

import math

import pytest
import torch
from conftest import make_adapter_file
from peft.utils import merge_utils as peft
from safetensors.torch import load_file

from sdlora.bases.base import load_base
from sdlora.cli import main
from sdlora.errors import SdloraError
from sdlora.io.files import save_adapter
from sdlora.io.formats import load_adapter
from sdlora.tools.merge import (
    METHODS,
    combine,
    compress,
    drop,
    merge_adapters,
    merge_exact,
    module_delta,
)

WEIGHTS = [0.7, -0.4, 1.3]


def deltas(shape=(12, 10), n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:The density 1.0:UserWarning")  # peft's note at density 1
@pytest.mark.parametrize("shape", [(12, 10), (6, 4, 3, 3)])
@pytest.mark.parametrize("density", [0.3, 0.5, 1.0])
def test_deterministic_methods_equal_peft(shape, density):
    ds, w = deltas(shape), torch.tensor(WEIGHTS)
    close(combine(ds, WEIGHTS, "svd"), peft.task_arithmetic(ds, w))
    close(combine(ds, WEIGHTS, "magnitude-prune", density), peft.magnitude_prune(ds, w, density))
    for sign in ("total", "frequency"):
        ours = combine(ds, WEIGHTS, "ties", density, sign)
        close(ours, peft.ties(ds, w, density, sign))
    # two adapters, and a trim that actually removes something
    ours = combine(ds[:2], WEIGHTS[:2], "ties", density)
    close(ours, peft.ties(ds[:2], w[:2], density))
    if density < 1:
        assert (combine(ds, [1, 1, 1], "magnitude-prune", density) != sum(ds)).any()


@pytest.mark.parametrize("shape", [(12, 10), (6, 4, 3, 3)])
@pytest.mark.parametrize("seed", [0, 7])
def test_dare_equals_peft_with_the_same_seed(shape, seed):
    """PEFT draws from torch's global CPU generator; ours from a torch.Generator seeded alike."""
    ds, w = deltas(shape), torch.tensor(WEIGHTS)
    for ours_name, reference in (("dare", peft.dare_linear), ("dare-ties", peft.dare_ties)):
        torch.manual_seed(seed)
        expected = reference(ds, w, 0.4)
        g = torch.Generator().manual_seed(seed)
        close(combine(ds, WEIGHTS, ours_name, 0.4, generator=g), expected)
    g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    assert not torch.equal(combine(ds, WEIGHTS, "dare", 0.4, generator=g1), expected)
    assert not torch.equal(
        combine(ds, WEIGHTS, "dare", 0.4, generator=g2),
        combine(ds, WEIGHTS, "dare", 0.4, generator=torch.Generator().manual_seed(seed)),
    )


def test_dare_follows_the_paper():
    """DARE (Yu et al. 2023, eq. 1): kept entries are ΔW/density, the rest 0, E[drop(ΔW)] = ΔW."""
    delta = deltas((8, 6), n=1)[0]
    g = torch.Generator().manual_seed(3)
    dropped = drop(delta.expand(20000, 8, 6), 0.3, g)
    kept = dropped != 0
    close(dropped[kept], (delta.expand_as(dropped) / 0.3)[kept])
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    # the mean of 20000 draws: standard error ≤ |ΔW|·sqrt((1-p)/p)/sqrt(20000) ≈ 0.011·|ΔW|
    torch.testing.assert_close(dropped.mean(0), delta, atol=0.06 * delta.abs().max(), rtol=0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two small adapters on the tiny base: rank 4 alpha 8 with text encoder, rank 2 UNet only."""
    d = tmp_path_factory.mktemp("methods")
    a, _ = make_adapter_file(lambda: load_base("tiny"), d / "a.safetensors", alpha=8.0, seed=1)
    b, _ = make_adapter_file(
        lambda: load_base("tiny"), d / "b.safetensors", rank=2, seed=2, text_encoder=False
    )
    return a, b


def test_cli_ties_matches_ties_of_the_deltas_up_to_the_reported_error(files, tmp_path, capsys):
    a, b = load_adapter(files[0]), load_adapter(files[1])
    out = tmp_path / "ties.safetensors"
    args = ["merge", f"{files[0]}:0.8", f"{files[1]}:1.2", "--out", str(out)]
    assert main([*args, "--method", "ties", "--density", "0.5", "--rank", "3"]) == 0
    text = capsys.readouterr().out
    merged = load_adapter(out)
    assert merged.metadata["sdlora_merge_method"] == "ties" and merged.ranks() == [3]
    overall = float(text.split("overall relative error ")[1].split()[0])
    err2 = norm2 = 0.0
    for key, m in merged.modules.items():
        inputs = [(x, s) for x, s in ((a, 0.8), (b, 1.2)) if key in x.modules]
        shape = m.up.shape[:1] + m.down.shape[1:]
        ds = [module_delta(x.modules[key]).reshape(shape) for x, _ in inputs]
        expected = peft.ties(ds, torch.tensor([s for _, s in inputs]), 0.5)
        diff = (module_delta(m) - expected).norm().item()
        err2, norm2 = err2 + diff**2, norm2 + expected.norm().item() ** 2
        if len(inputs) == 1:  # one adapter: trim only, its sign always agrees
            close(expected, 0.8 * peft.magnitude_based_pruning(ds[0], 0.5))
    assert overall > 0.01  # rank 3 loses something, so the check below is not trivial
    assert math.isclose(math.sqrt(err2 / norm2), overall, rel_tol=2e-3)
    # at the layers' full rank the file holds the TIES result itself
    full, report = merge_adapters([(a, 0.8), (b, 1.2)], method="ties", density=0.5, rank=64)
    assert report.overall < 1e-5
    for key, m in full.modules.items():
        inputs = [(x, s) for x, s in ((a, 0.8), (b, 1.2)) if key in x.modules]
        shape = m.up.shape[:1] + m.down.shape[1:]
        ds = [module_delta(x.modules[key]).reshape(shape) for x, _ in inputs]
        close(module_delta(m), peft.ties(ds, torch.tensor([s for _, s in inputs]), 0.5))


def test_sum_stays_the_exact_merge(files, tmp_path):
    a, b = load_adapter(files[0]), load_adapter(files[1])
    items = [(a, 0.7), (b, -0.4)]
    for rank in (None, 3):
        plain, dflt = tmp_path / f"p{rank}.safetensors", tmp_path / f"s{rank}.safetensors"
        extra = [] if rank is None else ["--rank", str(rank)]
        specs = [f"{files[0]}:0.7", f"{files[1]}:-0.4"]
        assert main(["merge", *specs, "--out", str(plain), *extra]) == 0
        assert main(["merge", *specs, "--out", str(dflt), "--method", "sum", *extra]) == 0
        exact = merge_exact(items) if rank is None else compress(merge_exact(items), rank)[0]
        for merged in (load_adapter(plain), load_adapter(dflt)):
            assert set(merged.modules) == set(exact.modules)
            for key, m in merged.modules.items():
                assert torch.equal(m.up, exact.modules[key].up)
                assert torch.equal(m.down * m.scale, exact.modules[key].down)


def test_dare_same_seed_same_file(files, tmp_path):
    """Same seed: the same tensors in the file (safetensors' header order is not fixed)."""
    items = [(load_adapter(files[0]), 1.0), (load_adapter(files[1]), 0.6)]
    runs = []
    for seed in (5, 5, 6):
        merged, _ = merge_adapters(items, method="dare-ties", density=0.6, seed=seed)
        path = tmp_path / f"d{len(runs)}.safetensors"
        save_adapter(merged, path)
        runs.append(load_file(path))
    assert runs[0].keys() == runs[1].keys() == runs[2].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_refusals(files, tmp_path, capsys):
    items = [(load_adapter(files[0]), 1.0), (load_adapter(files[1]), 1.0)]
    for density in (0.0, -0.2, 1.5, float("nan")):
        with pytest.raises(SdloraError, match=r"must be in \(0, 1\]") as caught:
            merge_adapters(items, method="ties", density=density)
        assert caught.value.setting == "density"
    with pytest.raises(SdloraError, match="is needed by method 'dare'") as caught:
        merge_adapters(items, method="dare")
    assert caught.value.setting == "density"
    with pytest.raises(SdloraError, match="applies only to") as caught:
        merge_adapters(items, method="svd", density=0.5)
    assert caught.value.setting == "density"
    with pytest.raises(SdloraError, match="must be one of sum, svd") as caught:
        merge_adapters(items, method="average")
    assert caught.value.setting == "method"
    n, _ = make_adapter_file(
        lambda: load_base("tiny"), tmp_path / "n.safetensors", nonlinearity="relu"
    )
    with pytest.raises(SdloraError, match="n.safetensors: has nonlinearity 'relu'; only linear"):
        merge_adapters([items[0], (load_adapter(n), 1.0)], method="ties", density=0.5)
    out = str(tmp_path / "x.safetensors")
    assert main(["merge", str(files[0]), "--out", out, "--method", "ties", "--density", "2"]) == 2
    err = capsys.readouterr().err
    assert "--density must be in (0, 1] (got 2)" in err and err.count("\n") == 1
    assert main(["merge", str(files[0]), str(n), "--out", out, "--method", "dare"]) == 2
    assert "--density is needed" in capsys.readouterr().err
    assert (
        main(["merge", str(files[0]), str(n), "--out", out, "--method", "ties", "--density", "0.5"])
        == 2
    )
    err = capsys.readouterr().err
    assert "only linear adapters can be merged" in err and err.count("\n") == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_strength_zero_is_left_out_and_help_lists_the_methods(files, capsys):
    """An adapter at strength 0 changes nothing (in PEFT it would still vote in TIES)."""
    a, b = load_adapter(files[0]), load_adapter(files[1])
    alone, _ = merge_adapters([(a, 0.9)], method="ties", density=0.4, rank=3)
    with_zero, _ = merge_adapters([(a, 0.9), (b, 0.0)], method="ties", density=0.4, rank=3)
    assert set(alone.modules) == set(with_zero.modules)
    for key, m in alone.modules.items():
        close(module_delta(m), module_delta(with_zero.modules[key]))
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    assert "|".join(METHODS) in capsys.readouterr().out
