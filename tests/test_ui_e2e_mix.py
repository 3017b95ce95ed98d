"""The Mix, History and Export pages in a real browser at 1280×800 (Playwright + Chromium):
the result in view at an integer zoom, errors kept beside the button that caused them without
blocking anything else, the mix kept across a reload, an image restored from History and drawn
again pixel for pixel, and an empty mix's export asked for first."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from conftest import make_adapter_file
from PIL import Image
from test_ui_e2e import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, free_port, pick

from sdlora.bases.base import load_base

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH")
TIMEOUT_MS = 30_000
VIEW = {"width": 1280, "height": 800}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on the tiny base with adapters `style` and `detail`, served locally."""
    from sdlora.ui.app import build_app, launch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ui-mix")
    adapters = root / "adapters"
    adapters.mkdir()
    make_adapter_file(lambda: load_base("tiny"), adapters / "style.safetensors", seed=1)
    make_adapter_file(lambda: load_base("tiny"), adapters / "detail.safetensors", rank=2, seed=2)
    app = build_app("tiny", adapters, root / "datasets", root / "outputs", device="cpu")
    port = free_port()
    launch(app, host="127.0.0.1", port=port, block=False)
    yield {"url": f"http://127.0.0.1:{port}/", "root": root, "outputs": root / "outputs"}
    app.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_page(browser, url: str):
    """A fresh browser context (its own storage) with the app loaded at 1280×800."""
    context = browser.new_context(viewport=VIEW)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.locator("#generate").wait_for(state="visible")
    return page


def expect():
    from playwright.sync_api import expect

    # as long as the pages' own waits: an interrupt lands after the current step, which on a
    # busy 2-core machine took over Playwright's 5 s default once (8 images at a time)
    expect.set_options(timeout=TIMEOUT_MS)
    return expect


def add(page, name: str, slot: int, strength: str | None = None) -> None:
    """Add adapter `name`, which lands in row `slot`, and set its strength."""
    pick(page, "#adapter-pick", name)
    page.click("#add-adapter")
    expect()(page.locator("#add-status")).to_contain_text(f"Added {name}")
    if strength is not None:
        set_number(page, f"#strength-{slot}", strength)


def fill(page, elem: str, text: str) -> None:
    page.locator(elem).get_by_role("textbox").fill(text)


def set_number(page, elem: str, value: str) -> None:
    box = page.locator(f"{elem} input[type=number]")
    box.fill(value)
    box.press("Enter")


def newest_images(outputs) -> list:
    return sorted((outputs / "images").glob("*.png"), key=lambda p: p.stat().st_mtime_ns)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_result_in_view_errors_stay_local_and_reload_keeps_the_mix(server, browser):
    page = open_page(browser, server["url"])
    # a mistake is a line beside its button; no toast, nothing else is covered
    page.click("#generate")
    expect()(page.locator("#mix-status")).to_contain_text("write a prompt first")
    assert page.locator(".toast-body").count() == 0

    add(page, "style", 0, "0.8")
    add(page, "detail", 1)
    pick(page, "#adapter-pick", "style")
    page.click("#add-adapter")  # a duplicate: refused beside Add, the rows stay usable
    expect()(page.locator("#add-status")).to_contain_text("already in the mix")
    assert page.locator(".toast-body").count() == 0
    set_number(page, "#strength-1", "0.35")
    set_number(page, "#strength-1", "1.5")  # out of the UI's range: refused, slider put back
    expect()(page.locator("#add-status")).to_contain_text("from 0 to 1")
    expect()(page.locator("#strength-1 input[type=number]")).to_have_value("0.35")

    fill(page, "#prompt", "a red circle")
    set_number(page, "#steps", "2")
    page.click("#generate")
    expect()(page.locator("#mix-status")).to_contain_text("style 0.8, detail 0.35")
    image = page.locator("#result img").first
    image.wait_for(state="visible")
    page.wait_for_function("document.querySelector('#result img').complete")
    box = image.bounding_box()
    natural = image.evaluate("e => [e.naturalWidth, e.naturalHeight]")
    assert box["x"] >= 0 and box["y"] >= 0, box  # the whole image is on screen, not scrolled
    assert box["x"] + box["width"] <= VIEW["width"] and box["y"] + box["height"] <= VIEW["height"]
    zoom = box["width"] / natural[0]
    assert zoom >= 2 and zoom == int(zoom) and box["height"] == natural[1] * zoom
    assert image.evaluate("e => getComputedStyle(e).imageRendering") == "pixelated"
    used_seed = newest_images(server["outputs"])[-1].stem.split("-")[2]
    expect()(page.locator("#result figcaption").first).to_contain_text(f"seed {used_seed}")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-mix-1280.png"))
    page.click("#reuse-seed")
    expect()(page.locator("#seed").get_by_role("textbox")).to_have_value(used_seed)

    page.reload()
    page.locator("#generate").wait_for(state="visible")
    expect()(page.locator("#strength-1 input[type=number]")).to_have_value("0.35")
    expect()(page.locator("#strength-0 input[type=number]")).to_have_value("0.8")
    expect()(page.locator("#prompt").get_by_role("textbox")).to_have_value("a red circle")
    assert not page.locator("#remove-2").is_visible()
    page.context.close()


def test_history_restores_and_redraws_pixel_for_pixel(server, browser):
    page = open_page(browser, server["url"])
    fill(page, "#prompt", "a blue square <lora:detail:0.6>")  # a tag adds the adapter
    set_number(page, "#steps", "2")
    fill(page, "#seed", "11")
    page.click("#generate")
    expect()(page.locator("#mix-status")).to_contain_text("detail 0.6")
    expect()(page.locator("#prompt").get_by_role("textbox")).to_have_value("a blue square")
    expect()(page.locator("#strength-0 input[type=number]")).to_have_value("0.6")
    first = newest_images(server["outputs"])[-1]

    # change everything, then restore from the image's own record
    fill(page, "#prompt", "something else")
    fill(page, "#seed", "99")
    set_number(page, "#strength-0", "0.1")
    page.locator("#history img").first.click()
    expect()(page.locator("#history-status")).to_contain_text("Restored")
    expect()(page.locator("#prompt").get_by_role("textbox")).to_have_value("a blue square")
    expect()(page.locator("#seed").get_by_role("textbox")).to_have_value("11")
    expect()(page.locator("#strength-0 input[type=number]")).to_have_value("0.6")
    before = len(newest_images(server["outputs"]))
    page.click("#generate")
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while len(newest_images(server["outputs"])) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    images = newest_images(server["outputs"])
    assert len(images) == before + 1 and "-11-" in images[-1].name
    assert np.array_equal(pixels(images[-1]), pixels(first))

    # another visitor's Generate says what it waits for; Interrupt stops the long generation
    # after its current step and saves nothing, and the waiting one then runs
    other = open_page(browser, server["url"])
    fill(other, "#prompt", "a yellow star")
    set_number(other, "#steps", "2")
    set_number(page, "#steps", "900")  # long enough to be running when Interrupt lands
    set_number(page, "#num-images", "8")
    page.click("#generate")
    expect()(page.locator("#mix-status")).to_contain_text("step")
    other.click("#generate")
    expect()(other.locator("#mix-status")).to_contain_text("busy generating")
    page.click("#interrupt")
    expect()(page.locator("#mix-status")).to_contain_text("interrupted at step")
    expect()(other.locator("#mix-status")).to_contain_text("1 image(s)")
    assert len(newest_images(server["outputs"])) == len(images) + 1
    other.context.close()
    page.context.close()


def test_export_error_leaves_mix_usable_and_empty_mix_asks_first(server, browser, tmp_path):
    page = open_page(browser, server["url"])
    page.get_by_role("tab", name="Export").click()
    expect()(page.locator("#export-plan")).to_contain_text("the base alone")
    page.get_by_label("single file (A1111 / ComfyUI checkpoint)").check()
    fill(page, "#export-name", "../escape")
    page.click("#export")
    expect()(page.locator("#export-status")).to_contain_text("export name")
    assert page.locator(".toast-body").count() == 0

    # a failed upload is told beside Upload in the page's words (no temporary paths)
    page.get_by_role("tab", name="Mix").click()
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a tensor file" * 4)
    with page.expect_file_chooser() as chooser:
        page.click("#upload")
    chooser.value.set_files(str(bad))
    expect()(page.locator("#add-status")).to_contain_text("broken.safetensors: not a readable")
    assert "/tmp" not in page.locator("#add-status").inner_text()

    # the Mix tab still works: the base dropdown opens and picks, Add works
    pick(page, "#base", "tiny")
    add(page, "style", 0)

    # Compare keeps to the same 0-1 range as the Mix sliders
    fill(page, "#prompt", "a red circle")
    page.get_by_role("tab", name="Compare").click()
    fill(page, "#x-values", "0, 1.5")
    page.click("#compare")
    expect()(page.locator("#compare-status")).to_contain_text("from 0 to 1 (got 1.5)")
    page.get_by_role("tab", name="Mix").click()
    page.click("#remove-0")
    expect()(page.locator("#remove-0")).to_be_hidden()

    # an empty mix is a full copy of the base: asked first, written only on the second press
    page.get_by_role("tab", name="Export").click()
    fill(page, "#export-name", "base-copy")
    page.click("#export")
    expect()(page.locator("#export-status")).to_contain_text("full copy of the base")
    target = server["outputs"] / "exports" / "base-copy.safetensors"
    assert not target.exists()
    page.click("#export-base")
    expect()(page.locator("#export-status")).to_contain_text("Wrote exports/base-copy.safetensors")
    assert target.stat().st_size > 0
    expect()(page.locator("#export-confirm")).to_be_hidden()
    page.context.close()
