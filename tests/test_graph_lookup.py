"""train/graph_lookup.py answers as PyTorch's own cudagraph-tree lookups do (on CPU storages)."""

from __future__ import annotations

import random

import pytest
import torch

from sdlora.train import graph_lookup

trees = pytest.importorskip("torch._inductor.cudagraph_trees")
Node, Ref = trees.CUDAGraphNode, trees.StorageWeakRefWrapper
ORIGINAL_RECORDED = Node._is_cuda_graph_recorded_tensor
ORIGINAL_ALIAS = Node._is_alias_of_live_recorded_tensor


class Path:
    """What the lookups read of a CUDAGraphNode: its path's lists of output references."""

    def __init__(self, path_weakrefs):
        self.path_weakrefs = path_weakrefs


def random_path(rng: random.Random):
    """(path, live tensors, dead storage pointers): graphs of outputs, some of them views of
    one storage, some shared with an earlier graph, some dead, some references None."""
    keep, outputs, dead = [], [], []
    for _ in range(rng.randint(1, 6)):
        refs = []
        for _ in range(rng.randint(0, 8)):
            roll = rng.random()
            if roll < 0.15:
                refs.append(None)
            elif roll < 0.35 and keep:
                refs.append(Ref(rng.choice(keep)[1:]))  # a view: the same storage again
            else:
                tensor = torch.randn(rng.randint(2, 64))
                refs.append(Ref(tensor))
                if rng.random() < 0.3:
                    dead.append(tensor.untyped_storage().data_ptr())
                else:
                    keep.append(tensor)
        outputs.append(refs)
    return Path(outputs), keep, dead


def queries(keep, dead):
    yield from keep
    yield from (t[1:] for t in keep)  # views share the storage, hence the pointer
    yield torch.randn(8)  # never recorded
    yield from (_at(ptr) for ptr in dead)  # new memory where a dead output was


def _at(ptr: int) -> torch.Tensor:
    """A tensor whose storage pointer is `ptr`, viewing nobody's memory (never read)."""

    class Fake:
        def untyped_storage(self):
            return self

        def data_ptr(self):
            return ptr

    return Fake()


@pytest.mark.parametrize("seed", range(40))
def test_same_answers_as_pytorch(seed):
    path, keep, dead = random_path(random.Random(seed))
    asked = 0
    for tensor in queries(keep, dead):
        assert graph_lookup.is_recorded(path, tensor) == ORIGINAL_RECORDED(path, tensor)
        assert graph_lookup.live_alias(path, tensor) == ORIGINAL_ALIAS(path, tensor)
        asked += 1
    assert asked >= 1


def test_dead_output_is_recorded_but_no_live_alias():
    alive, gone = torch.randn(4), torch.randn(4)
    path = Path([[Ref(alive)], [Ref(gone), Ref(alive[1:])]])
    ptr = gone.untyped_storage().data_ptr()
    del gone
    probe = _at(ptr)
    assert graph_lookup.is_recorded(path, probe) and ORIGINAL_RECORDED(path, probe)
    assert graph_lookup.live_alias(path, probe) is None
    assert ORIGINAL_ALIAS(path, probe) is None
    assert graph_lookup.live_alias(path, alive) == (0, 0) == ORIGINAL_ALIAS(path, alive)


def test_index_follows_a_replaced_reference():
    first, second = torch.randn(4), torch.randn(4)
    refs = [Ref(first), None]
    path = Path([refs])
    assert graph_lookup.live_alias(path, first) == (0, 0)
    assert not graph_lookup.is_recorded(path, second)
    refs[1] = Ref(second)  # cudagraph trees fill or replace references in place
    assert graph_lookup.live_alias(path, second) == (0, 1) == ORIGINAL_ALIAS(path, second)
    refs[0] = None
    assert graph_lookup.live_alias(path, first) is None
    assert not graph_lookup.is_recorded(path, first)


def test_install_replaces_both_lookups(monkeypatch):
    monkeypatch.setattr(Node, "_is_cuda_graph_recorded_tensor", ORIGINAL_RECORDED)
    monkeypatch.setattr(Node, "_is_alias_of_live_recorded_tensor", ORIGINAL_ALIAS)
    assert graph_lookup.install()
    assert Node._is_cuda_graph_recorded_tensor is graph_lookup.is_recorded
    assert Node._is_alias_of_live_recorded_tensor is graph_lookup.live_alias


def test_install_leaves_a_pytorch_without_them(monkeypatch):
    monkeypatch.delattr(Node, "_is_alias_of_live_recorded_tensor")
    monkeypatch.setattr(Node, "_is_cuda_graph_recorded_tensor", ORIGINAL_RECORDED)
    assert not graph_lookup.install()
    assert Node._is_cuda_graph_recorded_tensor is ORIGINAL_RECORDED
