"""Blending: strength 0 == base, sum of deltas, many changes == one fresh fuse, enable/remove."""

import pytest
import torch
from conftest import make_adapter_file, run_text, run_unet

from sdlora.bases.base import load_base
from sdlora.errors import SdloraError
from sdlora.lora.blend import Mixer
from sdlora.lora.layer import LoRALayer


@pytest.fixture
def two_files(tmp_path):
    a, _ = make_adapter_file(lambda: load_base("tiny"), tmp_path / "a.safetensors", seed=1)
    b, _ = make_adapter_file(
        lambda: load_base("tiny"), tmp_path / "b.safetensors", rank=8, alpha=4.0, seed=2
    )
    return a, b


def weights(pipe):
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def test_strength_zero_is_base(tiny, inputs, two_files):
    base_unet, base_text = run_unet(tiny, inputs), run_text(tiny, inputs)
    mixer = Mixer(tiny)
    for f in two_files:
        mixer.add(f, strength=0.0)
    torch.testing.assert_close(run_unet(tiny, inputs), base_unet, atol=0, rtol=0)
    torch.testing.assert_close(run_text(tiny, inputs), base_text, atol=0, rtol=0)


def test_two_adapters_blend_as_sum_of_deltas(tiny, inputs, two_files):
    mixer = Mixer(tiny)
    names = [mixer.add(f, strength=s) for f, s in zip(two_files, (0.7, -0.4), strict=True)]
    assert names == ["a", "b"]
    for module in tiny.unet.modules():
        if isinstance(module, LoRALayer):
            expected = module.pristine.float().clone()
            for name, s in (("a", 0.7), ("b", -0.4)):
                expected += s * module.get(name).delta_weight()
            torch.testing.assert_close(module.base.weight, expected, atol=1e-6, rtol=0)
    # and the same outputs as running both unfused
    fused = run_unet(tiny, inputs)
    for name in names:
        mixer.set_fused(name, False)
    torch.testing.assert_close(run_unet(tiny, inputs), fused, atol=1e-5, rtol=0)


def test_many_changes_equal_fresh_fuse(tiny, two_files):
    mixer = Mixer(tiny)
    mixer.add(two_files[0])
    mixer.add(two_files[1])
    g = torch.Generator().manual_seed(0)
    for _ in range(1000):
        name = "a" if torch.rand(1, generator=g) < 0.5 else "b"
        mixer.set_strength(name, float(torch.randn(1, generator=g)) * 3)
    mixer.set_strengths({"a": 0.3, "b": 0.9})
    fresh = load_base("tiny")
    other = Mixer(fresh)
    other.add(two_files[0], strength=0.3)
    other.add(two_files[1], strength=0.9)
    many, once = weights(tiny), weights(fresh)
    assert many.keys() == once.keys()
    for k in many:
        assert torch.equal(many[k], once[k]), k


def test_enable_disable_and_remove(tiny, inputs, two_files):
    base_state = weights(tiny)
    base_out = run_unet(tiny, inputs)
    mixer = Mixer(tiny)
    mixer.add(two_files[0], strength=0.8)
    on = run_unet(tiny, inputs)
    mixer.enable("a", False)
    torch.testing.assert_close(run_unet(tiny, inputs), base_out, atol=0, rtol=0)
    mixer.enable("a", True)
    torch.testing.assert_close(run_unet(tiny, inputs), on, atol=0, rtol=0)
    assert mixer.strengths() == {"a": 0.8}
    mixer.remove("a")
    assert not any(isinstance(m, LoRALayer) for m in tiny.unet.modules())
    after = weights(tiny)
    assert after.keys() == base_state.keys()
    assert all(torch.equal(after[k], base_state[k]) for k in after)


def test_nonlinear_runs_unfused_and_blends(tiny, inputs, tmp_path):
    path, trained = make_adapter_file(
        lambda: load_base("tiny"), tmp_path / "n.safetensors", nonlinearity="relu", alpha=2.0
    )
    mixer = Mixer(tiny)
    mixer.add(path, strength=1.0)
    assert mixer.entries["n"].fused is False
    torch.testing.assert_close(
        run_unet(tiny, inputs), run_unet(trained, inputs), atol=1e-5, rtol=1e-5
    )
    with pytest.raises(SdloraError, match="cannot be fused"):
        mixer.set_fused("n", True)


def test_unknown_name_and_duplicates(tiny, two_files):
    mixer = Mixer(tiny)
    mixer.add(two_files[0])
    with pytest.raises(SdloraError, match="already loaded"):
        mixer.add(two_files[0])
    with pytest.raises(SdloraError, match="no adapter named 'zzz' is loaded \\(loaded: a\\)"):
        mixer.set_strength("zzz", 1.0)
    with pytest.raises(SdloraError, match="finite"):
        mixer.set_strength("a", float("nan"))


def test_mixed_coverage_fused_matches_per_layer_merge(tiny, inputs, tmp_path):
    """Adapters on different module sets and ranks: the batched fuse equals each layer's merge."""
    factory = lambda: load_base("tiny")  # noqa: E731
    a, _ = make_adapter_file(factory, tmp_path / "a.safetensors", seed=1, text_encoder=False)
    b, _ = make_adapter_file(factory, tmp_path / "b.safetensors", rank=2, seed=2, targets="all")
    mixer = Mixer(tiny)
    mixer.add(a, strength=0.6)
    mixer.add(b, strength=-1.3)
    mixer.set_strength("a", 0.25)
    layers = [m for c in (tiny.unet, tiny.text_encoder) for m in c.modules()]
    layers = [m for m in layers if isinstance(m, LoRALayer)]
    assert len({len(m.fused) for m in layers}) == 2  # some layers hold both adapters, some one
    for layer in layers:
        torch.testing.assert_close(layer.base.weight, layer.merged_weight(), atol=1e-6, rtol=0)
    fused = run_unet(tiny, inputs), run_text(tiny, inputs)
    mixer.set_fused("a", False)
    mixer.set_fused("b", False)  # unfused: cached inference factors with the strength folded in
    torch.testing.assert_close(run_unet(tiny, inputs), fused[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(run_text(tiny, inputs), fused[1], atol=1e-5, rtol=0)
    mixer.set_strength("b", 0.5)  # the cache follows the strength
    unfused = run_unet(tiny, inputs)
    mixer.set_fused("b", True)
    torch.testing.assert_close(run_unet(tiny, inputs), unfused, atol=1e-5, rtol=0)


def test_non_finite_fuse_is_refused_and_nothing_written(tiny, two_files, monkeypatch):
    import sdlora.lora.adapter

    # lift the strength bound to reach the weights' own non-finite guard
    monkeypatch.setattr(sdlora.lora.adapter, "MAX_STRENGTH", float("inf"))
    mixer = Mixer(tiny)
    mixer.add(two_files[0], strength=0.5)
    before = weights(tiny)
    with pytest.raises(SdloraError, match="non-finite weights"):
        mixer.set_strength("a", 1e39)  # a finite float, but not in fp32 weights
    after = weights(tiny)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert mixer.strengths() == {"a": 0.5}


def test_strength_changes_read_no_file_and_keep_modules(tiny, inputs, two_files, monkeypatch):
    """Strength, enable and fuse switches touch weights only: no file read, no module rebuilt."""
    import sdlora.io.files
    import sdlora.io.formats

    mixer = Mixer(tiny)
    mixer.add(two_files[0], strength=0.5)
    mixer.add(two_files[1], strength=0.5)

    def no_reading(*args, **kwargs):
        raise AssertionError("a strength change read an adapter file")

    for module in (sdlora.io.files, sdlora.io.formats):
        monkeypatch.setattr(module, "read_safetensors", no_reading)
    monkeypatch.setattr("sdlora.lora.blend.load_adapter", no_reading)
    models = (tiny.unet, tiny.text_encoder)
    modules = [(p, id(m)) for model in models for p, m in model.named_modules()]
    factors = [
        (p.data_ptr(), p._version)
        for layer in (m for model in models for m in model.modules() if isinstance(m, LoRALayer))
        for _, w in layer.items()
        for p in (w.down, w.up)
    ]
    for s in (0.0, 1.2, -0.7, 0.25):
        mixer.set_strength("a", s)
    mixer.enable("b", False)
    mixer.enable("b", True)
    mixer.set_fused("b", False)
    mixer.set_strength("b", 0.9)
    mixer.set_fused("b", True)
    assert [(p, id(m)) for model in models for p, m in model.named_modules()] == modules
    assert [
        (p.data_ptr(), p._version)
        for layer in (m for model in models for m in model.modules() if isinstance(m, LoRALayer))
        for _, w in layer.items()
        for p in (w.down, w.up)
    ] == factors
    monkeypatch.undo()
    fresh = load_base("tiny")
    other = Mixer(fresh)
    other.add(two_files[0], strength=0.25)
    other.add(two_files[1], strength=0.9)
    torch.testing.assert_close(run_unet(tiny, inputs), run_unet(fresh, inputs), atol=1e-6, rtol=0)
    torch.testing.assert_close(run_text(tiny, inputs), run_text(fresh, inputs), atol=1e-6, rtol=0)
