"""Run the benchmarks and print one table (markdown, then JSON): `python benchmarks/run.py`.

On a GPU machine this measures SD 1.5-shaped models (random weights, nothing downloaded);
`--smoke` runs every path on the CPU with the tiny base in seconds (tests/test_benchmarks.py).
The training rows come from `benchmarks/training.py`; blending, generation and export rows from
`benchmarks/mixing.py` when it is there.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/run.py` from anywhere; the installed sdlora
    sys.path.append(str(ROOT))  # (with sdlora.train) stays first


def collect(
    smoke: bool, batches: tuple[int, ...], steps: int, eager: bool, sections: tuple[str, ...]
) -> dict:
    """{"info": device and versions, "rows": [...]}: every measurement of this run."""
    import torch

    from benchmarks import sd15, training

    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    started = time.perf_counter()
    info = sd15.device_info(device) | {"mode": "smoke (tiny base, CPU)" if smoke else "SD 1.5"}
    if device.type == "cuda":
        peak = training.peak_flops(device)
        info["MFU basis"] = f"{training.FLOP_PER_IMAGE / 1e12:.2f} TFLOP/image over " + (
            f"{peak / 1e12:.0f} TFLOP/s dense bf16 (spec sheet)" if peak else "unknown peak"
        )
    rows = []
    if "training" in sections:
        rows += training.measure(smoke, device, batches=batches, steps=steps, eager=eager)
    mixing = ROOT / "benchmarks" / "mixing.py"
    if "mixing" in sections and mixing.exists():
        spec = importlib.util.spec_from_file_location("benchmarks.mixing", mixing)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        rows += module.measure(smoke, device, dtype)
    info["benchmark time"] = f"{time.perf_counter() - started:.0f} s"
    return {"info": info, "rows": rows}


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown(result: dict) -> str:
    """The table as markdown: a header of device and versions, then one line per row."""
    lines = [f"- {k}: {v}" for k, v in result["info"].items()]
    lines += ["", "| section | measurement | value | unit | target | met | note |"]
    lines.append("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        cells = [r["section"], r["name"], fmt(r["value"]), r["unit"], r["target"], met, r["note"]]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/run.py", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny base on the CPU, in seconds")
    parser.add_argument(
        "--batches", default="8,1,16", help="training batch sizes, comma-separated (8,1,16)"
    )
    parser.add_argument("--steps", type=int, help="training steps per measurement (30; --smoke: 6)")
    parser.add_argument(
        "--no-eager", action="store_true", help="skip the --compile off training row"
    )
    parser.add_argument(
        "--only", choices=("training", "mixing"), help="run only this section of the table"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the JSON to FILE")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # a fresh compile cache: compile times in the table are those of a first run
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))
    batches = tuple(int(b) for b in args.batches.split(","))
    sections = (args.only,) if args.only else ("training", "mixing")
    steps = args.steps or (6 if args.smoke else 30)
    result = collect(args.smoke, batches, steps, not args.no_eager, sections)
    text = json.dumps(result, indent=1, ensure_ascii=False)
    print(markdown(result))
    print()
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
