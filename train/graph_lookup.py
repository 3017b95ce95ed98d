"""Faster pointer lookups in PyTorch's CUDA-graph trees, for models with many compiled regions.

While it records the CUDA graphs of a compiled step, PyTorch's cudagraph trees ask of each new
graph's outputs and static inputs whether the tensor's storage is an output of an earlier graph
on the path (`CUDAGraphNode._is_alias_of_live_recorded_tensor`, `_is_cuda_graph_recorded_tensor`).
They answer by walking every output of every earlier graph, dereferencing its weak reference or
re-reading the tensor's storage pointer at each one: work that grows with the square of the
number of graphs. SDXL's 87 compiled blocks record 171 graphs of about 70 outputs each; on an H200
(torch 2.11, batch 4) the step that records them paused 37 s, and under a profiler these two
lookups were most of it (100 M weak-reference and pointer reads).

`install()` replaces both with lookups that give the same answers: each graph's outputs are
indexed once by storage pointer (the index is rebuilt whenever that graph's list of output
references is not the one indexed), the tensor's pointer is read once, and a weak reference is
dereferenced only where the pointers match. Which of two tests runs first does not change the
answer: neither has a side effect.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

MAX_INDEXED = 8192  # graphs whose output index is kept; past this the index starts afresh

# id(a graph's list of output references) -> (a copy of that list, {pointer: [indices]})
_indexed: dict[int, tuple[list, dict[int, list[int]]]] = {}


def pointers(refs: list) -> dict[int, list[int]]:
    """{storage pointer: indices in `refs`} of one graph's output references (None skipped).

    Cached per list; a cached index serves only while the list holds the very same reference
    objects (compared by identity), so a replaced or added reference rebuilds it."""
    hit = _indexed.get(id(refs))
    if hit is not None and hit[0] == refs:
        return hit[1]
    found: dict[int, list[int]] = {}
    for index, ref in enumerate(refs):
        if ref is not None:
            found.setdefault(ref.data_ptr(), []).append(index)
    if len(_indexed) >= MAX_INDEXED:
        _indexed.clear()
    _indexed[id(refs)] = (list(refs), found)
    return found


def is_recorded(node, tensor: torch.Tensor) -> bool:
    """Is `tensor`'s storage an output of a graph on `node`'s path (alive or not)?"""
    ptr = tensor.untyped_storage().data_ptr()
    return any(ptr in pointers(refs) for refs in node.path_weakrefs)


def live_alias(node, tensor: torch.Tensor) -> tuple[int, int] | None:
    """(depth, output index) of the first live output on `node`'s path that shares `tensor`'s
    storage, in path order; None if there is none."""
    from torch._inductor.cudagraph_trees import maybe_deref

    ptr = tensor.untyped_storage().data_ptr()
    for depth, refs in enumerate(node.path_weakrefs):
        for index in pointers(refs).get(ptr, ()):
            if maybe_deref(refs[index]) is not None:
                return depth, index
    return None


def install() -> bool:
    """Use `is_recorded` and `live_alias` in PyTorch's cudagraph trees; False (and nothing
    changed) where this PyTorch lacks the methods or the weak-reference type they read."""
    try:
        from torch._inductor import cudagraph_trees as trees
    except ImportError:
        return False
    node = getattr(trees, "CUDAGraphNode", None)
    wrapper = getattr(trees, "StorageWeakRefWrapper", None)
    needed = [
        (node, "_is_cuda_graph_recorded_tensor"),
        (node, "_is_alias_of_live_recorded_tensor"),
        (wrapper, "data_ptr"),
        (trees, "maybe_deref"),
    ]
    if not all(hasattr(owner, name) for owner, name in needed):
        logger.debug("cudagraph trees without the expected lookups: left as they are")
        return False
    node._is_cuda_graph_recorded_tensor = is_recorded
    node._is_alias_of_live_recorded_tensor = live_alias
    return True
