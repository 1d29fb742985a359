"""End to end in headless Chromium: the Feedback tab rates a round of images, refines the style and shows v(N) and
v(N+1) side by side (demo model, a 20-step heart LoRA); rating by keyboard (j/k/arrows, 1-5, +/-). Screenshot in tests/artifacts/feedback.png."""
from __future__ import annotations

import pytest

from tests.browser_support import MARKS, browser_page, free_port, screenshot

pytestmark = MARKS


@pytest.fixture(scope="module")
def app(tmp_path_factory, quick_subject):  # noqa: F811
    import torch

    from engine.api import Engine
    from engine.core.config import Settings
    from engine.styles.store import publish
    from ui.app import build_app, launch_options

    torch.set_num_threads(1)
    data = tmp_path_factory.mktemp("browser-feedback")
    eng = Engine(Settings(data_dir=str(data)))
    style = publish(eng.data_dir, "heart", quick_subject, quick_subject.parent / "style.json",
                    quick_subject.parent / "preview.png")
    demo = build_app(eng)
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                **launch_options(data))
    yield demo.local_url.rstrip("/"), eng, style
    demo.close()


def test_rate_refine_compare_in_the_browser(app):
    from playwright.sync_api import expect

    url, eng, style = app
    with browser_page(url, 1400) as page:
        page.locator("#tab-feedback-button, button[role=tab]:has-text('Feedback')").first.click()
        page.locator("#fb-style input").click()
        page.get_by_role("option", name=f"heart v1 ({style.id})").click()
        box = page.locator("#fb-prompts textarea")
        box.fill("a photo of a shape")
        page.locator("#fb-round").click()
        images = page.locator("#fb-gallery img")
        expect(page.locator("#fb-status")).to_contain_text("4 images", timeout=120_000)
        for i, button in ((0, "#fb-up"), (1, "#fb-down")):
            images.nth(i).click()
            expect(page.locator("#fb-status")).to_contain_text(f"image {i + 1} selected")
            page.locator(button).click()
            expect(page.locator("#fb-status")).to_contain_text(f"image {i + 1}: {5 if i == 0 else 1}/5")
        # keyboard: j / k move from the clicked image, 1-5 and +/- rate; typing in a field never rates
        for key, status in (("j", "image 3 selected"), ("2", "image 3: 2/5"), ("ArrowRight", "image 4 selected"),
                            ("+", "image 4: 5/5"), ("k", "image 3 selected"), ("4", "image 3: 4/5")):
            page.keyboard.press(key)
            expect(page.locator("#fb-status")).to_contain_text(status)
        page.locator("#fb-tags textarea, #fb-tags input").first.fill("3-")
        expect(page.locator("#fb-status")).to_contain_text("image 3: 4/5")
        steps = page.locator("#fb-refine").locator("xpath=..").locator("input[type=number]").first
        steps.fill("5")
        steps.press("Tab")
        page.locator("#fb-refine").click()
        expect(page.locator("#fb-status")).to_contain_text("v2 made", timeout=180_000)
        expect(page.locator("#fb-before img").first).to_be_visible()
        expect(page.locator("#fb-after img").first).to_be_visible()
        expect(page.locator("#fb-new textarea, #fb-new input").first).to_have_value(f"{style.id}@v2")
        screenshot(page, "feedback.png")
    assert [r.rating for r in eng.list_ratings(style.id, 1)] == [5, 1, 4, 5]  # images 1, 2, then 3 and 4 by key
    assert [v.version for v in eng.style_versions(style.id)] == [1, 2]
