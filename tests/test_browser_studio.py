"""Studio mode end to end in headless Chromium: two users log in through Gradio's login page in two browser
contexts (two sessions, like two people) and each Library tab shows only that user's styles plus the shared one;
only the admin sees the Studio tab. The app runs as `launcher.py --listen` (reached at 127.0.0.1 only)."""
from __future__ import annotations



from http_support import launched_app, owned_style
from tests.browser_support import CHROMIUM, MARKS, screenshot

from engine.studio.accounts import Accounts

pytestmark = MARKS


def _login(context, url: str, user: str, password: str):
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.locator("input[type=text], input[name=username]").first.fill(user)
    page.locator("input[type=password]").first.fill(password)
    page.get_by_role("button", name="Login").click()
    page.locator("#tab-library-button, button:has-text('Library')").first.wait_for()
    return page


def _library_text(page) -> str:
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Library").click()
    expect(page.locator("#lib-count")).to_contain_text("style")
    page.locator("#lib-style input").first.click()  # open the picker: its options are the listed styles
    text = page.locator("#lib-count").inner_text() + "\n" + page.locator("[role=listbox]").first.inner_text()
    page.keyboard.press("Escape")
    return text


def test_two_users_in_two_browsers_each_see_only_their_own_library(tmp_path):
    from playwright.sync_api import sync_playwright

    with launched_app(tmp_path, "--listen") as app:
        acc = Accounts(app.data_dir / "stylebooth.db")
        acc.add("ann", "ann-password")
        acc.add("bob", "bob-password")
        owned_style(app.data_dir, tmp_path, "Ann heart", "ann")
        owned_style(app.data_dir, tmp_path, "Bob star", "bob")
        owned_style(app.data_dir, tmp_path, "Studio ink", "bob", shared=True)
        admin_pw = app.one_time_password()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
            try:
                ann = _login(browser.new_context(viewport={"width": 1280, "height": 1000}), app.url, "ann",
                             "ann-password")
                bob = _login(browser.new_context(viewport={"width": 1280, "height": 1000}), app.url, "bob",
                             "bob-password")
                a, b = _library_text(ann), _library_text(bob)
                screenshot(ann, "studio-ann-library.png")
                screenshot(bob, "studio-bob-library.png")
                assert "2 styles" in a and "Ann heart" in a and "Studio ink" in a and "Bob star" not in a, a
                assert "2 styles" in b and "Bob star" in b and "Studio ink" in b and "Ann heart" not in b, b
                assert ann.locator("#tab-studio-button").count() == 0 or not ann.get_by_role(
                    "tab", name="Studio").is_visible()
                boss = _login(browser.new_context(viewport={"width": 1280, "height": 1000}), app.url, "admin",
                              admin_pw)
                boss.get_by_role("tab", name="Studio").wait_for()
                assert "3 styles" in _library_text(boss)
            finally:
                browser.close()
