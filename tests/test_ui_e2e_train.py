"""The Train tab end to end: the real app (toy base) on 127.0.0.1, two headless Chromium visitors.

A training run is the server's: another visitor generates while it trains, a reloaded page
finds it again, and Stop ends its process (checked by PID). A folder without images is refused
before anything starts. Screenshots are kept in test-artifacts/ (gitignored).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from test_ui_e2e import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, free_port, pick, screenshot

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)"
)
TIMEOUT_MS = 60_000  # per wait: the child process imports torch and diffusers on a busy CPU
STEPS = 100_000  # far more than the test lets it run: training is surely still going at the end


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on the toy base with a dataset (`shapes`) and a folder without images (`empty`)."""
    from sdlora.ui.app import build_app, launch

    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)  # the toy model gains nothing from threads on a busy 2-core box
    os.environ["OMP_NUM_THREADS"] = "1"  # nor does the training child process
    root = tmp_path_factory.mktemp("ui-e2e-train")
    shutil.copytree(Path(__file__).parents[1] / "samples" / "style", root / "datasets" / "shapes")
    (root / "datasets" / "empty").mkdir()
    (root / "datasets" / "empty" / "notes.txt").write_text("no pictures here")
    app = build_app("toy", root / "adapters", root / "datasets", root / "outputs", device="cpu")
    port = free_port()
    launch(app, host="127.0.0.1", port=port, block=False)
    yield {"url": f"http://127.0.0.1:{port}/", "root": root}
    app.close()
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = env


def step_shown(page) -> int:
    """The step number in the Train tab's status line ("… step 37 of 100000 …")."""
    found = re.search(r"step (\d+) of", page.locator("#train-status").inner_text())
    assert found, page.locator("#train-status").inner_text()
    return int(found[1])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_training_runs_beside_generation_survives_reload_and_stops(server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    from sdlora.ui.jobs import JOBS

    expect = sync_api.expect
    expect.set_options(timeout=TIMEOUT_MS)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            trainer = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
            trainer.set_default_timeout(TIMEOUT_MS)
            trainer.goto(server["url"])
            trainer.get_by_role("tab", name="Train").click()

            visitor = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
            visitor.set_default_timeout(TIMEOUT_MS)
            visitor.goto(server["url"])
            expect(visitor.locator("#generate")).to_be_visible()

            # a folder without images is refused at once, in the page's words
            pick(trainer, "#dataset", "empty")
            expect(trainer.locator("#dataset-info")).to_contain_text("no images found")
            started = time.monotonic()
            trainer.click("#train-start")
            expect(trainer.locator("#train-status")).to_contain_text(
                "Not started: dataset 'empty': no images found"
            )
            assert time.monotonic() - started < 5
            assert JOBS.running() is None
            refusal = trainer.locator("#train-status").inner_text()
            assert "--" not in refusal and str(server["root"]) not in refusal

            # the dataset is previewed before Start: how many images, thumbnails with captions
            pick(trainer, "#dataset", "shapes")
            expect(trainer.locator("#dataset-info")).to_contain_text("12 images")
            expect(trainer.locator("#dataset-preview img").first).to_be_visible()
            screenshot(trainer, "ui-train-preview.png")

            # the form starts at the toy base's values; a long run that samples now and then
            assert trainer.locator("#resolution input").input_value() == "64"
            assert trainer.locator("#train-lr input").input_value() == "0.001"
            trainer.locator("#train-name").get_by_role("textbox").fill("long")
            trainer.locator("#train-steps").get_by_role("spinbutton").fill(str(STEPS))
            trainer.locator("#sample-every").get_by_role("spinbutton").fill("20")
            trainer.click("#train-start")
            expect(trainer.locator("#train-status")).to_contain_text(
                f"of {STEPS}", timeout=TIMEOUT_MS
            )
            job_id = JOBS.running()
            job = JOBS.get(job_id)
            assert job is not None and alive(job.pid)

            # another visitor (their page open since before the Start) generates meanwhile:
            # their image is done while the training goes on, step after step
            before = job.status().step
            visitor.locator("#prompt").get_by_role("textbox").fill("a red circle")
            visitor.click("#generate")
            result = "#gallery img, #result img"  # the Mix tab's result (gallery, or HTML)
            visitor.locator(result).first.wait_for(state="visible")
            assert len(list((server["root"] / "outputs" / "images").glob("*.png"))) == 1
            assert JOBS.running() == job_id and alive(job.pid)
            assert before < job.status().step < STEPS

            # their Start says what runs instead of starting a second run, and offers to watch it
            visitor.get_by_role("tab", name="Train").click()
            pick(visitor, "#dataset", "shapes")
            visitor.locator("#train-name").get_by_role("textbox").fill("second")
            visitor.click("#train-start")
            expect(visitor.locator("#train-status")).to_contain_text("long is training now")
            assert JOBS.running() == job_id
            visitor.click("#train-attach")
            expect(visitor.locator("#train-status")).to_contain_text("Training long on shapes")
            expect(visitor.locator("#train-name").get_by_role("textbox")).to_have_value("long")
            expect(visitor.locator("#train-attach")).to_be_hidden()
            visitor.close()

            # a reload finds the run again: the step counter moves, loss and samples come in
            trainer.reload()
            trainer.get_by_role("tab", name="Train").click()
            expect(trainer.locator("#train-status")).to_contain_text(f"of {STEPS}")
            expect(trainer.locator("#train-name").get_by_role("textbox")).to_have_value(
                "long"
            )  # its settings
            expect(trainer.locator("#train-steps").get_by_role("spinbutton")).to_have_value(
                str(STEPS)
            )
            first = step_shown(trainer)
            expect(trainer.locator("#train-status")).not_to_contain_text(
                f"step {first} of", timeout=TIMEOUT_MS
            )
            assert step_shown(trainer) > first
            expect(trainer.locator("#train-status")).to_contain_text("images/s")
            expect(trainer.locator("#train-samples img").first).to_be_visible()
            ticks = trainer.locator('#loss-plot [aria-label^="X-axis"] .role-axis-label text')
            ticks.first.wait_for(state="attached")
            labels = [t for t in ticks.evaluate_all("ts => ts.map(t => t.textContent)") if t]
            assert labels and all(re.fullmatch(r"[\d,]+", t) for t in labels), labels
            screenshot(trainer, "ui-train-live.png")

            # Stop ends the process, and says there is no checkpoint to resume from yet
            trainer.click("#train-stop")
            expect(trainer.locator("#train-status")).to_contain_text("Stopped at step")
            expect(trainer.locator("#train-status")).to_contain_text("nothing to resume")
            assert not alive(job.pid)
            screenshot(trainer, "ui-train-stopped.png")
            assert JOBS.running() is None and not job.status().running
            assert not (server["root"] / "adapters" / "long.safetensors").exists()
        finally:
            for job_id in [JOBS.running()]:
                if job_id:
                    JOBS.get(job_id).stop()
            browser.close()
