"""Making the UNet's training step fast on a GPU: memory layout, attention kernel, compilation.

`speed_up(unet, ...)` is called once, after the adapter is injected and before the first step:

- channels_last: convolutions run on cuDNN's NHWC kernels (tensor cores, no layout transposes).
- attention: the fastest scaled-dot-product-attention kernel for this UNet's head sizes (SD 1.x
  has 40, 80 and 160), timed on the device itself, goes first in PyTorch's priority list.
- regional compilation: every transformer block and resnet block (the repeated blocks that hold
  nearly all the work) is compiled with torch.compile, not the whole UNet. Blocks of one shape
  share one compiled graph, so compiling costs about 20 graphs per bucket instead of one huge
  graph, and `--compile auto` compiles only when the run is long enough to pay it back
  (compile_plan.py decides; compiling.py is the door the trainer goes through).
  SD 1.x/2.x compile each Transformer2DModel (one attention block with its projections); SDXL's
  hold 2 or 10 attention blocks each, and one 10-block graph took most of the first step's three
  minutes alone, in one process: there each attention block (BasicTransformerBlock) is a region,
  so 70 blocks share 2 small graphs that the compile workers build side by side.
- activation budget: each compiled block keeps a fraction of its activations for the backward
  pass and recomputes the rest inside its backward graph (PyTorch's activation memory budget:
  the partitioner recomputes what costs least per byte saved first). Unlike gradient
  checkpointing around the blocks, nothing runs twice outside the compiled graphs, so they can
  still replay as CUDA graphs.
- CUDA graphs: compiled blocks replay as CUDA graphs (torch.compile's "reduce-overhead"). On an
  H100 at batch 8 the compiled step needs 62 ms of GPU kernels but took 119 ms without graphs:
  the GPU waited on Python launching kernels. With graphs it takes 66 ms.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from sdlora.train import graph_lookup

logger = logging.getLogger(__name__)

# the blocks compiled one by one ("regions"); each shape among them compiles once
REGIONS = ("Transformer2DModel", "ResnetBlock2D")
# the regions of a UNet whose Transformer2DModels hold several attention blocks (SDXL)
DEEP_REGIONS = ("BasicTransformerBlock", "ResnetBlock2D")
# torch.compile backend; "eager" only traces (the CPU smoke benchmark uses it to check the regions)
COMPILE_BACKEND = "inductor"
# dynamic=False: one fully specialised graph per block shape (shapes are few, kernels are best)
COMPILE_DYNAMIC = False
# distinct block shapes of one bucket in SD 1.x (4 transformer + 14 resnet), with room to spare
GRAPHS_PER_BUCKET = 24


def speed_up(
    unet: nn.Module,
    device: torch.device,
    *,
    compile: bool,
    buckets: int,
    channels_last: bool | None = None,
    cuda_graphs: bool = False,
) -> dict[str, str]:
    """Lay out, pick the attention kernel for, and compile `unet` in place; say what was done.

    channels_last=None means: on CUDA. Call after the adapter is injected (compiled blocks see
    the LoRA layers) and before the first step. cuda_graphs=True (with compile, on CUDA) replays
    each compiled block as a CUDA graph: the step stops waiting on Python launching thousands of
    small kernels. Each step must then begin with `torch.compiler.cudagraph_mark_step_begin()`,
    and gradients must not accumulate across steps (the graphs reuse their output memory).
    """
    done = {}
    if channels_last if channels_last is not None else device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
        done["layout"] = "channels_last"
    if device.type == "cuda":
        done["attention"] = pick_attention_kernel(unet, device)
    if compile:
        done["compile"] = compile_regions(unet, device, buckets, cuda_graphs=cuda_graphs)
    return done


def regions_of(unet: nn.Module) -> tuple[str, ...]:
    """The class names of `unet`'s compiled regions: REGIONS, or DEEP_REGIONS for SDXL-like
    UNets (a Transformer2DModel with more than one attention block)."""
    deep = any(
        len(getattr(m, "transformer_blocks", ())) > 1
        for m in unet.modules()
        if type(m).__name__ == "Transformer2DModel"
    )
    return DEEP_REGIONS if deep else REGIONS


def compile_options(device: torch.device, cuda_graphs: bool) -> dict:
    """The keyword arguments of `module.compile` for each region."""
    graphs = cuda_graphs and device.type == "cuda" and COMPILE_BACKEND == "inductor"
    mode = "reduce-overhead" if graphs else None
    return dict(dynamic=COMPILE_DYNAMIC, backend=COMPILE_BACKEND, mode=mode)


def set_activation_budget(fraction: float) -> None:
    """Compiled graphs keep this fraction of their activations (1: all, as PyTorch by default).

    A process-wide setting read when a graph compiles; it is part of the compile cache's key."""
    torch._functorch.config.activation_memory_budget = float(fraction)


def compile_regions(
    unet: nn.Module,
    device: torch.device,
    buckets: int,
    *,
    cuda_graphs: bool,
    activation_budget: float = 1.0,
    cached: bool = False,
) -> str:
    """torch.compile each repeated block of `unet` in place (it compiles at its first call),
    keeping `activation_budget` of each block's activations for the backward pass.

    cached: the compile workers left every graph in the on-disk cache (precompile.py), so the
    blocks only load them. Inductor's kernel-compiling processes (one per CPU core, up to 32,
    each importing PyTorch) would then have nothing to do but take the CPU from the step that
    loads the graphs; they are not started."""
    from torch._inductor import config as inductor

    set_activation_budget(activation_budget)
    inductor.compile_threads = 1 if cached else inductor.decide_compile_threads()
    limit = GRAPHS_PER_BUCKET * buckets
    dynamo = torch._dynamo.config
    # each block shape (per bucket) is one more compiled graph of the same code
    dynamo.recompile_limit = max(dynamo.recompile_limit, limit)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4 * limit)
    options = compile_options(device, cuda_graphs)
    replayed = options["mode"] == "reduce-overhead"
    if replayed:
        graph_lookup.install()  # recording 171 graphs (SDXL) would pause for half a minute
    regions = regions_of(unet)
    count = 0
    for module in unet.modules():
        if type(module).__name__ in regions:
            module.compile(**options)
            count += 1
    graphs = ", CUDA graphs" if replayed else ""
    budget = f", activation budget {activation_budget:g}" if activation_budget < 1 else ""
    return f"{count} blocks ({', '.join(regions)}){graphs}{budget}"


def attention_shapes(unet: nn.Module, batch: int = 8) -> list[tuple[tuple[int, ...], int]]:
    """((B, heads, tokens, head_dim), key tokens) of the UNet's attention layers at 512 px.

    Self-attention (keys = tokens) and cross-attention (keys = 77 caption tokens) per level.
    """
    config = unet.config
    heads = config.attention_head_dim  # SD 1.x's name for the number of heads
    side = 64  # 512 px latents
    shapes = []
    for level, (kind, width) in enumerate(
        zip(config.down_block_types, config.block_out_channels, strict=True)
    ):
        level_heads = heads[level] if isinstance(heads, list | tuple) else heads
        if "CrossAttn" in kind:
            tokens = (side >> level) ** 2
            for keys in (tokens, 77):
                shapes.append(((batch, level_heads, tokens, width // level_heads), keys))
    return shapes


def pick_attention_kernel(unet: nn.Module, device: torch.device) -> str:
    """Time each SDPA kernel forward+backward on the UNet's attention shapes; put the fastest first.

    Kernels that cannot run a shape are skipped; PyTorch falls back down the list on its own.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    candidates = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
    candidates.append(SDPBackend.EFFICIENT_ATTENTION)
    shapes = attention_shapes(unet)
    timings = {}
    for backend in candidates:
        try:
            with sdpa_kernel([backend]):
                timings[backend] = sum(_time_attention(shape, device) for shape in shapes)
        except RuntimeError:  # this kernel does not take one of the shapes
            continue
    if not timings:
        return "PyTorch default"
    best = min(timings, key=timings.get)
    # the process-wide priority list (what `sdpa_kernel(..., set_priority=True)` sets for a block)
    order = [best.value] + [b for b in torch._C._get_sdp_priority_order() if b != best.value]
    torch._C._set_sdp_priority_order(order)
    logger.debug("attention kernels (ms): %s", {b.name: round(t, 3) for b, t in timings.items()})
    return best.name.lower()


def _time_attention(shape: tuple[tuple[int, ...], int], device: torch.device) -> float:
    """Milliseconds for one forward+backward of bf16 SDPA at `shape`, median of a few runs."""
    (batch, heads, tokens, dim), keys = shape
    q = torch.randn(batch, heads, tokens, dim, device=device, dtype=torch.bfloat16)
    k = torch.randn(batch, heads, keys, dim, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q.requires_grad_(True)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out.backward(torch.ones_like(out))
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2] * 1000
