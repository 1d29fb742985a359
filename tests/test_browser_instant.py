"""End to end in headless Chromium, issue 15: in the Library tab make an instant style from 2 reference images
(preview and reference strip come back), "Train it properly" into v2 of the same entry; in the Generate tab use the
instant style together with a trained LoRA style, then in a 2x2 X/Y batch (prompts x styles) and download the zip.
In-process app on the tiny random model with a random tiny IP-Adapter (the pictures are noise; the wiring is what
is tested, the recipes of the saved images say what was applied); screenshots go to tests/artifacts/."""
from __future__ import annotations

import zipfile

import pytest
from PIL import Image, ImageDraw

from tests.browser_support import MARKS, browser_page, free_port, run_batch_and_download, screenshot, set_number

pytestmark = MARKS


@pytest.fixture(scope="module")
def app(tiny_sd, tiny_ip_adapter, tmp_path_factory):
    import torch

    from engine.api import Engine
    from engine.core.config import Settings
    from lora_support import trained_like_lora
    from ui.app import build_app, launch_options

    torch.set_num_threads(1)
    data = tmp_path_factory.mktemp("browser-instant")
    engine = Engine(Settings(model=str(tiny_sd), data_dir=str(data), ip_adapter=str(tiny_ip_adapter)))
    lora = trained_like_lora(tiny_sd, tmp_path_factory.mktemp("instant-lora"), seed=4)
    demo = build_app(engine)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("engine.train.output.PREVIEW_STEPS", 2)  # the v2 run's previews: the wiring, not the pictures
        demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                    **launch_options(data))
        yield demo.local_url.rstrip("/"), engine, lora
        demo.close()


def _references(folder) -> list[str]:
    out = []
    for i, colour in enumerate(("orange", "teal")):
        img = Image.new("RGB", (64, 64), "navy")
        d = ImageDraw.Draw(img)
        for k in range(0, 64, 8):  # a checkerboard of 8 px squares in the colour
            for j in range(0, 64, 8):
                if (k + j) // 8 % 2 == 0:
                    d.rectangle([k, j, k + 7, j + 7], fill=colour)
        out.append(str(folder / f"ref{i}.png"))
        img.save(out[-1])
    return out


def _pick(page, dropdown: str, text: str) -> None:
    """Choose the option containing `text` in a Gradio dropdown."""
    page.locator(f"{dropdown} input").first.click()
    page.get_by_role("option").filter(has_text=text).first.click()


def _recipes(engine, before: set) -> list[dict]:
    new = sorted(set((engine.data_dir / "outputs").rglob("*.png")) - before)
    return [engine.read_recipe(p) for p in new]


def test_instant_style_create_train_generate_and_batch_in_the_browser(app, tmp_path):
    from playwright.sync_api import expect

    url, engine, lora = app
    with browser_page(url, 1800) as page:
        expect(page.locator("#header")).to_contain_text("Model:")  # the app has loaded
        page.get_by_role("tab", name="Library").click()
        # a trained LoRA style to combine with the instant one
        page.locator("#lib-import-file input[type=file]").set_input_files(str(lora))
        page.locator("#lib-import-name textarea, #lib-import-name input").first.fill("Ink")
        page.locator("#lib-import").click()
        expect(page.locator("#lib-status")).to_contain_text("Imported Ink", timeout=120_000)

        page.get_by_text("Instant style from reference images").click()
        page.locator("#instant-files input[type=file]").set_input_files(_references(tmp_path))
        expect(page.locator("#instant-files")).to_contain_text("ref1")
        page.locator("#instant-name textarea, #instant-name input").first.fill("Checks")
        page.locator("#instant-create").click()
        expect(page.locator("#instant-status")).to_contain_text("Checks", timeout=120_000)
        expect(page.locator("#instant-status")).to_contain_text("is ready")
        expect(page.locator("#instant-preview img")).to_be_visible()
        expect(page.locator("#instant-refs img")).to_have_count(2)
        sid = next(s.id for s in engine.list_styles() if s.name == "Checks")
        assert [v.kind for v in engine.style_versions(sid)] == ["instant"]
        screenshot(page, "instant-create.png")

        # "Train it properly": pick the entry in the Library's style picker, 2 steps, v2 of the same entry
        page.locator("#lib-refresh").click()
        _pick(page, "#lib-style", f"Checks ({sid}")
        expect(page.locator("#instant-refs img")).to_have_count(2)  # the card's references follow the picker
        set_number(page, "#instant-train-steps", 2)
        page.locator("#instant-train").click()
        expect(page.locator("#instant-status")).to_contain_text("v2 is ready", timeout=180_000)
        assert [v.kind for v in engine.style_versions(sid)] == ["instant", "lora"]
        screenshot(page, "instant-trained.png")

        # Generate: the instant style (its instant version, v1) on top of the imported LoRA style
        page.get_by_role("tab", name="Generate").click()
        _pick(page, "#instant-style", f"Checks ({sid})")
        _pick(page, "#style", "Ink (")
        page.locator("#prompt textarea").fill("a red circle")
        set_number(page, "#steps", 2)
        before = set((engine.data_dir / "outputs").rglob("*.png"))
        page.locator("#generate").click()
        expect(page.locator("#status")).to_contain_text("Done: 1 image(s)", timeout=120_000)
        expect(page.locator("#gallery img").first).to_be_visible()
        (recipe,) = _recipes(engine, before)
        ink = next(s.id for s in engine.list_styles() if s.name == "Ink")
        assert recipe["instant_style"] == sid and recipe["instant_style_version"] == 1
        assert recipe["instant_style_only"] is True and [x["id"] for x in recipe["styles"]] == [ink]
        screenshot(page, "instant-generate.png")

        # a 2x2 X/Y batch (2 prompts x no style / Ink), the instant style over all of it
        page.get_by_text("Batch: prompts × seeds × styles").click()
        page.locator("#batch-prompts textarea").fill("a red circle\na blue square")
        _pick(page, "#batch-styles", "Ink (")
        page.keyboard.press("Escape")
        before = set((engine.data_dir / "outputs").rglob("*.png"))
        path = run_batch_and_download(page, tmp_path, 4)
        with zipfile.ZipFile(path) as z:
            pngs = [n for n in z.namelist() if n.endswith(".png")]
            z.extractall(tmp_path / "zip")
        assert len(pngs) == 5  # 2 prompts x 2 styles + the grid
        cells = [r for r in (engine.read_recipe(tmp_path / "zip" / n) for n in pngs) if r]
        assert len(cells) == 4 and all(r["instant_style"] == sid for r in cells), cells
        assert sorted(len(r["styles"]) for r in cells) == [0, 0, 1, 1]  # the columns: no style, Ink
        screenshot(page, "instant-batch.png")
