"""Shared pieces of the end-to-end tests in headless Chromium (Debian's chromium, driven by Playwright)."""
from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
MARKS = [pytest.mark.browser,
         pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt install chromium)")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def browser_page(url: str, height: int):
    """A Chromium page on `url`, with a generous default timeout for a loaded 2-core machine."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1280, "height": height})
        pg.set_default_timeout(60_000)
        pg.goto(url)
        try:
            yield pg
        finally:
            browser.close()


def set_number(page, selector: str, value) -> None:
    """Type into the number box under `selector` (a Number, or a Slider's box) and leave it: Gradio commits a
    number box on blur."""
    box = page.locator(f"{selector} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")


def screenshot(page, name: str) -> None:
    """Save a full-page screenshot to tests/artifacts/ (kept out of git) for a human to look at."""
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n!.gitignore\n")
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def run_batch_and_download(page, folder: Path, images: int) -> Path:
    """Press the batch panel's Run, wait for `images` images and the X/Y grid, download the zip into `folder`."""
    from playwright.sync_api import expect

    page.locator("#batch-run").click()
    expect(page.locator("#batch-status")).to_contain_text(f"Done: {images} of {images} image(s)", timeout=180_000)
    expect(page.locator("#batch-grid img")).to_be_visible()
    with page.expect_download() as dl:
        page.locator("#batch-zip a").first.click()
    path = Path(folder) / "batch.zip"
    dl.value.save_as(path)
    return path
