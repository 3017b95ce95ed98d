"""The benchmarks' --smoke mode: every measured path (our trainer, the diffusers reference loop,
blending, generation, export) runs on the CPU with the tiny base, so the GPU benchmark cannot rot."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def smoke_run(args: list[str]) -> subprocess.CompletedProcess:
    """`python ARGS` in the repository root; it must succeed (its stderr tail otherwise)."""
    run = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_smoke_benchmark_prints_every_row(tmp_path):
    out = tmp_path / "table.json"
    run = smoke_run(["benchmarks/run.py", "--smoke", "--batches", "8,1", "--json", str(out)])
    assert "| section | measurement |" in run.stdout
    result = json.loads(out.read_text(encoding="utf-8"))
    assert {"device", "torch", "diffusers", "date"} <= set(result["info"])
    rows = {r["name"]: r for r in result["rows"]}
    for name in (
        "reference img/s, batch 8",
        "sdlora img/s, batch 8 (compiled)",
        "sdlora img/s, batch 8 (--compile off)",
        "sdlora img/s, batch 1 (compiled)",
        "sdlora wall time, 1000 steps batch 8 (eager)",
        "strength change, 4 adapters rank 16 (median)",
        "merged single file fp16, 4 adapters",
        "step, 1 nonlinear adapter (relu, unfused)",
        "schedule switch (start=0.5), one adapter, cost on its step",
    ):
        assert name in rows, sorted(rows)
    speeds = [r["value"] for r in result["rows"] if r["unit"] == "img/s"]
    assert all(v > 0 for v in speeds), speeds
    # targets are judged only on the GPU run: a CPU smoke run claims none met or missed
    assert all(r["met"] is None for r in result["rows"])


def test_first_run_benchmark_times_whole_commands(tmp_path):
    out = tmp_path / "first.json"
    smoke_run(
        ["benchmarks/first_run.py", "--smoke", "--steps", "2", "--batches", "1"]
        + ["--runs", "eager,reference", "--json", str(out)]
    )
    rows = {r["run"]: r for r in json.loads(out.read_text(encoding="utf-8"))["rows"]}
    assert set(rows) == {"eager", "reference"}
    for r in rows.values():
        # the whole command takes longer than its first step, which is timed apart
        assert r["wall_s"] > r["first_step_s"] >= 0 and r["images_per_s"] > 0, r
        assert 0 <= r["exit_s"] < r["wall_s"], r  # from the final report to the end
    assert 0 < rows["eager"]["start_s"] < rows["eager"]["wall_s"]  # imports, before set-up
    assert "start_s" not in rows["reference"]  # it reports no set-up


def test_first_run_tells_the_start_and_the_end_of_a_command_from_its_lines():
    sys.path.insert(0, str(ROOT))
    from benchmarks.first_run import ends

    log = "set-up took 12.5 s: data 0.1 s, models 8.0 s, caches 4.4 s\n...\ndone: 9 steps\n"
    assert ends(100.0, log, {"setup": 30.0, "done": 95.5}) == {"start_s": 17.5, "exit_s": 4.5}
    assert ends(100.0, log, {}) == {}


def test_first_run_reads_the_switch_from_the_progress_bar():
    sys.path.insert(0, str(ROOT))
    from benchmarks.first_run import step_clock, switch_times

    def bar(step, elapsed):
        return f"\rtraining:  {step}%|#  | {step}/300 [{elapsed}<00:10,  1.5step/s, img_s=6.2]"

    log = "set-up took 3 s\n" + bar(0, "00:00") + bar(1, "00:04") + bar(1, "00:04")
    log += "".join(bar(k, f"00:{4 + k:02d}") for k in range(2, 60))
    log += "\nspeed: compiled from step 60 on: compile workers 16 graphs\n"
    log += bar(60, "01:20") + bar(61, "01:29") + bar(62, "01:29") + bar(230, "1:00:01")
    assert switch_times(log) == dict(
        uncompiled_steps=59, uncompiled_s=63, switch_step_s=17, recording_step_s=9
    )
    assert switch_times(log.replace("speed: compiled from step 60", "speed: layout")) == {}
    assert step_clock(log)[230] == 3601  # h:mm:ss once past an hour


def test_quality_benchmark_measures_every_cell(tmp_path):
    out = tmp_path / "quality.json"
    run = smoke_run(["benchmarks/quality.py", "--smoke", "--json", str(out)])
    assert "| data | σ | rank |" in run.stdout
    result = json.loads(out.read_text(encoding="utf-8"))
    assert {"device", "torch", "command", "seeds", "steps"} <= set(result["info"])
    assert [r["nonlinearity"] for r in result["rows"]] == ["identity", "relu"]
    for r in result["rows"]:
        assert r["params"] > 0 and r["base_change"] >= 0, r
        assert 0 <= r["style_distance"] <= 1 and math.isfinite(r["heldout_loss"]), r
    # the same rank gives the same number of parameters whatever the nonlinearity
    assert len({r["params"] for r in result["rows"]}) == 1


def test_unfused_benchmark_times_every_configuration(tmp_path):
    out = tmp_path / "unfused.json"
    run = smoke_run(
        ["benchmarks/unfused.py", "--smoke", "--threads", "1"]
        + ["--steps", "3", "--json", str(out)]
    )
    assert "| configuration | step (ms) |" in run.stdout
    result = json.loads(out.read_text(encoding="utf-8"))
    assert {"device", "torch", "base", "method", "command"} <= set(result["info"])
    rows = {r["configuration"]: r for r in result["rows"]}
    assert list(rows) == [
        "bare base",
        "1 nonlinear (relu)",
        "3 nonlinear (relu, gelu, silu)",
        "4 fused linear + 1 relu",
    ]
    assert rows["bare base"]["over_bare"] == 0.0
    for r in rows.values():
        assert min(r["step_ms"], r["cpu_ms"], r["fastest_ms"]) > 0, r
        assert math.isfinite(r["over_bare"] + r["fastest_over_bare"]), r
        assert r["met"] is None, r  # a smoke run claims no target


def test_sdxl_benchmark_smoke_measures_every_run(tmp_path):
    out = tmp_path / "sdxl.json"
    smoke_run(
        ["benchmarks/sdxl.py", "--smoke", "--steps", "3", "--batches", "1"] + ["--json", str(out)]
    )
    result = json.loads(out.read_text(encoding="utf-8"))
    assert set(result["runs"]) == {"ours 1", "reference 1"}
    rows = {r["name"]: r for r in result["rows"]}
    for name in (
        "reference img/s, batch 1",
        "sdlora img/s, batch 1 (compiled)",
        "sdlora img/s, 24 GiB setting (batch 1, compiled)",
        "sdlora peak memory, 24 GiB setting",
    ):
        assert rows[name]["value"] > 0, rows[name]
    assert all(r["met"] is None for r in result["rows"])  # no target judged on the CPU


def test_step_memory_smoke_runs_every_kind_of_run(tmp_path):
    out = tmp_path / "memory.json"
    runs = ["eager", "compiled", "compiled-plain", "budget=0.5"]
    args = ["--smoke", *runs, "--profile-step", "2", "--json", str(out)]
    smoke_run(["benchmarks/step_memory.py", *args])
    rows = json.loads(out.read_text(encoding="utf-8"))["rows"]
    assert [r["run"] for r in rows] == runs
    for r in rows:
        assert len(r["peaks_gib"]) == 3 and r["images_per_s"] > 0, r  # a peak slot per step
        assert len(r["step_s"]) == 2 and all(s > 0 for s in r["step_s"]), r
        # step 2's profile: the header, then the training step's own functions
        assert r["profile"][0].lstrip().startswith("ncalls"), r["profile"][:2]
        assert any("step.py" in line for line in r["profile"]), r["profile"]


def test_step_memory_finds_what_is_live_at_the_highest_point():
    from benchmarks.step_memory import live_at_peak

    def frames(name):
        return [{"filename": f"/x/site-packages/diffusers/{name}.py", "line": 1, "name": name}]

    gib = 2**30
    events = [  # a: 1 GiB, b: 2 GiB, a freed, c: 0.5 GiB: the highest point is a + b = 3 GiB
        {"action": "alloc", "addr": 1, "size": gib, "frames": frames("a")},
        {"action": "alloc", "addr": 2, "size": 2 * gib, "frames": frames("b")},
        {"action": "free_requested", "addr": 1, "size": gib},
        {"action": "alloc", "addr": 3, "size": gib // 2, "frames": frames("c")},
    ]
    found = live_at_peak({"device_traces": [events]})
    assert found == [(2.0, "diffusers/b.py:1 b"), (1.0, "diffusers/a.py:1 a")]


def test_generate_benchmark_times_every_run(tmp_path):
    out = tmp_path / "generate.json"
    run = smoke_run(
        ["benchmarks/generate.py", "--tiny", "--only", "sd15", "--steps", "2"]
        + ["--json", str(out)]
    )
    assert "| family | run | first image (s) |" in run.stdout
    result = json.loads(out.read_text(encoding="utf-8"))
    assert {"device", "torch", "diffusers", "sampler"} <= set(result["info"])
    runs = {r["run"]: r for r in result["rows"]}
    assert list(runs) == [
        "pipeline eager (SDPA)",
        "ours, no adapter",
        "ours, 4 fused adapters (rank 16)",
        "strength change (fused), then the next image",
        "ours, 1 nonlinear adapter (relu rank 16)",
        "pipeline compiled (max-autotune)",
    ]
    for r in runs.values():
        assert r["first_s"] > 0 and r["steady_s"] > 0, r
    # a fused strength change records nothing again and compiles nothing
    assert runs["strength change (fused), then the next image"]["note"] == (
        "recorded again 0×, compiled 0 new graphs"
    )
    assert result["judged"] == []  # no target judged on the CPU


def test_low_memory_benchmark_tiny_runs_ours_the_reference_and_fp8(tmp_path):
    """benchmarks/low_memory.py --tiny: a capped run of ours (fp8 and swapped blocks, as its
    tiny settings say), the checkpointed reference and the fp8 difference, each a process."""
    out = tmp_path / "low.json"
    args = ["--tiny", "--only", "fp8,ours-8,reference", "--steps", "3", "--json", str(out)]
    smoke_run(["benchmarks/low_memory.py", *args])
    result = json.loads(out.read_text(encoding="utf-8"))
    runs = result["runs"]
    assert set(runs) == {"fp8", "ours-8", "reference"}
    assert runs["ours-8"]["images_per_s"] > 0 and runs["reference"]["images_per_s"] > 0
    assert any(line.startswith("memory: 8.0 GiB free") for line in runs["ours-8"]["chosen"])
    assert any(line.startswith("blocks swapped: 2 of") for line in runs["ours-8"]["chosen"])
    assert 0 < runs["fp8"]["fp8 channel vs bf16"] < 0.2, runs["fp8"]
    assert all(r.get("met") is None and r.get("fits") is None for r in result["rows"])
