"""The memory planner: settings that let a run fit the GPU's free memory, chosen before any load.

Pure functions, no GPU: `plan_memory(MemoryRequest) -> Choice`. A run's GPU memory is estimated per
phase from a small table of per-family costs (`COSTS`):

- steps: frozen weights (bf16, or fp8 for the Linear/Conv2d ones, less the swapped blocks) +
  activations kept for the backward pass (per image at the family's native size, scaled by
  pixels and batch; eager, compiled, or checkpointed) + fixed costs (LoRA, AdamW, workspaces,
  CUDA-graph statics) + the text encoders when they stay on the GPU;
- caching: weights + text encoders + the fp32 VAE encoding `latent_chunk` images at once;
- compiling: weights + each compile worker (a CUDA context, one region and its inputs), beside
  uncompiled steps when they compile in the background (`--compile auto` on a big GPU).

Settings the user gave stay as given; the others ("auto") are chosen from the fastest that fits:
full-precision weights, then fp8; a lower activation budget (compiled runs); micro-batches (the
batch split with gradient accumulation: the same images per optimizer step); gradient
checkpointing; blocks swapped to the CPU; then as many compile workers as fit (at most 8). When
nothing fits the run is refused with the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sdlora.errors import SdloraError

# Headroom left free: the allocator's fragmentation and what the estimates miss.
USABLE = 0.92
MAX_WORKERS = 8  # as compile_plan.MAX_WORKERS
BUDGETS = (1.0, 0.5, 0.25)  # --activation-budget values tried for compiled runs


@dataclass(frozen=True, kw_only=True)
class Costs:
    """One family's memory costs; GiB unless said, activations per image at `native` px."""

    # exact, from the real bases' configs (UNet2DConditionModel on the meta device)
    params_m: float  # denoiser parameters, millions (bf16: 2 bytes each)
    linear_m: float  # of them in Linear/Conv2d weights (what fp8 stores in 1 byte)
    blocks: int  # transformer blocks (what --blocks-to-swap counts)
    block_m: float  # Linear/Conv2d parameters inside those blocks (what swapping moves out)
    native: int  # px
    text_encoders: float  # frozen text encoders in bf16
    # measured or estimated: see MEASURE for which is which and how the lead replaces them
    eager: float  # activations kept for backward per image, eager autograd
    compiled: float  # ... compiled regions (AOT partitioner keeps less), activation budget 1
    checkpointed: float  # ... with gradient checkpointing
    fixed: float  # LoRA + AdamW (rank 16), cuBLAS/cuDNN workspaces, allocator slack
    graphs: float  # CUDA-graph statics of compiled regions (not with checkpointing or swapping)
    worker: float  # one compile worker at batch 1: CUDA context, a region, its inputs
    worker_per_image: float  # ... more per image of the batch
    vae_per_image: float  # fp32 VAE encoding one image at native px, weights included


COSTS: dict[str, Costs] = {
    # SDXL: eager/compiled/fixed+graphs from one H200 (benchmarks/results/h200-2026-12-04-sdxl-
    # memory.json: compiled 12.8 GiB at batch 1 and 24.35 at batch 4 -> 3.85 per image; eager
    # 33.95 at batch 4 -> 6.25 per image); the rest ESTIMATED
    "sdxl": Costs(
        params_m=2567.5,
        linear_m=2565.9,
        blocks=70,
        block_m=2184.0,
        native=1024,
        text_encoders=1.52,
        eager=6.25,
        compiled=3.85,
        checkpointed=1.0,  # ESTIMATED (reference loop: 11.2 GiB at batch 4 with its TEs)
        fixed=1.5,  # ESTIMATED
        graphs=2.7,  # ESTIMATED: 8.95 GiB at batch 0 (from the two compiled points) - rest
        worker=1.4,  # ESTIMATED from ~11 GiB for 8 workers at batch 1 (docs/performance.md)
        worker_per_image=0.3,  # ESTIMATED
        vae_per_image=2.8,  # ESTIMATED: "8 images at 1024 px took 20 GiB more" (encode.py)
    ),
    # SD 1.x: eager from the reference loop (benchmarks/results/h100-2026-11-25-batch8.json:
    # 10.8 GiB at batch 8, 19.5 at 16 -> 1.09 per image); the rest ESTIMATED
    "sd1": Costs(
        params_m=859.5,
        linear_m=859.1,
        blocks=16,
        block_m=242.2,
        native=512,
        text_encoders=0.23,
        eager=1.09,
        compiled=0.65,  # ESTIMATED (13.6 GiB at batch 16, compiled, whole run's peak)
        checkpointed=0.2,  # ESTIMATED
        fixed=0.8,  # ESTIMATED
        graphs=1.0,  # ESTIMATED
        worker=0.9,  # ESTIMATED
        worker_per_image=0.05,  # ESTIMATED
        vae_per_image=0.75,  # ESTIMATED
    ),
    # SD 2.x at 768 px: SD 1.x's per-image figures × 2.25 (pixels); ESTIMATED
    "sd2": Costs(
        params_m=865.9,
        linear_m=865.5,
        blocks=16,
        block_m=248.6,
        native=768,
        text_encoders=0.66,
        eager=2.45,
        compiled=1.46,
        checkpointed=0.45,
        fixed=0.8,
        graphs=1.5,
        worker=1.0,
        worker_per_image=0.1,
        vae_per_image=1.7,
    ),
    # SD 3 medium (MMDiT, 2.03 B, 24 joint blocks); ESTIMATED throughout
    "sd3": Costs(
        params_m=2028.0,
        linear_m=2020.0,
        blocks=24,
        block_m=1900.0,
        native=1024,
        text_encoders=10.6,  # CLIP-L, bigG and T5-XXL
        eager=5.0,
        compiled=3.0,
        checkpointed=0.6,
        fixed=1.5,
        graphs=2.5,
        worker=1.4,
        worker_per_image=0.3,
        vae_per_image=2.8,
    ),
}

# What the lead measures on the GPU to replace the ESTIMATED figures (benchmarks/low_memory.py
# prints the step peaks it needs; docs/performance.md says how each figure follows from them).
MEASURE = {
    "sdxl.checkpointed": "peak of eager steps with --gradient-checkpointing at batch 1 and 4",
    "sdxl.fixed / graphs": "compiled peak at batch 1 and 4, with and without CUDA graphs",
    "sdxl.worker / worker_per_image": "nvidia-smi during --compile-workers 1 and 4, batch 1 and 4",
    "sdxl.vae_per_image": "peak while caching latents, one image at a time",
    "sdxl compiled at activation budget 0.5 / 0.25": "peak per step (the planner interpolates "
    "linearly between checkpointed (budget 0) and compiled (budget 1))",
    "sd1, sd2, sd3": "the same on SD 1.5, SD 2.1 and SD 3 medium shapes",
}


@dataclass(frozen=True, kw_only=True)
class MemoryRequest:
    """What the planner knows about a run before loading anything. None: not given (auto)."""

    family: str  # sdlora.bases.families name: sd1, sd2, sdxl, sd3
    params_m: float | None = None  # the base's denoiser parameters, when known (tiny bases)
    resolution: int
    batch: int
    free_gib: float  # the GPU's free memory
    compiled: bool  # the run compiles its UNet (compile_plan.will_compile)
    cuda_graphs: bool = True  # compiled regions replay as CUDA graphs
    background: bool = False  # compile workers run beside uncompiled steps (--compile auto)
    text_on_gpu: bool = False  # the text encoders stay on the GPU during the steps
    caches_latents: bool = True  # latents encoded before the steps (else the VAE stays)
    # the user's settings; None: the planner's to choose
    base_precision: str | None = None  # "full" or "fp8"
    gradient_checkpointing: bool | None = None
    activation_budget: float | None = None
    blocks_to_swap: int | None = None
    compile_workers: int | None = None
    grad_accum: int | None = None  # a user's value keeps the batch as it is


@dataclass(frozen=True, kw_only=True)
class Choice:
    """The settings chosen, and the estimate they were chosen by."""

    fp8: bool
    gradient_checkpointing: bool
    activation_budget: float
    blocks_to_swap: int
    compile_workers: int | None  # None: not compiled with workers
    batch: int  # images per micro-batch
    grad_accum: int  # micro-batches per optimizer step (× the user's, if given)
    compiled: bool  # still compiled (swapping turns compiling off)
    background: bool  # compile workers beside uncompiled steps
    latent_chunk: int  # images the VAE encodes at once while caching
    needs_gib: float  # the largest phase's estimate
    free_gib: float
    chosen: tuple[str, ...] = ()  # the settings the planner chose, in words

    def describe(self) -> str:
        """One line for the log."""
        what = ", ".join(self.chosen) if self.chosen else "the settings as given"
        return (
            f"memory: {self.free_gib:.1f} GiB free on the GPU, about {self.needs_gib:.1f} GiB "
            f"needed with {what}"
        )


def costs_of(family: str) -> Costs:
    """The family's row of COSTS (an unknown family: SDXL's, the largest UNet)."""
    return COSTS.get(family, COSTS["sdxl"])


def scale_of(costs: Costs, request: MemoryRequest) -> float:
    """Activations relative to the table's: pixels over the native size's, times the size of the
    base against the family's real one (built-in tiny bases are far smaller)."""
    pixels = (request.resolution / costs.native) ** 2
    size = min(1.0, (request.params_m or costs.params_m) / costs.params_m)
    return pixels * size


def weights_gib(costs: Costs, request: MemoryRequest, fp8: bool, swapped: int) -> float:
    """Frozen denoiser weights on the GPU: bf16, or 1 byte for fp8 Linear/Conv2d weights; less
    the swapped blocks, plus the two swapped blocks that can be resident at once."""
    size = (request.params_m or costs.params_m) / costs.params_m
    linear_bytes = 1 if fp8 else 2
    total = (costs.linear_m * linear_bytes + (costs.params_m - costs.linear_m) * 2) * 1e6
    per_block = costs.block_m * linear_bytes * 1e6 / costs.blocks
    swapped = min(swapped, costs.blocks)
    total -= per_block * max(0, swapped - min(2, swapped))
    return total * size / 2**30


def activations_gib(
    costs: Costs, request: MemoryRequest, *, compiled: bool, checkpointing: bool, budget: float
) -> float:
    """Activations kept for the backward pass, per image (scaled to the run's images)."""
    if checkpointing:
        per_image = costs.checkpointed
    elif compiled:  # the budget between all recomputed (≈ checkpointing) and all kept
        per_image = costs.checkpointed + budget * (costs.compiled - costs.checkpointed)
    else:
        per_image = costs.eager
    return per_image * scale_of(costs, request)


@dataclass(frozen=True)
class Candidate:
    """One candidate: the memory-saving settings of a run."""

    fp8: bool
    checkpointing: bool
    budget: float
    swapped: int
    split: int  # the batch in this many micro-batches


def step_gib(costs: Costs, request: MemoryRequest, s: Candidate) -> float:
    """Peak of a training step with setting `s`."""
    compiled = request.compiled and not s.swapped
    batch = request.batch // s.split
    acts = batch * activations_gib(
        costs, request, compiled=compiled, checkpointing=s.checkpointing, budget=s.budget
    )
    # CUDA graphs: not with checkpointing, nor with micro-batches (compile_plan.cuda_graphs_allowed)
    graphs = compiled and request.cuda_graphs and not s.checkpointing and s.split == 1
    total = weights_gib(costs, request, s.fp8, s.swapped) + acts + costs.fixed
    total += costs.graphs * graphs + costs.text_encoders * request.text_on_gpu
    return total


def caching_gib(costs: Costs, request: MemoryRequest, s: Candidate, chunk: int) -> float:
    """Peak while latents and text are cached: the whole base is on the GPU."""
    vae = costs.vae_per_image * chunk * scale_of(costs, request) if request.caches_latents else 0
    return weights_gib(costs, request, s.fp8, s.swapped) + costs.text_encoders + vae


def worker_gib(costs: Costs, request: MemoryRequest, s: Candidate) -> float:
    """One compile worker (its own CUDA context and the region it compiles)."""
    per_image = costs.worker_per_image * scale_of(costs, request)
    return costs.worker + per_image * (request.batch // s.split)


def compiling_gib(costs: Costs, request: MemoryRequest, s: Candidate, workers: int) -> float:
    """Peak while the workers compile: before the first step, or beside uncompiled steps."""
    if request.background:
        eager = replace(request, compiled=False)
        base = step_gib(costs, eager, s)
    else:
        base = weights_gib(costs, request, s.fp8, s.swapped) + costs.fixed
        base += costs.text_encoders * request.text_on_gpu
    return base + workers * worker_gib(costs, request, s)


def candidates(request: MemoryRequest, costs: Costs) -> list[Candidate]:
    """Every setting the user's choices allow, fastest first."""
    fp8s = [request.base_precision == "fp8"] if request.base_precision else [False, True]
    checks = (
        [request.gradient_checkpointing]
        if request.gradient_checkpointing is not None
        else [False, True]
    )
    budgets = [1.0]
    if request.compiled:
        budgets = [request.activation_budget] if request.activation_budget is not None else BUDGETS
    splits = [1]
    if request.grad_accum is None:
        splits = [k for k in range(1, request.batch + 1) if request.batch % k == 0]
    swaps = [request.blocks_to_swap] if request.blocks_to_swap is not None else [0]
    if request.blocks_to_swap is None:
        swaps += list(range(2, costs.blocks + 1, 2))
    found = []
    # checkpointing last among the rest: compiled, it also costs the CUDA graphs (SDXL batch 1
    # on an H200: 1.55 img/s against 9.0, docs/performance.md), more than micro-batches do
    for check in sorted(checks):
        for split in splits:
            for budget in budgets[:1] if check else budgets:
                for fp8 in sorted(fp8s):
                    found.append(Candidate(fp8, check, budget, swaps[0], split))
    for swapped in swaps[1:]:  # the last resort: every other saving first (fp8 halves each copy)
        for split in splits:
            found.append(Candidate(max(fp8s), max(checks), budgets[0], swapped, split))
    return list(dict.fromkeys(found))


def plan_memory(request: MemoryRequest) -> Choice:
    """The fastest settings that fit `request.free_gib` (see the module); SdloraError if none."""
    costs = costs_of(request.family)
    usable = request.free_gib * USABLE
    fitting = None
    smallest = None
    for s in candidates(request, costs):
        chunk = latent_chunk(costs, request, s, usable)
        need = max(step_gib(costs, request, s), caching_gib(costs, request, s, chunk))
        if smallest is None or need < smallest[0]:
            smallest = (need, s)
        if need <= usable:
            fitting = (s, need, chunk)
            break
    if fitting is None:
        need, s = smallest
        raise SdloraError(
            f"this run needs about {need / USABLE:.1f} GiB of GPU memory even with "
            f"{', '.join(words(s, request)) or 'the settings as given'}, and the GPU has "
            f"{request.free_gib:.1f} GiB free; try {advice(request)}"
        )
    s, need, chunk = fitting
    compiled = request.compiled and not s.swapped
    workers, background = None, request.background and compiled
    if compiled:
        workers, background, need = choose_workers(costs, request, s, need, usable)
    chosen = words(s, request)
    if workers is not None and request.compile_workers is None:
        chosen.append(f"{workers} compile worker{'s' * (workers != 1)}")
    if request.compiled and s.swapped:
        chosen.append("no compiling (swapped blocks run uncompiled)")
    return Choice(
        fp8=s.fp8,
        gradient_checkpointing=s.checkpointing,
        activation_budget=s.budget,
        blocks_to_swap=s.swapped,
        compile_workers=workers,
        batch=request.batch // s.split,
        grad_accum=s.split,
        compiled=compiled,
        background=background,
        latent_chunk=chunk,
        needs_gib=need / USABLE,
        free_gib=request.free_gib,
        chosen=tuple(chosen),
    )


def latent_chunk(costs: Costs, request: MemoryRequest, s: Candidate, usable: float) -> int:
    """Images the VAE encodes at once while caching: up to 2 Mpx (encode.py's chunk), fewer
    where that would not fit, at least 1."""
    most = max(1, int(8 * 512 * 512 // request.resolution**2))
    for chunk in range(most, 0, -1):
        if caching_gib(costs, request, s, chunk) <= usable:
            return chunk
    return 1


def choose_workers(
    costs: Costs, request: MemoryRequest, s: Candidate, need: float, usable: float
) -> tuple[int | None, bool, float]:
    """(compile workers, in the background or not, the new estimate) for a compiled run: the
    user's count, else as many as fit; where not even one fits beside uncompiled steps, they
    compile before the first step instead; none fitting at all: the run compiles in-process."""
    background = request.background
    if request.compile_workers is not None:
        count = request.compile_workers
        if background and compiling_gib(costs, request, s, max(1, count)) > usable:
            background = False
        bg = replace(request, background=background)
        return count, background, max(need, compiling_gib(costs, bg, s, count))
    for bg in [True, False] if background else [False]:
        r = replace(request, background=bg)
        count = 0
        while count < MAX_WORKERS and compiling_gib(costs, r, s, count + 1) <= usable:
            count += 1
        if count:
            return count, bg, max(need, compiling_gib(costs, r, s, count))
    return 0, False, need


def words(s: Candidate, request: MemoryRequest) -> list[str]:
    """The settings of `s` the planner chose (those the user left to it), in words."""
    said = []
    if s.fp8 and request.base_precision is None:
        said.append("fp8 base weights")
    if s.checkpointing and request.gradient_checkpointing is None:
        said.append("gradient checkpointing")
    if s.budget < 1 and request.activation_budget is None and not s.checkpointing:
        said.append(f"activation budget {s.budget:g}")
    if s.split > 1:
        said.append(
            f"batch {request.batch} as {s.split} micro-batches of {request.batch // s.split}"
        )
    if s.swapped and request.blocks_to_swap is None:
        said.append(f"{s.swapped} blocks swapped to the CPU")
    return said


def advice(request: MemoryRequest) -> str:
    """What the user can change when nothing fits."""
    tips = []
    if request.batch > 1:
        tips.append("--batch-size 1 (with --grad-accum for the same images per step)")
    if request.resolution > 512:
        tips.append(f"a lower --resolution than {request.resolution}")
    if request.text_on_gpu:
        tips.append("caching the text (no --train-text-encoder, samples or validation)")
    tips.append("a GPU with more free memory (close other programs using it)")
    return ", or ".join(tips)


def latent_chunk_argument(choice: Choice | None, resolution: int | None) -> dict[str, int]:
    """encode.LatentCache's `chunk` keyword (in 512² px units) for the planned images at once;
    {} (its default) without a plan."""
    if choice is None or not resolution:
        return {}
    return {"chunk": max(1, choice.latent_chunk * resolution * resolution // (512 * 512))}
