"""The web UI end to end: the real app on 127.0.0.1, driven by a headless Chromium (Playwright)
and by `gradio_client`. Screenshots are kept in test-artifacts/ (gitignored)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import make_adapter_file
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from sdlora.bases.base import load_base

ARTIFACTS = Path(__file__).parents[1] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 120_000  # per wait; a generation on a busy CPU can take a while


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app serving two adapters (`style`, `detail`) and a dataset (`shapes`) locally."""
    from sdlora.ui.app import build_app, launch

    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)  # the tiny model gains nothing from threads on a busy 2-core box
    os.environ["OMP_NUM_THREADS"] = "1"  # nor does the training child process
    root = tmp_path_factory.mktemp("ui-e2e")
    adapters = root / "adapters"
    adapters.mkdir()
    make_adapter_file(lambda: load_base("tiny"), adapters / "style.safetensors", seed=1)
    make_adapter_file(lambda: load_base("tiny"), adapters / "detail.safetensors", rank=2, seed=2)
    shutil.copytree(Path(__file__).parents[1] / "samples" / "style", root / "datasets" / "shapes")
    app = build_app("tiny", adapters, root / "datasets", root / "outputs", device="cpu")
    port = free_port()
    launch(app, host="127.0.0.1", port=port, block=False)
    yield {"url": f"http://127.0.0.1:{port}/", "root": root, "outputs": root / "outputs"}
    app.close()
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = env


def pick(page, dropdown: str, option: str) -> None:
    page.click(f"{dropdown} input")
    page.get_by_role("option", name=option, exact=True).click()


def screenshot(page, name: str) -> Path:
    """Keep a full-page screenshot in test-artifacts/ and check that it is a real PNG."""
    path = ARTIFACTS / name
    path.unlink(missing_ok=True)
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.width >= 1000 and image.height >= 600
    return path


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")
def test_browser_mix_generate_export(server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(server["url"])

            # a mistake is a message beside the button, not a traceback
            page.click("#generate")
            status = page.locator("#mix-status")
            sync_api.expect(status).to_contain_text("write a prompt first")
            assert "Traceback" not in status.inner_text()

            # two adapters into the mix, each with its own strength
            for slot, (name, strength) in enumerate([("style", "0.8"), ("detail", "0.35")]):
                pick(page, "#adapter-pick", name)
                page.click("#add-adapter")
                box = page.locator(f"#strength-{slot} input[type=number]")
                box.wait_for(state="visible")
                box.fill(strength)
                box.press("Enter")
            assert page.locator("#meta-1").inner_text().startswith("rank 2")

            page.locator("#prompt").get_by_role("textbox").fill("a red circle on the left")
            steps = page.locator("#steps input[type=number]")
            steps.fill("2")
            steps.press("Enter")
            page.click("#generate")
            page.locator("#result img").first.wait_for(state="visible")
            sync_api.expect(page.locator("#mix-status")).to_contain_text("style 0.8, detail 0.35")
            images = list((server["outputs"] / "images").glob("*.png"))
            assert len(images) == 1
            recipe = json.loads(Image.open(images[0]).text["sdlora"])  # what the browser sent
            assert recipe["prompt"] == "a red circle on the left" and recipe["steps"] == 2
            assert recipe["adapters"] == {"style": 0.8, "detail": 0.35}
            screenshot(page, "ui-mix.png")

            # another visitor: their own, empty mix; a file added since startup is listed;
            # its trigger words click into the prompt; Remove takes it out of the mix
            late = server["root"] / "adapters" / "late.safetensors"
            with safe_open(server["root"] / "adapters" / "style.safetensors", "pt") as f:
                metadata = f.metadata() | {"sdlora_trigger_words": '["zxq style"]'}
                save_file({k: f.get_tensor(k) for k in f.keys()}, late, metadata)
            other = browser.new_page(viewport={"width": 1400, "height": 1100})
            other.set_default_timeout(TIMEOUT_MS)
            other.goto(server["url"])
            sync_api.expect(other.locator("#generate")).to_be_visible()
            assert not other.locator("#remove-0").is_visible()
            pick(other, "#adapter-pick", "late")
            other.click("#add-adapter")
            other.locator("#prompt").get_by_role("textbox").fill("a cat")
            other.locator("#slot-0").get_by_text("zxq style", exact=True).click()  # not its card
            sync_api.expect(other.locator("#prompt").get_by_role("textbox")).to_have_value(
                "a cat, zxq style"
            )
            other.click("#remove-0")
            sync_api.expect(other.locator("#remove-0")).to_be_hidden()
            assert page.locator("#remove-1").is_visible()  # the first visitor's mix is intact
            other.close()
            late.unlink()

            # export the same mix as a single-file checkpoint
            page.get_by_role("tab", name="Export").click()
            page.get_by_label("single file (A1111 / ComfyUI checkpoint)").check()
            page.locator("#export-name").get_by_role("textbox").fill("e2e-mix")
            page.click("#export")
            sync_api.expect(page.locator("#export-status")).to_contain_text(
                "Wrote", timeout=TIMEOUT_MS
            )
            assert (server["outputs"] / "exports" / "e2e-mix.safetensors").is_file()
            screenshot(page, "ui-export.png")

            # train one step on the dataset; the new adapter shows up in the Mix tab's list
            page.get_by_role("tab", name="Train").click()
            pick(page, "#dataset", "shapes")
            page.locator("#train-name").get_by_role("textbox").fill("fresh")
            page.locator("#train-steps").get_by_role("spinbutton").fill("1")
            page.locator("#resolution").get_by_role("spinbutton").fill("64")
            page.click("#train-start")
            sync_api.expect(page.locator("#train-status")).to_contain_text(
                "Done", timeout=4 * TIMEOUT_MS
            )
            assert (server["root"] / "adapters" / "fresh.safetensors").is_file()
            screenshot(page, "ui-train.png")
            page.get_by_role("tab", name="Mix").click()
            pick(page, "#adapter-pick", "fresh")
        finally:
            browser.close()


def test_api_refuses_path_escapes_and_foreign_uploads(server, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(server["url"], verbose=False)
    assert {"/generate", "/export", "/inspect", "/upload_adapter"} <= set(
        client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    )
    secret = server["root"] / "secret.safetensors"  # beside the adapters folder, not in it
    shutil.copy(server["root"] / "adapters" / "style.safetensors", secret)
    link = server["root"] / "adapters" / "link.safetensors"
    link.symlink_to(secret)  # a symlink that leads out of the adapters folder
    refused = "not allowed|outside its folder"  # the messages of paths.inside
    escapes = ["../secret", "../../etc/passwd", str(secret), "/etc/passwd", "a/../../secret"]
    try:
        for name in [*escapes, "link"]:
            with pytest.raises(AppError, match=refused):
                client.predict("x", {name: 1.0}, steps=1, api_name="/generate")
            with pytest.raises(AppError, match=refused):
                client.predict(name, api_name="/inspect")
            with pytest.raises(AppError, match=refused):
                client.predict({name: 1.0}, "lora", name="leak", api_name="/export")
    finally:
        link.unlink()
    for name in ["../evil", "/tmp/evil", "sub/evil", ".hidden"]:
        with pytest.raises(AppError, match="export name"):
            client.predict({}, "lora", name=name, api_name="/export")
    for base in ["/etc", "../adapters", str(server["root"])]:
        with pytest.raises(AppError, match="base"):
            client.predict("x", {}, steps=1, base=base, api_name="/generate")

    def adapter_files() -> list[str]:
        return sorted(p.name for p in (server["root"] / "adapters").iterdir())

    cache = server["outputs"] / ".cache"

    def cached() -> set:  # files with content (earlier tests' images stay until aged out)
        return {p for p in cache.rglob("*") if p.is_file() and p.stat().st_size}

    before, cached_before = adapter_files(), cached()
    text = tmp_path / "notes.txt"
    text.write_text("not an adapter")
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(os.urandom(64))
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04K\x01.")
    for upload, message in [
        (text, ".safetensors"),
        (fake, "safetensors"),
        (pickle, ".safetensors"),
    ]:
        with pytest.raises(AppError, match=message) as refused:
            client.predict(handle_file(str(upload)), api_name="/upload_adapter")
        said = str(refused.value)  # no path: not where the server keeps the upload
        assert "/" not in said, said
    assert adapter_files() == before  # nothing was added
    # uploads went to the UI's own cache under its outputs, and refused ones are gone from it
    # (Gradio leaves an empty temporary file per upload: aged out, and emptied at start)
    kept = cached() - cached_before
    assert cache.is_dir() and not kept, kept
    with pytest.raises(AppError, match="too long") as refused:  # issue 29: was a raw OSError
        client.predict("x", {"a" * 10_000: 0.5}, steps=1, api_name="/generate")
    assert len(str(refused.value)) < 400
    assert not list(server["outputs"].rglob("*evil*")) and not list(server["root"].rglob("leak*"))

    # nothing outside the outputs folder is served as a file
    for path in ["/etc/passwd", str(secret), f"{server['outputs']}/../secret.safetensors"]:
        response = httpx.get(f"{server['url']}gradio_api/file={path}")
        assert response.status_code in (403, 404), path


def test_api_generate_and_export_as_documented(server):
    """The README's gradio_client example: images carry their recipe; exports land in outputs."""
    from gradio_client import Client

    client = Client(server["url"], verbose=False)
    images = client.predict(
        "a red circle", {"style": 0.8, "detail": 0.35}, steps=2, seed=7, api_name="/generate"
    )
    assert len(images) == 1
    recipe = json.loads(Image.open(images[0]).text["sdlora"])
    assert recipe["seed"] == 7 and recipe["adapters"] == {"style": 0.8, "detail": 0.35}
    path = client.predict(
        {"style": 0.8, "detail": 0.35}, "lora", name="api-mix", api_name="/export"
    )
    assert path == "exports/api-mix.safetensors"
    assert (server["outputs"] / path).stat().st_size > 0
    assert "rank:" in client.predict("detail", api_name="/inspect")


def test_gpu_jobs_wait_in_the_queue(server, monkeypatch):
    """While one visitor's generation runs, another's waits in the queue, not beside it."""
    from gradio_client import Client
    from gradio_client.utils import Status

    from sdlora.ui import handlers

    running, release = threading.Event(), threading.Event()
    active, most = [0], [0]
    real_generate = handlers.generate

    def slow_generate(*args, **kwargs):
        active[0] += 1
        most[0] = max(most[0], active[0])
        running.set()
        release.wait(60)
        try:
            return real_generate(*args, **kwargs)
        finally:
            active[0] -= 1

    monkeypatch.setattr(handlers, "generate", slow_generate)
    first, second = Client(server["url"], verbose=False), Client(server["url"], verbose=False)
    a = first.submit("a", {"style": 1.0}, steps=1, api_name="/generate")
    assert running.wait(60)
    b = second.submit("b", {"detail": 1.0}, steps=1, api_name="/generate")
    deadline = time.monotonic() + 30
    while b.status().code != Status.IN_QUEUE and time.monotonic() < deadline:
        time.sleep(0.1)
    queued = b.status().code
    release.set()
    assert queued == Status.IN_QUEUE
    assert len(a.result(timeout=120)) == 1 and len(b.result(timeout=120)) == 1
    assert most[0] == 1
