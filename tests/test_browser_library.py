"""End to end in headless Chromium, issue 10: import two LoRAs in the Library tab and see their cards, blend them in
the Blend tab and save the blend, find it in the Generate tab's style picker, run a 2x2 X/Y batch and download the
zip. In-process app on the tiny random model (the pictures are noise; the wiring is what is tested); screenshots go
to tests/artifacts/."""
from __future__ import annotations

import zipfile

import pytest

from tests.browser_support import MARKS, browser_page, free_port, run_batch_and_download, screenshot

pytestmark = MARKS


@pytest.fixture(scope="module")
def app(tiny_sd, tmp_path_factory):
    from engine.api import Engine
    from engine.core.config import Settings
    from lora_support import trained_like_lora
    from ui.app import build_app, launch_options

    data = tmp_path_factory.mktemp("browser-library")
    loras = [trained_like_lora(tiny_sd, tmp_path_factory.mktemp(f"lora{k}"), seed=k) for k in (1, 2)]
    demo = build_app(Engine(Settings(model=str(tiny_sd), data_dir=str(data))))
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                **launch_options(data))
    yield demo.local_url.rstrip("/"), loras
    demo.close()


def _pick(page, dropdown: str, text: str) -> None:
    """Choose the option containing `text` in a Gradio dropdown."""
    page.locator(f"{dropdown} input").first.click()
    page.get_by_role("option").filter(has_text=text).first.click()


def test_library_blend_and_batch_in_the_browser(app, tmp_path):
    from playwright.sync_api import expect

    url, loras = app
    with browser_page(url, 1400) as page:
        expect(page.locator("#header")).to_contain_text("Model:")  # the app has loaded
        page.get_by_role("tab", name="Library").click()
        for name, lora in (("Ink", loras[0]), ("Wash", loras[1])):
            page.locator("#lib-import-file input[type=file]").set_input_files(str(lora))
            page.locator("#lib-import-name textarea, #lib-import-name input").first.fill(name)
            page.locator("#lib-import").click()
            expect(page.locator("#lib-status")).to_contain_text(f"Imported {name}", timeout=120_000)
        expect(page.locator("#lib-cards")).to_contain_text("Ink (")
        expect(page.locator("#lib-cards")).to_contain_text("Wash (")
        expect(page.locator("#lib-count")).to_contain_text("2 styles")
        screenshot(page, "library.png")

        page.get_by_role("tab", name="Blend").click()
        _pick(page, "#blend-style-0", "Ink (")
        _pick(page, "#blend-style-1", "Wash (")
        page.locator("#blend-name textarea, #blend-name input").first.fill("Ink and wash")
        page.locator("#blend-save").click()
        expect(page.locator("#blend-status")).to_contain_text("Saved Ink and wash", timeout=120_000)
        screenshot(page, "blend.png")

        page.get_by_role("tab", name="Generate").click()
        page.locator("#style input").first.click()
        expect(page.get_by_role("option").filter(has_text="Ink and wash (")).to_have_count(1)
        page.keyboard.press("Escape")

        box = page.locator("#steps input[type=number]").first
        box.fill("2")
        box.press("Tab")
        page.get_by_text("Batch: prompts × seeds × styles").click()
        page.locator("#batch-prompts textarea").fill("a red circle\na blue square")
        _pick(page, "#batch-styles", "Ink and wash (")
        page.keyboard.press("Escape")
        path = run_batch_and_download(page, tmp_path, 4)
        with zipfile.ZipFile(path) as z:
            assert sum(n.endswith(".png") for n in z.namelist()) == 5  # 2 prompts x 2 styles + the grid
        screenshot(page, "batch.png")
