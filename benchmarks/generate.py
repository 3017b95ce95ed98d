"""Generation speed: sdlora's fast loop beside the diffusers pipeline, eager and compiled.

    python benchmarks/generate.py [--only sd15|sdxl] [--steps 30] [--images 3] [--json FILE]
    python benchmarks/generate.py --tiny      # the same code on the CPU with the tiny bases

SD 1.5-shaped at 512 px and SDXL-base-shaped at 1024 px (random weights built on the GPU, as
benchmarks/sd15.py and sdxl.py make them), bf16, batch 1 with classifier-free guidance (7.5),
the default sampler of `sdlora generate` (pndm: 30 steps are 31 UNet calls), one prompt. For each
family, in this order, on one fresh compile cache:

- pipeline eager:   the diffusers pipeline as sdlora calls it with `--compile off` (SDPA attention)
- ours, 0/4 fused/1 nonlinear adapters: `generate(..., compile="on")` (sdlora/bases/fast_sample.py:
  compiled regions, the whole step replayed as one CUDA graph) with no adapter, then four random
  rank-16 linear adapters fused, then one rank-16 relu adapter unfused (the four removed)
- strength change:  one fused adapter's strength moved between two images: the set_strength time,
  then the next image, with whether anything was recorded or compiled again
- pipeline compiled: diffusers' documented recipe ("Accelerate inference of text-to-image diffusion
  models"): inductor's conv_1x1_as_mm and coordinate-descent tuning, fused QKV projections,
  channels_last, `torch.compile(unet, mode=--recipe-mode, fullgraph=True)`; last, since fusing
  the QKV projections takes the adapters' target layers away

Each run gives the first image (compilation and recording included; each run's first image on
this machine's compile cache as the previous runs left it) and the steady image (mean of the next
--images), seconds of wall time per image, text encoding and VAE decoding included, and the
peak GPU memory (PyTorch's allocated). Time: not yet measured on a GPU; written to take about
3 minutes per family on one H100 (model build, 4 × 5 images, our regions compiled three times on
a cold cache) plus the recipe's compile, which with max-autotune may take minutes more per
family: run `--only sd15` and `--only sdxl` as two commands, or `--recipe-mode reduce-overhead`
(or `none`) to bound it. `--tiny` compiles with the "eager" backend (tracing only: the CPU has
no CUDA graphs and inductor's CPU kernels would take minutes).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FAMILIES = ("sd15", "sdxl")
PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5
SEED = 0
RANK = 16
# the targets (steady image time, as fractions of another run's)
TARGETS = {
    "sdxl": "steady ≤ ⅔ pipeline eager and ≤ pipeline compiled; first ≤ 2 × pipeline eager's",
    "sd15": "steady ≤ ½ pipeline eager",
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(family: str, tiny: bool, device: torch.device, dtype: torch.dtype):
    """The family's random-weight pipeline (tiny: the built-in tiny base) on `device`."""
    if family == "sdxl":
        from benchmarks.sdxl import build_pipeline

        pipe = build_pipeline(tiny, device)
        for model in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            torch.nn.Module.to(model, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    from benchmarks.sd15 import build_pipeline

    pipe = build_pipeline(tiny, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed_images(draw, device: torch.device, count: int) -> list[float]:
    """Seconds of wall time for each of `count` calls of `draw()`."""
    times = []
    for _ in range(count):
        _sync(device)
        start = time.perf_counter()
        draw()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def run_row(family, run, draw, device, images, note="") -> dict:
    """One row: the first image, then the mean of `images` more, and the peak memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = timed_images(draw, device, 1 + images)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    steady = sum(times[1:]) / len(times[1:])
    return dict(family=family, run=run, first_s=times[0], steady_s=steady, peak_gib=peak, note=note)


def measure_family(
    family: str, tiny: bool, device, dtype, steps: int, images: int, recipe_mode: str, folder
) -> list[dict]:
    from benchmarks.mixing import make_adapter_files
    from sdlora.bases import fast_sample
    from sdlora.bases.generate import GenerateSettings, generate
    from sdlora.bases.recommend import native_size
    from sdlora.lora.blend import Mixer

    pipe = build(family, tiny, device, dtype)
    size = native_size(pipe)  # 512 / 1024 px; the tiny bases' 64
    settings = dict(prompt=PROMPT, steps=steps, guidance=GUIDANCE, seed=SEED, width=size)
    settings["height"] = size
    side = size // pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, side, side)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(SEED))  # as generate's

    def pipeline():
        with torch.inference_mode():
            pipe(
                prompt=PROMPT,
                num_inference_steps=steps,
                guidance_scale=GUIDANCE,
                width=size,
                height=size,
                latents=latents.to(device, dtype),
                output_type="np",
            )

    def ours():
        generate(pipe, GenerateSettings(**settings, compile="on"))

    rows = [run_row(family, "pipeline eager (SDPA)", pipeline, device, images)]
    linear = make_adapter_files(pipe, folder, "identity", 4)
    relu = make_adapter_files(pipe, folder, "relu", 1)
    mixer = Mixer(pipe)
    sampler = fast_sample.sampler_for(pipe)
    rows.append(run_row(family, "ours, no adapter", ours, device, images))
    for i, path in enumerate(linear):
        mixer.add(path, name=f"linear{i}", strength=0.8)
    rows.append(run_row(family, f"ours, 4 fused adapters (rank {RANK})", ours, device, images))

    # a strength change between two images: weights written in place, the graph replays on
    recorded, frames = sampler.recorded, _compiled_frames()
    _sync(device)
    start = time.perf_counter()
    mixer.set_strength("linear0", 0.3)
    _sync(device)
    change = time.perf_counter() - start
    after = timed_images(ours, device, 1)[0]
    again = sampler.recorded - recorded, _compiled_frames() - frames
    rows.append(
        dict(
            family=family,
            run="strength change (fused), then the next image",
            first_s=change,
            steady_s=after,
            peak_gib=None,
            note=f"recorded again {again[0]}×, compiled {again[1]} new graphs",
        )
    )
    mixer.clear()
    mixer.add(relu[0], name="relu", strength=0.8)
    rows.append(
        run_row(family, f"ours, 1 nonlinear adapter (relu rank {RANK})", ours, device, images)
    )
    mixer.clear()

    # the diffusers recipe last: fused QKV projections replace the adapters' target layers
    if recipe_mode == "none":
        return rows
    # the tutorial's inductor settings, for this run only (our next family compiles without)
    recipe = dict(
        conv_1x1_as_mm=True,
        coordinate_descent_tuning=True,
        epilogue_fusion=False,
        coordinate_descent_check_all_directions=True,
    )
    for module in pipe.unet.modules():  # our compiled regions back to eager: the plain UNet
        module._compiled_call_impl = None
    pipe.fuse_qkv_projections()
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    eager_unet = pipe.unet
    if tiny:
        pipe.unet = torch.compile(pipe.unet, backend="eager", fullgraph=True)
    else:
        pipe.unet = torch.compile(pipe.unet, mode=recipe_mode, fullgraph=True)
    with torch._inductor.config.patch(recipe):
        rows.append(run_row(family, f"pipeline compiled ({recipe_mode})", pipeline, device, images))
    pipe.unet = eager_unet
    return rows


def _compiled_frames() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def judge(rows: list[dict], tiny: bool) -> list[str]:
    """The targets, met or not (only on the GPU run)."""
    if tiny:
        return []
    said = []
    for family in FAMILIES:
        runs = {r["run"]: r for r in rows if r["family"] == family}
        if not runs:
            continue
        eager = runs["pipeline eager (SDPA)"]
        bare = runs["ours, no adapter"]
        fused = next(r for n, r in runs.items() if n.startswith("ours, 4 fused"))
        relu = next(r for n, r in runs.items() if n.startswith("ours, 1 nonlinear"))
        change = next(r for n, r in runs.items() if n.startswith("strength change"))
        compiled = next((r for n, r in runs.items() if n.startswith("pipeline compiled")), None)
        ratio = bare["steady_s"] / eager["steady_s"]
        said.append(f"{family}: steady {ratio:.2f} × pipeline eager ({TARGETS[family]})")
        said.append(
            f"{family}: first image {bare['first_s'] / eager['first_s']:.2f} × pipeline eager's"
            + (
                f"; steady {bare['steady_s'] / compiled['steady_s']:.2f} × pipeline compiled"
                if compiled
                else ""
            )
        )
        saved = eager["steady_s"] - bare["steady_s"]
        extra = bare["first_s"] - eager["steady_s"]
        said.append(
            f"{family}: --compile auto break-even {extra / saved:.0f} images (the first compiled "
            f"image's {extra:.1f} s over an eager one, {saved:.2f} s saved per image; "
            "fast_sample.BREAK_EVEN_IMAGES)"
            if saved > 0
            else f"{family}: compiled images are not faster: no break-even"
        )
        said.append(
            f"{family}: 4 fused +{100 * (fused['steady_s'] / bare['steady_s'] - 1):.1f} % "
            f"(target < 2 %), 1 nonlinear +{100 * (relu['steady_s'] / bare['steady_s'] - 1):.1f} % "
            f"(target < 10 %), strength change {1000 * change['first_s']:.1f} ms (target < 10 ms, "
            f"{change['note']})"
        )
    return said


def markdown(result: dict) -> str:
    lines = [f"- {k}: {v}" for k, v in result["info"].items()]
    lines += ["", "| family | run | first image (s) | steady image (s) | peak (GiB) | note |"]
    lines.append("|---|---|---|---|---|---|")
    for r in result["rows"]:
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(
            f"| {r['family']} | {r['run']} | {r['first_s']:.3f} | {r['steady_s']:.3f} | "
            f"{peak} | {r['note']} |"
        )
    lines += [""] + [f"- {line}" for line in result["judged"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/generate.py", description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="tiny bases on the CPU, in seconds")
    parser.add_argument("--only", choices=FAMILIES, help="measure only this family")
    parser.add_argument("--steps", type=int, help="sampling steps (30; --tiny: 3)")
    parser.add_argument("--images", type=int, help="steady images per run after the first (3)")
    parser.add_argument(
        "--recipe-mode",
        default="max-autotune",
        choices=("max-autotune", "reduce-overhead", "default", "none"),
        help="torch.compile mode of the diffusers recipe (its documented max-autotune); none: "
        "leave the recipe out",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the JSON to FILE")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # a fresh compile cache: first images are those of a first run
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))
    from benchmarks.sd15 import device_info
    from sdlora.bases import fast_sample

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        fast_sample.COMPILE_BACKEND = "eager"
        torch.set_num_threads(1)  # the tiny models gain nothing from more on a shared machine
    steps = args.steps or (3 if args.tiny else 30)
    images = args.images or (1 if args.tiny else 3)
    started = time.perf_counter()
    info = device_info(device) | {
        "mode": "tiny bases, CPU, compile backend eager" if args.tiny else "bf16, batch 1",
        "sampler": f"pndm, {steps} steps, guidance {GUIDANCE}",
    }
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for family in (args.only,) if args.only else FAMILIES:
            rows += measure_family(
                family, args.tiny, device, dtype, steps, images, args.recipe_mode, Path(folder)
            )
            gc.collect()  # the pipeline and its sampler refer to each other
            if device.type == "cuda":
                torch.cuda.empty_cache()
    info["benchmark time"] = f"{time.perf_counter() - started:.0f} s"
    result = {"info": info, "rows": rows, "judged": judge(rows, args.tiny)}
    text = json.dumps(result, indent=1, ensure_ascii=False)
    print(markdown(result))
    print()
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
