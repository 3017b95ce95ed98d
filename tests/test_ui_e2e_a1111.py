"""Issue 32 in a real browser (Playwright + Chromium, 1280×800 and 800×1000): refused numbers
never break the page, what was typed survives a reload, adapters are found where a new user
keeps them, the result comes into view at 800 px, and A1111 habits (Ctrl+Enter) work."""

from __future__ import annotations

import pytest
import torch
from conftest import make_adapter_file
from test_ui_e2e import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, free_port, pick
from test_ui_e2e_mix import expect, fill, set_number

from sdlora.bases.base import load_base

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH")
TIMEOUT_MS = 30_000
WIDE = {"width": 1280, "height": 800}
NARROW = {"width": 800, "height": 1000}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on the tiny base with adapter `style`, served locally."""
    from sdlora.ui.app import build_app, launch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ui-a1111")
    adapters = root / "adapters"
    adapters.mkdir()
    make_adapter_file(lambda: load_base("tiny"), adapters / "style.safetensors", seed=1)
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


def open_page(browser, url: str, view: dict):
    context = browser.new_context(viewport=view)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.locator("#generate").wait_for(state="visible")
    return page


def stored(page) -> str:
    return page.evaluate("localStorage.getItem('sdlora-mixer') || ''")


def kept(page, before: str) -> None:
    """Wait until the page state in browser storage has been written since `before`."""
    page.wait_for_function(
        "b => (localStorage.getItem('sdlora-mixer') || '') !== b", arg=before, timeout=TIMEOUT_MS
    )


def set_seed(page, text: str) -> None:
    box = page.locator("#seed").get_by_role("textbox")
    box.fill(text)
    box.press("Enter")


@pytest.mark.parametrize("view", [NARROW, WIDE], ids=["800", "1280"])
def test_refused_numbers_leave_the_page_answering(server, browser, view):
    """A 25-digit seed (or 2e30 anywhere) is refused beside Generate, and the page still answers:
    each refusal names its own value, and a valid seed then generates."""
    page = open_page(browser, server["url"], view)
    page.click("#interrupt")  # nothing running: said so, no "Interrupting…" left behind
    expect()(page.locator("#mix-status")).to_contain_text("Nothing is running")
    fill(page, "#prompt", "a red circle")
    set_number(page, "#steps", "2")
    status = page.locator("#mix-status")
    for text in ["1234567890123456789012345", "2e30", "-1e30x", "1.5"]:
        set_seed(page, text)
        page.click("#generate")
        expect()(status).to_contain_text(text.rstrip("x") if text != "2e30" else "(got 2000")
    set_seed(page, "7")
    set_number(page, "#width", "1e30")
    page.click("#generate")
    expect()(status).to_contain_text("Width")
    set_number(page, "#width", "0")
    page.click("#generate")  # a 25-digit seed then Generate works
    expect()(status).to_contain_text("1 image(s)")
    expect()(status).to_contain_text("seed 7")
    assert page.locator(".toast-body").count() == 0

    # a refused seed kept in storage does not come back after a reload; the prompt does
    before = stored(page)
    set_seed(page, "99999999999999999999999999")
    kept(page, before)
    page.wait_for_timeout(500)  # the last change's write (always the last one wins)
    page.reload()
    page.locator("#generate").wait_for(state="visible")
    expect()(page.locator("#prompt").get_by_role("textbox")).to_have_value("a red circle")
    expect()(page.locator("#seed").get_by_role("textbox")).to_have_value("-1")
    page.context.close()


def test_typed_text_survives_a_reload(server, browser):
    """Prompt, negative prompt and steps typed without a Generate are all there after a reload."""
    page = open_page(browser, server["url"], WIDE)
    before = stored(page)
    fill(page, "#prompt", "a green ring, typed and never generated")
    fill(page, "#negative", "blurry")
    set_number(page, "#steps", "9")
    set_seed(page, "-7")
    kept(page, before)
    page.wait_for_timeout(500)  # the last change's write (always the last one wins)
    page.reload()
    page.locator("#generate").wait_for(state="visible")
    expect()(page.locator("#prompt").get_by_role("textbox")).to_have_value(
        "a green ring, typed and never generated"
    )
    expect()(page.locator("#negative").get_by_role("textbox")).to_have_value("blurry")
    expect()(page.locator("#steps input[type=number]")).to_have_value("9")
    expect()(page.locator("#seed").get_by_role("textbox")).to_have_value("-7")
    ARTIFACTS.mkdir(exist_ok=True)
    page.context.close()


def test_a_fresh_ui_started_as_the_readme_says_lists_the_adapter_it_trained(
    browser, tmp_path, monkeypatch
):
    """The README trains into runs/style/ and then starts `sdlora ui`: the adapter is listed
    without any flag, and a run finished while the page is open appears on Refresh."""
    from test_readme import LINES

    from sdlora.cli import build_parser
    from sdlora.ui.app import launch
    from sdlora.ui.command import app_from_args

    commands = [argv for line in LINES for argv in line if argv[0] == "sdlora"]
    trained = next(argv[argv.index("--lora") + 1] for argv in commands if "--lora" in argv)
    ui = next(argv for argv in commands if argv[1] == "ui")
    monkeypatch.chdir(tmp_path)
    make_adapter_file(lambda: load_base("tiny"), tmp_path / trained, seed=3)
    args = build_parser().parse_args(ui[1:])
    app = app_from_args(args)
    port = free_port()
    launch(app, host="127.0.0.1", port=port, block=False)
    try:
        page = open_page(browser, f"http://127.0.0.1:{port}/", WIDE)
        name = trained.removesuffix(".safetensors")
        page.click("#adapter-pick input")
        expect()(page.get_by_role("option", name=name, exact=True)).to_be_visible()
        page.keyboard.press("Escape")
        later = tmp_path / "runs" / "later" / "later.safetensors"
        make_adapter_file(lambda: load_base("tiny"), later, seed=4)
        page.click("#refresh")
        expect()(page.locator("#add-status")).to_contain_text("refreshed")
        page.click("#adapter-pick input")
        expect()(page.get_by_role("option", name="runs/later/later", exact=True)).to_be_visible()
        page.context.close()
    finally:
        app.close()


def test_ctrl_enter_generates_and_the_result_comes_into_view_at_800_px(server, browser):
    """A1111's Ctrl+Enter in the prompt generates (Enter stays a new line); at 800 px wide the
    result sits under the controls, and the page scrolls it into view."""
    page = open_page(browser, server["url"], NARROW)
    box = page.locator("#prompt").get_by_role("textbox")
    box.fill("a red circle")
    box.press("Enter")
    expect()(box).to_have_value("a red circle\n")
    assert page.locator("#mix-status").inner_text().strip() == ""  # Enter did not generate
    set_number(page, "#steps", "2")
    box.press("Control+Enter")
    expect()(page.locator("#mix-status")).to_contain_text("1 image(s)")
    image = page.locator("#result img").first
    image.wait_for(state="visible")
    page.wait_for_function("document.querySelector('#result img').complete")
    page.wait_for_timeout(300)  # the scroll runs just after the result is drawn
    rect = image.evaluate("e => { const r = e.getBoundingClientRect(); return [r.top, r.bottom] }")
    assert 0 <= rect[0] and rect[1] <= NARROW["height"], rect
    page.screenshot(path=str(ARTIFACTS / "ui-mix-800.png"))
    page.context.close()


def test_a_bad_distilled_rank_is_told_beside_export(server, browser):
    """Rank 0, -3 or 2.5 were a bare "Error" pill with "Starting…" forever, or silently 2."""
    page = open_page(browser, server["url"], WIDE)
    page.get_by_role("tab", name="Export").click()
    page.locator("#export-distill input").check()
    status = page.locator("#export-status")
    for typed, message in [
        ("0", "Distilled rank must be from 1 to 1024 (got 0)"),
        ("-3", "Distilled rank must be from 1 to 1024 (got -3)"),
        ("2.5", "Distilled rank must be a whole number (got 2.5)"),
    ]:
        set_number(page, "#export-rank", typed)
        page.click("#export")
        expect()(status).to_contain_text(message)
    assert page.locator(".toast-body").count() == 0
    page.context.close()


def test_shared_prompt_weights_are_clamped_with_a_note_or_taken_in_extended_range(server, browser):
    page = open_page(browser, server["url"], WIDE)
    fill(page, "#prompt", "a red circle <lora:style:1.2>")
    set_number(page, "#steps", "2")
    page.click("#generate")
    status = page.locator("#mix-status")
    expect()(status).to_contain_text("<lora:style:1.2> clamped to 1")
    expect()(status).to_contain_text("1 image(s)")
    expect()(page.locator("#strength-0 input[type=number]")).to_have_value("1")
    page.locator("#extended input").check()
    expect()(page.locator("#add-status")).to_contain_text("from -1 to 2")
    fill(page, "#prompt", "a red circle <lora:style:-0.5>")
    page.click("#generate")
    expect()(status).to_contain_text("style -0.5")
    expect()(page.locator("#strength-0 input[type=number]")).to_have_value("-0.5")
    assert page.locator("#strength-0 input[type=number]").get_attribute("min") == "-1"
    page.locator("#extended input").uncheck()  # back to 0-1: clamped, and said so
    expect()(page.locator("#add-status")).to_contain_text("Clamped: style to 0")
    page.context.close()


def test_lora_card_click_adds_to_the_mix_and_search_filters(server, browser):
    """A trained adapter's card shows its sample image; a click adds it; search filters."""
    from PIL import Image

    run = server["root"] / "adapters" / "runs-like"
    (run / "samples").mkdir(parents=True, exist_ok=True)
    make_adapter_file(lambda: load_base("tiny"), run / "inked.safetensors", seed=5)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(run / "samples" / "step-10.png")
    page = open_page(browser, server["url"], WIDE)
    cards = page.locator("#cards")
    card = cards.get_by_role("button", name="Add runs-like/inked to the mix")
    expect()(card).to_be_visible()
    assert card.locator("img").get_attribute("src").startswith("data:image/png;base64,")
    expect()(cards.get_by_role("button", name="Add style to the mix")).to_be_visible()
    page.locator("#card-search").get_by_role("textbox").fill("ink")
    expect()(cards.get_by_role("button", name="Add style to the mix")).to_be_hidden()
    card.click()
    expect()(page.locator("#add-status")).to_contain_text("Added runs-like/inked")
    expect()(page.locator("#strength-0 input[type=number]")).to_have_value("1")
    page.context.close()


def test_compare_grid_is_drawn_at_the_largest_whole_zoom(server, browser):
    """Five cells were drawn at 1x in a 1216 px area while Mix used 7x."""
    page = open_page(browser, server["url"], WIDE)
    pick(page, "#adapter-pick", "style")
    page.click("#add-adapter")
    expect()(page.locator("#add-status")).to_contain_text("Added style")
    fill(page, "#prompt", "a red circle")
    set_number(page, "#steps", "1")
    page.get_by_role("tab", name="Compare").click()
    page.click("#compare")
    expect()(page.locator("#compare-status")).to_contain_text("Saved compare/")
    image = page.locator("#grid img").first
    image.wait_for(state="visible")
    page.wait_for_function("document.querySelector('#grid img').complete")
    box = image.bounding_box()
    natural = image.evaluate("e => [e.naturalWidth, e.naturalHeight]")
    zoom = box["width"] / natural[0]
    room = page.locator("#grid").bounding_box()["width"]
    assert zoom >= 2 and zoom == int(zoom) and box["height"] == natural[1] * zoom, (box, natural)
    assert natural[0] * (zoom + 1) > room or natural[1] * (zoom + 1) > 600, (zoom, room)
    assert image.evaluate("e => getComputedStyle(e).imageRendering") == "pixelated"
    page.context.close()


def test_lightbox_opens_on_a_result_and_closes_with_esc(server, browser):
    page = open_page(browser, server["url"], WIDE)
    fill(page, "#prompt", "a blue square")
    set_number(page, "#steps", "1")
    page.click("#generate")
    image = page.locator("#result img").first
    image.wait_for(state="visible")
    page.wait_for_function("document.querySelector('#result img').complete")
    image.click()
    dialog = page.get_by_role("dialog", name="Image, large (click or Esc closes)")
    expect()(dialog).to_be_visible()
    large = dialog.locator("img").bounding_box()
    natural = image.evaluate("e => e.naturalWidth")
    assert large["width"] > image.bounding_box()["width"] and large["width"] % natural == 0
    assert large["height"] <= WIDE["height"]
    page.screenshot(path=str(ARTIFACTS / "ui-lightbox.png"))
    page.keyboard.press("Escape")
    expect()(dialog).to_be_hidden()
    thumb = page.locator("#history .thumbnail-item").first  # its caption no longer covers it
    expect()(thumb).to_be_visible()
    assert not thumb.locator(".caption-label").is_visible()
    assert "Interrupting" not in page.locator("#mix-status").inner_text()  # Esc closed only
    page.context.close()


def test_interrupt_keeps_a_partial_image(server, browser):
    page = open_page(browser, server["url"], WIDE)
    fill(page, "#prompt", "a yellow star")
    set_number(page, "#steps", "150")
    page.click("#generate")
    expect()(page.locator("#mix-status")).to_contain_text("step")
    page.keyboard.press("Escape")  # A1111's key for Interrupt
    expect()(page.locator("#mix-status")).to_contain_text("the partial image is shown")
    expect()(page.locator("#result figcaption").first).to_contain_text("partial")
    image = page.locator("#result img").first
    image.wait_for(state="visible")
    page.wait_for_function("document.querySelector('#result img').complete")
    assert image.evaluate("e => e.naturalWidth") > 0
    page.context.close()


def test_rows_have_names_that_say_which_adapter(server, browser):
    """Each row's checkbox and button were all named "on" and "Remove"."""
    page = open_page(browser, server["url"], NARROW)
    pick(page, "#adapter-pick", "style")
    page.click("#add-adapter")
    expect()(page.get_by_role("checkbox", name="Enable style")).to_be_checked()
    page.get_by_role("button", name="Remove style").click()
    expect()(page.locator("#remove-0")).to_be_hidden()
    ids = page.evaluate("[...document.querySelectorAll('[id]')].map(e => e.id).filter(id => id)")
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    page.context.close()


def test_png_info_restores_an_a1111_image(server, browser, tmp_path):
    """An image from A1111 (its `parameters` text): prompt, settings and the adapters found
    here are restored; the ones not here are named."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(
        "parameters",
        "a castle <lora:style:0.7> <lora:nothere:0.5>\nNegative prompt: blurry\n"
        "Steps: 12, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 64x64, Model: sd15",
    )
    dropped = tmp_path / "from-a1111.png"
    Image.new("RGB", (64, 64), (10, 20, 30)).save(dropped, pnginfo=info)
    page = open_page(browser, server["url"], WIDE)
    with page.expect_file_chooser() as chooser:
        page.click("#png-info")
    chooser.value.set_files(str(dropped))
    status = page.locator("#history-status")
    expect()(status).to_contain_text("Restored from-a1111.png")
    expect()(status).to_contain_text("Not here, left out: nothere")
    expect()(page.locator("#prompt").get_by_role("textbox")).to_have_value("a castle")
    expect()(page.locator("#negative").get_by_role("textbox")).to_have_value("blurry")
    expect()(page.locator("#seed").get_by_role("textbox")).to_have_value("1234")
    expect()(page.locator("#steps input[type=number]")).to_have_value("12")
    expect()(page.locator("#strength-0 input[type=number]")).to_have_value("0.7")
    assert not list((server["outputs"] / ".cache").rglob("from-a1111.png"))  # upload deleted
    page.context.close()


def test_switching_the_base_checks_the_mix_at_once(server, browser):
    page = open_page(browser, server["url"], WIDE)
    pick(page, "#adapter-pick", "style")
    page.click("#add-adapter")
    expect()(page.locator("#add-status")).to_contain_text("Added style")
    pick(page, "#base", "tiny-v2")
    expect()(page.locator("#add-status")).to_contain_text(
        "style is made for SD 1.x (tiny, sdlora built-in); the base tiny-v2 is SD 2.x"
    )
    pick(page, "#base", "tiny")
    expect()(page.locator("#add-status")).to_contain_text("Base tiny: the mix fits.")
    page.context.close()
