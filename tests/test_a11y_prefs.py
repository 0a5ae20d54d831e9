"""Issue 11, choices kept in the browser and "Seeing": the mode and high contrast survive a reload, the
high-contrast theme passes axe's contrast checks, and the page reflows at 320 px and at 200% zoom."""

from __future__ import annotations

import pytest

from tests.servers import Server, data_dir
from tests.test_a11y_axe import AXE_JS, assert_clean
from tests.test_e2e_browser import open_settings, send, wait_idle, wait_ready


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    srv = Server(data_dir(tmp_path_factory, model_dir, "prefs-data")).start()
    yield srv
    srv.stop()


@pytest.fixture
def context(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.add_init_script(path=str(AXE_JS))
    yield ctx
    ctx.close()


def checked_mode(page) -> str:
    return page.evaluate("() => document.querySelector('#mode input[type=radio]:checked').value")


def test_mode_is_kept_per_browser(server, context):
    page = context.new_page()
    page.goto(server.base + "/")
    wait_ready(page)
    assert checked_mode(page) == "general"
    page.locator("#mode label", has_text="Scene description").click()
    page.reload()
    wait_ready(page)
    page.wait_for_function("() => document.querySelector('#mode input[value=scene]').checked", timeout=10_000)
    # Chosen through Gradio, so the mode's defaults are in Settings too (scene: temperature 0.3).
    open_settings(page)
    page.wait_for_function("() => document.querySelector('#temperature input[type=number]').value === '0.3'",
                           timeout=10_000)
    # Another browser (no shared storage) starts in the default mode.
    other = context.browser.new_context()
    try:
        fresh = other.new_page()
        fresh.goto(server.base + "/")
        wait_ready(fresh)
        assert checked_mode(fresh) == "general"
    finally:
        other.close()


def background(page, selector: str) -> str:
    return page.evaluate("(s) => getComputedStyle(document.querySelector(s)).backgroundColor", selector)


def test_high_contrast_theme(server, context):
    page = context.new_page()
    page.goto(server.base + "/")
    wait_ready(page)
    box = page.get_by_role("checkbox", name="High contrast")
    assert not box.is_checked() and background(page, "body") != "rgb(0, 0, 0)"
    box.check()
    assert page.evaluate("() => document.documentElement.classList.contains('vl-hc')")
    page.reload()  # kept
    wait_ready(page)
    assert page.get_by_role("checkbox", name="High contrast").is_checked()
    assert background(page, "body") == "rgb(0, 0, 0)"
    assert page.evaluate("() => getComputedStyle(document.querySelector('#stop')).color") == "rgb(255, 255, 0)"
    send(page, "Hello in high contrast.")
    page.locator("#chat [data-testid='bot']").first.wait_for(timeout=20_000)
    wait_idle(page)
    assert_clean(page, "in high contrast after an answer")


def test_system_more_contrast_turns_it_on(server, browser):
    ctx = browser.new_context(contrast="more")
    try:
        page = ctx.new_page()
        page.goto(server.base + "/")
        wait_ready(page)
        assert page.get_by_role("checkbox", name="High contrast").is_checked()
        assert background(page, "body") == "rgb(0, 0, 0)"
    finally:
        ctx.close()


CONTROLS = ["#input textarea", "#stop", "#regenerate", "#mode", "#detail", "#speech-controls", "#vl-display",
            "#settings"]


@pytest.mark.parametrize("width", [320, 640])
def test_reflow_without_sideways_scrolling(server, browser, width):
    """320 CSS px (a phone, WCAG 1.4.10) and 640 (a 1280 px window at 200% zoom): every control fits the width
    and nothing scrolls sideways, even with a long unbroken answer."""
    ctx = browser.new_context(viewport={"width": width, "height": 800})
    try:
        page = ctx.new_page()
        page.goto(server.base + "/")
        wait_ready(page)
        send(page, "x" * 300)  # an unbroken word in the question, and the tiny model's noise in the answer
        page.locator("#chat [data-testid='bot']").first.wait_for(timeout=20_000)
        wait_idle(page)
        sizes = page.evaluate("() => [document.documentElement.scrollWidth, document.body.scrollWidth]")
        assert max(sizes) <= width, sizes
        for selector in CONTROLS:
            box = page.locator(selector).first.bounding_box()
            assert box is not None and box["width"] > 0, selector
            assert box["x"] >= 0 and box["x"] + box["width"] <= width + 0.5, (selector, box)
    finally:
        ctx.close()


def test_radio_groups_move_with_the_arrow_keys(server, context):
    """Mode and Image detail are radio groups: Tab reaches the chosen option, the arrow keys choose another
    (and the page acts on it: the mode's defaults load into Settings)."""
    page = context.new_page()
    page.goto(server.base + "/")
    wait_ready(page)
    page.locator("#mode input:checked").focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_function("() => document.querySelector('#mode input[value=troubleshoot]').checked", timeout=5_000)
    open_settings(page)
    page.wait_for_function("() => document.querySelector('#temperature input[type=number]').value === '0.2'",
                           timeout=10_000)
    page.locator("#detail input:checked").focus()
    page.keyboard.press("ArrowLeft")
    page.wait_for_function("() => document.querySelector('#detail input[value=low]').checked", timeout=5_000)
    names = page.evaluate("() => Array.from(document.querySelectorAll('#mode input, #detail input')).map(i => i.name)")
    assert set(names) == {"vl-mode", "vl-detail"}, names
