"""End to end in headless Chromium: upload images in the Train tab, train 4 steps, watch progress, loss and previews,
then pick the new style in the Generate tab and generate with it.

Runs the app in-process with the tiny random model (the pictures are noise; the wiring is what is tested) and
saves a screenshot to tests/artifacts/train.png for a human to look at.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.browser_support import MARKS, browser_page, free_port, screenshot, set_number
from PIL import Image, ImageDraw

pytestmark = MARKS


@pytest.fixture(scope="module")
def app_url(tiny_sd, tmp_path_factory):
    import torch

    from engine.core.config import Settings
    from engine.api import Engine
    from ui.app import build_app, launch_options

    torch.set_num_threads(1)
    data = tmp_path_factory.mktemp("browser-train-data")
    demo = build_app(Engine(Settings(model=str(tiny_sd), data_dir=str(data))))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("engine.train.output.PREVIEW_STEPS", 2)  # previews with 2 denoising steps: the wiring, not the pictures
        demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                    **launch_options(data))
        yield demo.local_url.rstrip("/")
        demo.close()


@pytest.fixture(scope="module")
def page(app_url):
    with browser_page(app_url, 1400) as pg:
        yield pg


def _images(folder: Path, n: int = 4) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(img).polygon([(32, 56), (8, 24), (20, 10), (32, 20), (44, 10), (56, 24)],
                                    fill=("red", "magenta", "crimson", "purple")[i])
        img.save(folder / f"heart{i}.png")
        out.append(str(folder / f"heart{i}.png"))
    return out


def test_train_then_generate_with_the_new_style(page, tmp_path):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Train").click()
    page.locator("#train-images input[type=file]").set_input_files(_images(tmp_path))
    expect(page.locator("#train-images")).to_contain_text("heart3")
    page.locator("#style-name textarea, #style-name input").first.fill("browser heart")
    set_number(page, "#train-steps", 4)
    page.locator("#train-advanced").get_by_text("Advanced").click()
    set_number(page, "#num-class-images", 2)
    set_number(page, "#validation-steps", 2)
    # 4 tiny steps take about a second: record what the status box and its progress bar show while training.
    page.evaluate("""() => { window.seen = new Set(); window.rec = setInterval(() => {
        const box = document.querySelector('#train-status');
        window.seen.add(box.querySelector('textarea').value); window.seen.add(box.innerText); }, 10); }""")
    page.locator("#train").click()
    expect(page.locator("#train-previews img").first).to_be_visible(timeout=120_000)
    expect(page.locator("#train-result")).to_contain_text("is ready", timeout=180_000)
    expect(page.locator("#train-status textarea")).to_have_value(
        "Done: style “browser heart” trained in 4 steps. Go to Generate to use it.")
    seen = page.evaluate("() => { clearInterval(window.rec); return [...window.seen]; }")
    assert any(re.search(r"step [1-4]/4 · loss \d\.\d{4} · ETA \d+ s", t) for t in seen), seen
    assert page.locator("#train-previews img").count() == 4  # the preset's 2 preview prompts at steps 2 and 4
    expect(page.locator("#loss-plot canvas, #loss-plot svg").first).to_be_visible()
    expect(page.locator("#train-result-image img")).to_be_visible()
    # Evaluation at each checkpoint (engine/train/evaluate.py; the tiny model has no scorer): the grid, the note,
    # and the last checkpoint published as the style's next version.
    expect(page.locator("#eval-note")).to_contain_text("not available")
    expect(page.locator("#eval-grid img").first).to_be_visible()
    expect(page.locator("#eval-checkpoint input").first).to_have_value("step 4 · scores not available")
    page.locator("#publish-checkpoint").click()
    expect(page.locator("#train-status textarea")).to_have_value(
        re.compile("^Checkpoint 4 published as style “browser heart” v2"), timeout=60_000)
    screenshot(page, "train.png")

    page.get_by_role("tab", name="Generate").click()
    page.locator("#style input").first.click()
    page.get_by_role("option", name="browser heart").first.click()
    page.locator("#prompt textarea").fill("a photo of olis shape")
    set_number(page, "#steps", 2)
    page.locator("#generate").click()
    expect(page.locator("#status")).to_contain_text("Done: 1 image(s)", timeout=120_000)
    expect(page.locator("#gallery img").first).to_be_visible()
    screenshot(page, "train-generate.png")


def test_save_and_load_config_and_the_example_button(page, tmp_path):
    """The TOML round trip through Gradio's real download and upload, then the one-click example."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Train").click()
    set_number(page, "#train-steps", 7)
    page.get_by_role("button", name="Save config (TOML)").click()
    link = page.locator("#config-file a")
    expect(link.first).to_be_visible()
    with page.expect_download() as dl:
        link.first.click()
    saved = tmp_path / "run.toml"
    dl.value.save_as(saved)
    assert "max_train_steps = 7" in saved.read_text()
    set_number(page, "#train-steps", 3)
    with page.expect_file_chooser() as chooser:
        page.locator("#load-config").click()
    # The TOML goes up together with the images it names (issue 8 p1: it never reads a path on the server).
    chooser.value.set_files([str(saved), *_images(tmp_path / "again")])
    expect(page.locator("#train-status textarea")).to_have_value("Config loaded.")
    expect(page.locator("#train-images")).to_contain_text("heart3")
    expect(page.locator("#train-steps input[type=number]").first).to_have_value("7")
    page.get_by_role("button", name="Try the checkered example (style)").click()
    expect(page.locator("#train-images")).to_contain_text("checkered-4")
    expect(page.locator("#instance-prompt textarea")).to_have_value("a olis style shape")
    expect(page.locator("#preset input[value=style]")).to_be_checked()


def test_cancel_then_resume_in_the_browser(page):
    """Cancel stops the engine and lists the run under Interrupted runs; Resume finishes it from its checkpoint.

    Runs after the example test: the checkered images and the style preset (no class images) are in the form.
    """
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Train").click()
    set_number(page, "#train-steps", 200)  # enough to cancel mid-run; the style settings cost ~1.8x per step
    page.locator("#train").click()
    expect(page.locator("#train-status")).to_contain_text("step", timeout=60_000)  # the progress bar's text
    page.locator("#train-cancel").click()
    # The cancel handler's line or the run's own cancelled card, whichever lands last: both say so.
    expect(page.locator("#train-status textarea")).to_have_value(re.compile(r"^Cancelled"))
    choice = page.locator("#runs input").first
    expect(choice).to_have_value(re.compile(r"^checkered example · cancelled at step \d+/200$"))
    page.locator("#resume").click()
    expect(page.locator("#train-status textarea")).to_have_value(
        "Done: style “checkered example” trained in 200 steps. Go to Generate to use it.", timeout=300_000)
    expect(choice).to_have_value("")  # nothing left to resume


def test_full_fine_tuning_from_the_train_tab(page, tmp_path):
    """Method → Full fine-tuning: every weight trains, and the style the library gets (the extracted LoRA) is
    offered in Generate like any other."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Train").click()
    page.locator("#train-images input[type=file]").set_input_files(_images(tmp_path))
    expect(page.locator("#train-images")).to_contain_text("heart3")
    page.locator("#style-name textarea, #style-name input").first.fill("full heart")
    page.locator("#method").get_by_text("Full fine-tuning").click()
    # The demo example's LoRA rates (left by the tests before) become full fine-tuning's own.
    expect(page.locator("#train-status textarea")).to_have_value(re.compile(r"^Method: full fine-tuning\. Learning "
                                                                             r"rates set to 3e-05"))
    set_number(page, "#train-steps", 2)
    if not page.locator("#extract-rank").is_visible():
        page.locator("#train-advanced").get_by_text("Advanced").click()
    set_number(page, "#extract-rank", 4)
    set_number(page, "#validation-steps", 0)
    page.locator("#train").click()
    expect(page.locator("#train-result")).to_contain_text("is ready", timeout=180_000)
    expect(page.locator("#train-log textarea")).to_have_value(re.compile("LoRA extracted by SVD"))
    page.get_by_role("tab", name="Generate").click()
    page.locator("#style input").first.click()
    expect(page.get_by_role("option", name="full heart").first).to_be_visible()
    page.keyboard.press("Escape")
