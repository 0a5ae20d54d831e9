"""Accessibility: axe-core (bundled by axe-playwright-python) on the real page, under its real CSP.

axe is put into every page with `add_init_script` (Playwright installs it through the DevTools
protocol, before the page's own scripts, so the page's CSP, which has no 'unsafe-eval', does not
apply to it) and run with a function evaluation. The gate: no serious or critical violation on the
empty page, after a two-turn chat with an image, with the settings open, in dark mode and in forced
colours.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from tests.servers import Server, data_dir
from tests.test_e2e_browser import open_settings, send, wait_idle

AXE_JS = Path(__import__("axe_playwright_python").__file__).resolve().parent / "axe.min.js"
BLOCKING = {"serious", "critical"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    srv = Server(data_dir(tmp_path_factory, model_dir, "a11y-data")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "fractal.png"
    Image.effect_mandelbrot((320, 200), (-2, -1, 1, 1), 60).convert("RGB").save(path)
    return path


def open_page(browser, server, dark: bool = False):
    context = browser.new_context(viewport={"width": 1280, "height": 900},
                                  color_scheme="dark" if dark else "light")
    context.add_init_script(path=str(AXE_JS))
    page = context.new_page()
    page.goto(server.base + ("/?__theme=dark" if dark else "/"))
    page.locator("#random-weights-banner").wait_for()
    page.locator("#input textarea").wait_for()
    page.wait_for_function("() => !document.querySelector('#input textarea').disabled", timeout=60_000)
    # The describe buttons turn on just after the box (their own event), fading in: axe must not catch
    # them half-faded (a contrast it would measure mid-transition).
    page.wait_for_function("() => !document.querySelector('#describe-photo').disabled", timeout=30_000)
    page.wait_for_timeout(400)
    return context, page


def violations(page) -> list[dict]:
    result = page.evaluate(
        """async () => {
          const r = await axe.run(document, {resultTypes: ['violations']});
          return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
            nodes: v.nodes.map(n => ({target: n.target.join(' '), summary: n.failureSummary,
                                      html: n.html.slice(0, 160)}))}));
        }"""
    )
    return result


def report(found: list[dict]) -> str:
    lines = []
    for v in found:
        lines.append(f"[{v['impact']}] {v['id']}: {v['help']} ({len(v['nodes'])} nodes)")
        for n in v["nodes"][:6]:
            lines.append(f"    {n['target']}: {n['html']}\n      {(n['summary'] or '').replace(chr(10), ' | ')}")
    return "\n".join(lines)


def assert_clean(page, where: str) -> None:
    found = violations(page)
    print(f"\naxe, {where}:\n{report(found) or '    no violations'}")
    blocking = [v for v in found if v["impact"] in BLOCKING]
    assert not blocking, f"axe: serious/critical violations {where}:\n{report(blocking)}"


def test_axe_empty_page(browser, server):
    context, page = open_page(browser, server)
    try:
        assert_clean(page, "on the empty page")
    finally:
        context.close()


def test_axe_after_two_turns_with_image_and_settings_open(browser, server, photo):
    context, page = open_page(browser, server)
    try:
        send(page, "What is in this picture?", photo)
        page.locator("#chat .bot-row").first.wait_for(timeout=30_000)
        wait_idle(page)
        send(page, "Tell me more about the colours.")
        page.wait_for_function("() => document.querySelectorAll('#chat .bot-row').length >= 2", timeout=30_000)
        wait_idle(page)
        page.locator("#chat img").first.wait_for()
        assert_clean(page, "after a two-turn chat with an image")
        open_settings(page)
        assert_clean(page, "with the settings open")
    finally:
        context.close()


def test_axe_with_an_image_waiting_to_be_sent(browser, server, photo):
    context, page = open_page(browser, server)
    try:
        page.set_input_files("#input input[type=file]", str(photo))
        page.locator("#input .thumbnails img").first.wait_for(timeout=10_000)
        page.get_by_role("group", name="Attached image 1, not sent yet").wait_for(timeout=5_000)
        assert_clean(page, "with an image attached, not yet sent")
    finally:
        context.close()


def test_axe_dark_mode(browser, server, photo):
    context, page = open_page(browser, server, dark=True)
    try:
        assert page.evaluate("() => document.body.classList.contains('dark')")
        assert_clean(page, "in dark mode, empty page")
        send(page, "What is in this picture?", photo)
        page.locator("#chat .bot-row").first.wait_for(timeout=30_000)
        wait_idle(page)
        open_settings(page)
        assert_clean(page, "in dark mode after a chat turn, settings open")
    finally:
        context.close()


def test_axe_forced_colors(browser, server, photo):
    context, page = open_page(browser, server)
    try:
        page.emulate_media(forced_colors="active")
        send(page, "What is in this picture?", photo)
        page.locator("#chat .bot-row").first.wait_for(timeout=30_000)
        wait_idle(page)
        open_settings(page)
        assert_clean(page, "in forced colours after a chat turn, settings open")
    finally:
        context.close()


def expected_alt(page, name: str) -> str:
    """An attached image's text alternative: its file name, then the first sentence of the answer about it."""
    text = page.evaluate("""() => Array.from(document.querySelectorAll('#chat .bot-row .message-content')[0]
        .querySelectorAll('p, li, h1, h2, h3, h4, pre')).filter(b => !b.classList.contains('answer-note'))
        .map(b => b.textContent + ' ').join('')""")
    match = re.match(r"\s*(.+?[.!?])(?=\s)", re.sub(r"\s+", " ", text), re.S)
    if not match:
        return name
    sentence = match.group(1).strip()
    return f"{name}: {sentence if len(sentence) <= 150 else sentence[:149] + '…'}"


def test_structure_names_and_focus(browser, server, photo):
    """What axe does not require but people need: h1, landmarks, language, named groups, image alt, focus ring."""
    context, page = open_page(browser, server)
    try:
        assert page.evaluate("() => document.documentElement.lang") == "en"
        assert page.locator("h1").inner_text().strip() == "vlchat"
        assert page.get_by_role("navigation", name="Conversations").count() == 1
        assert page.get_by_role("main").count() == 1
        # The landmarks are apart: main holds the chat and the message box, the Conversations nav is outside it.
        page.wait_for_function("() => !document.querySelector('main .sidebar')", timeout=5_000)
        assert page.evaluate("() => !!document.querySelector('main #chat') && !!document.querySelector('main #input')")
        for name in ("Mode", "Image detail", "Conversations"):
            assert page.get_by_role("radiogroup", name=name).count() == 1, name
        send(page, "What is in this picture?", photo)
        page.locator("#chat .bot-row").first.wait_for(timeout=30_000)
        wait_idle(page)
        page.wait_for_function("() => { const i = document.querySelector('#chat img'); return i && i.alt; }")
        alt = expected_alt(page, "fractal.png")
        page.wait_for_function("(alt) => document.querySelector('#chat img').alt === alt", arg=alt)
        assert page.get_by_role("button", name=f"{alt} (open larger)").count() == 1
        unnamed = page.evaluate(
            """() => Array.from(document.querySelectorAll('button')).filter(b =>
                 !(b.getAttribute('aria-label') || b.innerText.trim() ||
                   Array.from(b.querySelectorAll('img')).some(i => i.alt))).map(b => b.outerHTML.slice(0, 120))""")
        assert not unnamed, unnamed
        # A conversation reopened from the history shows its images with the same text alternative.
        page.reload()
        page.locator("#conversation-list label", has_text="What is in this picture?").click()
        page.locator("#chat img").first.wait_for(timeout=20_000)
        page.wait_for_function("(alt) => document.querySelector('#chat img').alt === alt", arg=alt)
        assert page.get_by_role("button", name=f"{alt} (open larger)").count() == 1
        # Keyboard focus is drawn on every control Tab reaches: a 3px outline on it (on its label for a radio).
        page.locator("#new-chat").focus()
        seen, unringed = set(), []
        for _ in range(80):
            page.keyboard.press("Tab")
            where, ring = page.evaluate(
                """() => { const el = document.activeElement;
                     const small = el.matches('input[type=radio], input[type=checkbox]');
                     const drawn = small ? (el.closest('label') || el) : el;
                     const s = getComputedStyle(drawn);
                     return [el.outerHTML.slice(0, 100), s.outlineStyle + ' ' + s.outlineWidth]; }""")
            if where in seen:
                break
            if where.startswith("<body"):  # past the last control: the browser's own UI next
                continue
            seen.add(where)
            if ring != "solid 3px":
                unringed.append(f"{where} ({ring})")
        assert len(seen) > 15 and not unringed, "\n".join(unringed)
        # Reduced motion: transitions are cut to nothing.
        page.emulate_media(reduced_motion="reduce")
        duration = page.evaluate("() => getComputedStyle(document.querySelector('#new-chat')).transitionDuration")
        assert all(float(d.rstrip("s")) < 0.001 for d in duration.split(",")), duration
    finally:
        context.close()
