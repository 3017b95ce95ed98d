"""Fast sampling: our own denoising loop, the UNet compiled, each step replayed as one CUDA graph.

The diffusers pipeline runs one Python-driven step at a time: the scheduler's arithmetic on the
host side of the loop, and thousands of small kernel launches the GPU waits for. Here:

1. The schedule is read once. Every deterministic sampler sdlora offers (pndm, ddim, euler,
   dpm++) is linear: the sample after step k is a fixed combination of the initial noise x_T and
   the guided model outputs ε_0..ε_k, and so is the UNet's input at step k (Euler's
   1/√(σ²+1) included). `linear_schedule` finds those coefficients by running the diffusers
   scheduler itself on coefficient vectors (float64, basis [x_T, ε_0, …, ε_{N-1}]), then checks
   the result against the scheduler on random values; a sampler that is not linear (euler_a draws
   noise) is refused and `generate` keeps the pipeline.
2. One step is: model input = row k of the input table · history (K slots: x_T, then each ε),
   the classifier-free-guidance pair as one batch of 2B through the UNet, ε = ε_u + g·(ε_c − ε_u)
   written into slot k+1, the step counter k += 1 — all on the GPU, indices and the guidance scale
   in device tensors, so no step waits on the host.
3. The UNet's repeated blocks are compiled (regions, as the trainer compiles them) and the whole
   step is captured once as a CUDA graph with static input buffers, then replayed N times.

A graph holds device pointers. A fused mix writes its weights in place (`fusion.Plan.apply`:
`_foreach_copy_` into the same parameters), so a captured graph stays right when a fused
adapter's strength moves. Everything else a graph baked in (adapters added or removed, an
adapter unfused or its unfused strength changed — its stack is rebuilt —, the fused set) bumps
the Mixer's one `version` counter; a graph recorded at another version refuses to replay
(`StepGraph.replay`) and the sampler records a new one. Shapes (batch, size, steps, guided or
not) and the UNet's dtype and device are part of the key a graph is looked up by.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from sdlora.errors import SdloraError

# --compile auto compiles when a GPU is present and a command (or the web UI) will make at least
# this many images. Provisional: the break-even is the first compiled image's extra time over an
# eager image divided by the time each later image saves; benchmarks/generate.py prints it per
# family (a warm compile cache, a second run, pays back sooner than an empty one).
BREAK_EVEN_IMAGES = 8
# images the web UI is assumed to make over its life: more than the break-even
UI_IMAGES = 1000
COMPILE_CHOICES = ("auto", "on", "off")
# torch.compile backend of the UNet's regions; tests set "eager"/"aot_eager" on the CPU
COMPILE_BACKEND = "inductor"
# the blocks compiled one by one, as the trainer's regions (train/speed.py): every shape among
# them compiles once; SDXL's deep Transformer2DModels compile per attention block
REGIONS = ("Transformer2DModel", "ResnetBlock2D")
DEEP_REGIONS = ("BasicTransformerBlock", "ResnetBlock2D")
WARMUP_STEPS = 2  # eager runs before a capture: compile, autotune, allocator warm-up


def use_compile(choice: str, device: torch.device | str, images: int) -> bool:
    """--compile auto|on|off for `images` images on `device`: auto compiles on a GPU when the
    images reach BREAK_EVEN_IMAGES (the web UI counts as UI_IMAGES)."""
    check_compile(choice)
    if choice != "auto":
        return choice == "on"
    return torch.device(device).type == "cuda" and images >= BREAK_EVEN_IMAGES


def check_compile(choice: str) -> None:
    """Raise unless `choice` is auto, on or off."""
    if choice not in COMPILE_CHOICES:
        raise SdloraError(
            f"{choice!r} is not one of: {', '.join(COMPILE_CHOICES)}", setting="compile"
        )


@dataclass(frozen=True)
class Schedule:
    """A linear sampler's N model calls as coefficient tables over [x_T, ε_0, …, ε_{N-1}]."""

    timesteps: torch.Tensor  # (N,) the UNet's timestep at each call, in the scheduler's dtype
    model_in: torch.Tensor  # (N, N+1) float64: UNet input at call k = model_in[k] · basis
    final: torch.Tensor  # (N+1,) float64: the denoised latents = final · basis

    @property
    def calls(self) -> int:
        return len(self.timesteps)


def linear_schedule(scheduler, steps: int) -> Schedule | None:
    """The coefficients of `scheduler` (a diffusers scheduler, left untouched) for `steps` steps,
    or None when it is not linear in the sample and model outputs (it draws noise, clips)."""
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(steps, device="cpu")
    timesteps = probe.timesteps.clone()
    n = len(timesteps)
    basis = torch.eye(n + 1, dtype=torch.float64)[:, :, None, None]  # (K, K, 1, 1): K samples
    sample = probe.init_noise_sigma * basis[0]
    model_in = []
    for k, t in enumerate(timesteps):
        model_in.append(probe.scale_model_input(sample, t).double().flatten())
        sample = probe.step(basis[k + 1], t, sample, return_dict=False)[0].double()
    schedule = Schedule(timesteps, torch.stack(model_in), sample.flatten().double())
    return schedule if _agrees(scheduler, steps, schedule) else None


def _agrees(scheduler, steps: int, schedule: Schedule) -> bool:
    """Whether the tables reproduce the scheduler on random values (catches samplers that are
    not linear: noise, clipping, thresholding)."""
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(steps, device="cpu")
    g = torch.Generator().manual_seed(0)
    shape = (1, 4, 3, 3)
    basis = [torch.randn(shape, generator=g, dtype=torch.float64)]
    sample = probe.init_noise_sigma * basis[0]
    for k, t in enumerate(probe.timesteps):
        if len(probe.timesteps) != schedule.calls:
            return False
        expected = _combine(schedule.model_in[k], basis)
        if not torch.allclose(probe.scale_model_input(sample, t).double(), expected, atol=1e-5):
            return False
        basis.append(torch.randn(shape, generator=g, dtype=torch.float64))
        sample = probe.step(basis[-1], t, sample, return_dict=False)[0].double()
    return torch.allclose(sample, _combine(schedule.final, basis), atol=1e-4)


def _combine(row: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor:
    return sum(c * b for c, b in zip(row.tolist(), basis, strict=False))


def _kind(pipe) -> str | None:
    """ "sd" (one text encoder), "sdxl" (two, with size conditioning) or None (not a UNet base)."""
    unet = getattr(pipe, "unet", None)
    if unet is None or not hasattr(pipe, "encode_prompt"):
        return None
    if unet.config.get("addition_embed_type") == "text_time":
        return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else None
    return "sd" if unet.config.get("addition_embed_type") is None else None


@dataclass
class Request:
    """What one call draws: noise (B, C, h, w) fp32 on the CPU, prompts, guidance, size."""

    noise: torch.Tensor
    prompt: str
    negative_prompt: str
    guidance: float
    width: int
    height: int


class StepGraph:
    """One denoising step over static buffers, recorded for one key and one Mixer version.

    On CUDA the step is captured as a CUDA graph (after WARMUP_STEPS eager runs); elsewhere it
    runs as it is. Either way `replay` refuses once the Mixer's version moved: the graph may
    point at stacks or modules that no longer exist."""

    def __init__(self, step: Callable[[], None], key: tuple, mixer, reset: Callable[[], None]):
        self.key = key
        self.mixer = mixer
        self.version = mixer.version if mixer is not None else 0
        self.step = step
        self.graph = None
        device = key[0]
        if device.type == "cuda":
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(WARMUP_STEPS):
                    step()
            torch.cuda.current_stream(device).wait_stream(stream)
            reset()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                step()

    @property
    def stale(self) -> bool:
        return self.mixer is not None and self.mixer.version != self.version

    def replay(self) -> None:
        if self.stale:
            raise SdloraError(
                "the recorded generation step is stale: the adapters changed since it was "
                f"recorded (mixer version {self.mixer.version}, recorded at {self.version})"
            )
        if self.graph is not None:
            self.graph.replay()
        else:
            with torch.inference_mode():  # its buffers are inference tensors
                self.step()


class FastSampler:
    """Our denoising loop for one pipeline, with its compiled regions and recorded step."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.compiled = False
        self.graph: StepGraph | None = None
        self.buffers: dict[str, torch.Tensor] = {}
        self.recorded = 0  # steps recorded (CUDA graphs captured) so far, for tests and logs
        self.expected_images = 0  # images its user will make (the web UI: UI_IMAGES)
        self._schedules: dict[tuple, Schedule | None] = {}
        self._settled: dict = {}  # LoRA layer -> its settled forward (settled_layers)

    @property
    def mixer(self):
        return getattr(self.pipe, "sdlora_mixer", None)

    def schedule(self, scheduler, steps: int) -> Schedule | None:
        key = (type(scheduler).__name__, str(dict(scheduler.config)), steps)
        if key not in self._schedules:
            self._schedules[key] = linear_schedule(scheduler, steps)
        return self._schedules[key]

    def supports(self, scheduler, steps: int) -> bool:
        """Whether this loop can draw with the pipeline's base and this sampler."""
        return _kind(self.pipe) is not None and self.schedule(scheduler, steps) is not None

    def compile(self) -> None:
        """Compile the UNet's repeated blocks in place (once); channels_last on CUDA."""
        if self.compiled:
            return
        unet = self.pipe.unet
        if unet.device.type == "cuda":
            unet.to(memory_format=torch.channels_last)
        deep = any(
            len(getattr(m, "transformer_blocks", ())) > 1
            for m in unet.modules()
            if type(m).__name__ == "Transformer2DModel"
        )
        regions = DEEP_REGIONS if deep else REGIONS
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
        dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 1024)
        for module in unet.modules():
            if type(module).__name__ in regions:
                module.compile(backend=COMPILE_BACKEND, dynamic=False)
        self.compiled = True

    def sample(
        self,
        request: Request,
        scheduler,
        steps: int,
        compile: bool,
        on_step: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Denoise `request.noise` and decode it: (B, H, W, 3) floats in [0, 1]."""
        schedule = self.schedule(scheduler, steps)
        if schedule is None or _kind(self.pipe) is None:
            raise SdloraError(
                "this base or sampler cannot use the fast loop; use --compile off",
                setting="compile",
            )
        if compile:
            self.compile()
        unet = self.pipe.unet
        device, dtype = unet.device, unet.dtype
        guided = request.guidance > 1  # as the pipeline: no unconditional half at g <= 1
        with torch.inference_mode():
            cond = self._condition(request, guided, device)
            key = (
                device,
                dtype,
                tuple(request.noise.shape),
                schedule.calls,
                guided,
                tuple((k, tuple(v.shape), v.dtype) for k, v in cond.items()),
                str(schedule.timesteps.dtype),
                self.compiled,
            )
            with self.settled_layers():
                if self.graph is None or self.graph.key != key or self.graph.stale:
                    self._record(key, request.noise.shape, schedule, cond, guided)
                b = self.buffers
                b["history"][0].copy_(request.noise)
                b["model_in"].copy_(schedule.model_in)
                b["timesteps"].copy_(schedule.timesteps)
                b["guidance"].fill_(request.guidance)
                for name, value in cond.items():
                    b[name].copy_(value)
                b["k"].zero_()
                for i in range(schedule.calls):
                    self.graph.replay()
                    if on_step is not None:
                        on_step(i + 1, schedule.calls)
            history = b["history"]
            final = schedule.final.to(device, torch.float32)
            latents = torch.tensordot(final, history, dims=1)  # (B, C, h, w)
            return self._decode(latents)

    @contextmanager
    def settled_layers(self):
        """Within the block, each LoRA layer of the UNet holding unfused adapters runs
        `base(x) + B·σ(A·x)` with its stack (sdlora/lora/unfused.py) fixed: a plain function the
        compiler traces whole, so σ can join the down matmul's kernel (the layer's own forward
        looks its stack up by the factors' version counters, where the compiler stops). Fixed is
        right while the Mixer's version holds, which a recorded step checks before it replays;
        the layers' own forward is back after the block."""
        from sdlora.lora.layer import LoRALayer

        unet = self.pipe.unet
        settled, installed = {}, []
        try:
            for layer in unet.modules():
                if not isinstance(layer, LoRALayer) or len(layer.fused) == len(layer.adapters):
                    continue  # nothing unfused: the layer's forward is the base's already
                stack, others = layer.unfused_adapters(unet.dtype, unet.device)
                if others:  # adapters being trained: their own path
                    continue
                forward = self._settled.get(layer)
                if forward is None or forward.stack is not stack:  # the same function while
                    forward = _settled_forward(layer.base, stack)  # the stack holds: no
                settled[layer] = forward  # recompilation
                layer.forward = forward
                installed.append(layer)
            self._settled = settled
            yield
        finally:
            for layer in installed:
                del layer.forward

    def _record(self, key, shape, schedule: Schedule, cond: dict, guided: bool) -> None:
        """Allocate the static buffers for `key` and record one step over them."""
        self.graph = None  # its memory goes before the new one is taken
        unet = self.pipe.unet
        device, dtype = unet.device, unet.dtype
        layout = torch.channels_last if self.compiled and device.type == "cuda" else None
        n = schedule.calls
        b = {
            "history": torch.zeros((n + 1, *shape), device=device),  # x_T, ε_0..ε_{N-1}, fp32
            "model_in": torch.zeros((n, n + 1), device=device),
            "timesteps": torch.zeros(n, dtype=schedule.timesteps.dtype, device=device),
            "guidance": torch.zeros((), device=device),
            "k": torch.zeros(1, dtype=torch.long, device=device),
        }
        b |= {name: torch.empty_like(value, device=device) for name, value in cond.items()}
        self.buffers = b
        k_hist = b["k"] + 1  # a buffer of its own: where this step's ε goes

        def step() -> None:
            row = b["model_in"].index_select(0, b["k"])[0]  # (K,)
            x = torch.tensordot(row, b["history"], dims=1).to(dtype)  # (B, C, h, w)
            pair = torch.cat([x, x]) if guided else x
            if layout is not None:
                pair = pair.contiguous(memory_format=layout)
            t = b["timesteps"].index_select(0, b["k"])  # (1,)
            added = (
                {"text_embeds": b["text_embeds"], "time_ids": b["time_ids"]}
                if "text_embeds" in b
                else None
            )
            out = unet(
                pair, t, encoder_hidden_states=b["text"], added_cond_kwargs=added, return_dict=False
            )[0].float()
            if guided:
                uncond, text = out.chunk(2)
                out = uncond + b["guidance"] * (text - uncond)
            torch.add(b["k"], 1, out=k_hist)
            b["history"].index_copy_(0, k_hist, out[None])
            b["k"].add_(1)

        def reset() -> None:
            b["k"].zero_()

        for name, value in cond.items():
            b[name].copy_(value)
        self.graph = StepGraph(step, key, self.mixer, reset)
        self.recorded += 1

    def _condition(self, request: Request, guided: bool, device) -> dict[str, torch.Tensor]:
        """The UNet's conditioning for the batch, [unconditional; conditional] when guided."""
        pipe = self.pipe
        count = request.noise.shape[0]
        prompts = [request.prompt] * count
        negatives = [request.negative_prompt] * count if request.negative_prompt else None
        if _kind(pipe) == "sd":
            text, negative = pipe.encode_prompt(prompts, device, 1, guided, negatives)
            return {"text": torch.cat([negative, text]) if guided else text}
        text, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=guided,
            negative_prompt=negatives,
        )
        size = (request.height, request.width)
        time_ids = pipe._get_add_time_ids(
            size,
            (0, 0),
            size,
            dtype=text.dtype,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        ).to(device)
        if guided:
            text = torch.cat([negative, text])
            pooled = torch.cat([negative_pooled, pooled])
            time_ids = torch.cat([time_ids, time_ids])
        return {
            "text": text,
            "text_embeds": pooled.to(device),
            "time_ids": time_ids.repeat(count, 1),
        }

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents -> (B, H, W, 3) floats in [0, 1], as the pipeline decodes them."""
        pipe = self.pipe
        vae = pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
        if upcast:
            vae.to(dtype=torch.float32)
        mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
        latents = latents.to(vae.dtype)
        if mean is not None and std is not None:
            view = dict(device=latents.device, dtype=latents.dtype)
            mean = torch.tensor(mean, **view).view(1, -1, 1, 1)
            std = torch.tensor(std, **view).view(1, -1, 1, 1)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        return pipe.image_processor.postprocess(image, output_type="np")


def _settled_forward(base: torch.nn.Module, stack) -> Callable[[torch.Tensor], torch.Tensor]:
    """y = base(x) + B·σ(A·x) with one fixed stack (None: the base alone)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = base(x)
        if stack is None:
            return y
        return stack.add_to(y, x if x.dtype is y.dtype else x.to(y.dtype))

    forward.stack = stack
    return forward


def sampler_for(pipe) -> FastSampler:
    """The pipeline's FastSampler (one per pipeline, kept on it with its compiled regions)."""
    sampler = getattr(pipe, "sdlora_sampler", None)
    if sampler is None:
        sampler = FastSampler(pipe)
        pipe.sdlora_sampler = sampler
    return sampler


def expect_images(pipe, count: int) -> None:
    """Tell `--compile auto` that `count` images will be drawn with `pipe` (a command's sweep,
    the web UI's life), so it compiles when they pay the compilation back."""
    sampler = sampler_for(pipe)
    sampler.expected_images = max(sampler.expected_images, count)
