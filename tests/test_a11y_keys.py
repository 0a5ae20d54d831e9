"""Issue 11, keyboard (assets/keys.js): every shortcut, keyboard only, against a real server in Debian's chromium.

The page is driven with `page.keyboard.press` alone once it is loaded (settings are filled in with the
helpers the other browser tests use). Speech synthesis is replaced by the recorder of
tests/test_a11y_speech.py, and axe-core is put in as tests/test_a11y_axe.py does.
"""

from __future__ import annotations

import base64
import re

import pytest
from PIL import Image
from playwright.sync_api import expect

from tests.servers import Server, data_dir
from tests.test_a11y_axe import AXE_JS, assert_clean
from tests.test_a11y_speech import RECORDER, last_answer, sentences
from tests.test_e2e_browser import open_settings, set_setting, wait_idle, wait_ready

BOX = "#input textarea"
MESSAGES = "#chat [data-testid='user'], #chat [data-testid='bot']"
# The focus ring of the focused control (a radio's is drawn around its label).
RING = """() => { const el = document.activeElement;
  const drawn = el.matches('input[type=radio], input[type=checkbox]') ? (el.closest('label') || el) : el;
  const s = getComputedStyle(drawn); return s.outlineStyle + ' ' + s.outlineWidth; }"""


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    srv = Server(data_dir(tmp_path_factory, model_dir, "keys-data")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "fractal.png"
    Image.effect_mandelbrot((320, 200), (-2, -1, 1, 1), 60).convert("RGB").save(path)
    return path


def open_page(browser, server, *, dark: bool = False, clipboard: bool = False):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme="dark" if dark else "light")
    if clipboard:
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.base)
    context.add_init_script(RECORDER)
    context.add_init_script(path=str(AXE_JS))
    page = context.new_page()
    page.goto(server.base + ("/?__theme=dark" if dark else "/"))
    wait_ready(page)
    page.locator("#shortcuts").wait_for()
    return context, page


def focused(page) -> dict:
    return page.evaluate("""() => { const el = document.activeElement;
        return {id: el.id, tag: el.tagName, testid: el.getAttribute('data-testid'),
                label: el.getAttribute('aria-label'), value: el.value === undefined ? null : el.value}; }""")


def announced(page) -> list[str]:
    return page.evaluate("() => window.__announced.slice()")


def spoken(page) -> list[str]:
    return page.evaluate("() => window.__spoken.slice()")


def wait_announced(page, text: str) -> None:
    try:
        page.wait_for_function("(t) => window.__announced.includes(t)", arg=text, timeout=30_000)
    except Exception:
        raise AssertionError(f"{text!r} was not announced; announced: {announced(page)}") from None


def clear_records(page) -> None:
    page.evaluate("() => { window.__announced.length = 0; window.__spoken.length = 0; }")


def ask(page, text: str) -> None:
    """Type a message from the keyboard and send it with Enter; wait for the whole answer."""
    before = page.locator("#chat [data-testid='bot']").count()
    page.keyboard.press("Alt+Shift+M")
    page.keyboard.type(text)
    page.keyboard.press("Enter")
    page.wait_for_function("(n) => document.querySelectorAll(\"#chat [data-testid='bot']\").length > n",
                           arg=before, timeout=30_000)
    wait_idle(page)


def message_at(page, index: int):
    return page.locator(MESSAGES).nth(index)


def assert_on_message(page, index: int) -> None:
    """Focus is on message `index` (0 = first) and its accessible name is its text."""
    target = message_at(page, index)
    expect(target).to_be_focused()
    role = target.get_attribute("data-testid")
    text = " ".join(target.inner_text().split())[:1000]
    assert text
    expect(target).to_have_accessible_name(re.compile(rf"^{role}'s message: {re.escape(text[:200])}"))
    expect(target).to_have_role("article")


def long_answers(page) -> None:
    open_settings(page)
    set_setting(page, "max-new-tokens", "4096")


def short_answers(page) -> None:
    open_settings(page)
    set_setting(page, "max-new-tokens", "48")


# -- the dialog ------------------------------------------------------------------------------------

def test_shortcuts_dialog_opens_closes_and_passes_axe(browser, server):
    context, page = open_page(browser, server)
    try:
        # "?" typed in the message box is text, not the dialog.
        page.keyboard.press("Alt+Shift+M")
        page.keyboard.type("what is this?")
        assert page.locator(BOX).input_value() == "what is this?"
        assert not page.locator("#shortcuts-dialog").is_visible()
        # Alt+Shift+H opens it from the message box; Escape closes it and focus goes back to the box.
        page.keyboard.press("Alt+Shift+H")
        dialog = page.get_by_role("dialog", name="Keyboard shortcuts")
        expect(dialog).to_be_visible()
        expect(page.locator("#shortcuts-title")).to_be_focused()  # the start of the list in view; Tab: Close
        page.keyboard.press("Tab")
        expect(page.locator("#shortcuts-close")).to_be_focused()
        page.keyboard.press("Escape")
        expect(dialog).to_be_hidden()
        assert focused(page)["tag"] == "TEXTAREA" and page.locator(BOX).input_value() == "what is this?"

        # The "Keyboard shortcuts" button: Tab to it (from the page's start), Enter opens the dialog.
        button = page.get_by_role("button", name="Keyboard shortcuts")
        expect(button).to_be_visible()
        page.evaluate("() => document.activeElement.blur()")
        for _ in range(80):
            page.keyboard.press("Tab")
            if focused(page)["id"] == "shortcuts":
                break
        assert focused(page)["id"] == "shortcuts"
        page.keyboard.press("Enter")
        expect(dialog).to_be_visible()
        # It lists every shortcut: a heading, a table with keys and actions, a Close button.
        expect(dialog.get_by_role("heading", name="Keyboard shortcuts")).to_be_visible()
        rows = dialog.locator("tbody tr").all_inner_texts()
        for keys, action in [("Alt+Shift+M", "Focus the message box"), ("Alt+Shift+D", "Describe a photo"),
                             ("Alt+Shift+C", "Take a photo"), ("Alt+Shift+V", "Paste and send"),
                             ("Alt+Shift+S", "Stop the answer"), ("Alt+Shift+R", "Read the last answer aloud"),
                             ("Alt+Shift+X", "Stop reading"), ("Alt+Shift+K", "Previous message"),
                             ("Alt+Shift+J", "Next message"), ("Alt+Shift+N", "New chat"),
                             ("Alt+Shift+H", "keyboard shortcuts")]:
            assert any(keys in r and action in r for r in rows), (keys, action, rows)
        assert_clean(page, "with the keyboard shortcuts dialog open")
        # Modal but no trap: Tab never reaches the page behind it, Escape leaves it, focus is back on the button.
        for _ in range(3):
            page.keyboard.press("Tab")
            assert page.evaluate("() => !!document.activeElement.closest('#shortcuts-dialog')"
                                 " || document.activeElement === document.body")
        page.keyboard.press("Escape")
        expect(dialog).to_be_hidden()
        assert focused(page)["id"] == "shortcuts"
        # "?" outside a text field opens it; its Close button closes it.
        page.keyboard.press("?")
        expect(dialog).to_be_visible()
        page.keyboard.press("Tab")
        page.keyboard.press("Enter")  # on Close
        expect(dialog).to_be_hidden()
        assert focused(page)["id"] == "shortcuts"
        assert page.evaluate("() => typeof window.vlchat.showShortcuts") == "function"
    finally:
        context.close()


def test_shortcuts_dialog_dark_mode_and_high_contrast_axe(browser, server):
    context, page = open_page(browser, server, dark=True)
    try:
        dialog = page.get_by_role("dialog", name="Keyboard shortcuts")
        page.keyboard.press("Alt+Shift+H")
        expect(dialog).to_be_visible()
        assert_clean(page, "in dark mode with the keyboard shortcuts dialog open")
        assert page.evaluate(RING) == "solid 3px"
        page.keyboard.press("Escape")
        # The page's high-contrast theme (prefs.js), switched on from the keyboard.
        page.locator("#high-contrast").focus()
        page.keyboard.press("Space")
        page.wait_for_function("() => document.documentElement.classList.contains('vl-hc')")
        page.keyboard.press("?")
        expect(dialog).to_be_visible()
        assert_clean(page, "in high contrast with the keyboard shortcuts dialog open")
        assert page.evaluate("() => getComputedStyle(document.activeElement).outlineColor") == "rgb(255, 255, 0)"
    finally:
        context.close()


# -- messages, reading aloud, new chat ---------------------------------------------------------------

def test_message_navigation_read_aloud_and_new_chat(browser, server):
    context, page = open_page(browser, server)
    try:
        page.keyboard.press("Alt+Shift+K")
        wait_announced(page, "No messages yet.")
        page.keyboard.press("Alt+Shift+R")
        wait_announced(page, "There is no answer to read yet.")
        short_answers(page)
        ask(page, "First question.")
        ask(page, "Second question.")
        assert page.locator(MESSAGES).count() == 4  # user, bot, user, bot

        # From the message box, Alt+Shift+K goes to the newest message; it is read by its label.
        page.keyboard.press("Alt+Shift+M")
        page.keyboard.press("Alt+Shift+K")
        assert_on_message(page, 3)
        page.keyboard.press("ArrowUp")
        assert_on_message(page, 2)
        assert "Second question." in message_at(page, 2).get_attribute("aria-label")
        page.keyboard.press("k")
        assert_on_message(page, 1)
        page.keyboard.press("Alt+Shift+K")
        assert_on_message(page, 0)
        clear_records(page)
        page.keyboard.press("ArrowUp")  # nothing before the first: it says so and stays
        wait_announced(page, "First message")
        assert_on_message(page, 0)
        page.keyboard.press("ArrowDown")
        assert_on_message(page, 1)
        page.keyboard.press("j")
        assert_on_message(page, 2)
        page.keyboard.press("Alt+Shift+J")
        assert_on_message(page, 3)
        page.keyboard.press("ArrowDown")
        wait_announced(page, "Last message")
        assert_on_message(page, 3)
        page.keyboard.press("Home")
        assert_on_message(page, 0)
        page.keyboard.press("End")
        assert_on_message(page, 3)
        # On a Mac, Option+Shift+K types the Apple logo (event.key "\uf8ff"): the key's place (event.code) counts.
        page.evaluate("""() => document.activeElement.dispatchEvent(new KeyboardEvent('keydown',
            {key: '\uf8ff', code: 'KeyK', altKey: true, shiftKey: true, bubbles: true, cancelable: true}))""")
        assert_on_message(page, 2)
        page.keyboard.press("End")
        # The focused message shows the focus ring.
        assert page.evaluate(RING) == "solid 3px"
        # Enter reads the focused message aloud; Escape goes back to the message box.
        page.keyboard.press("ArrowUp")
        user_text = message_at(page, 2).inner_text().strip()
        page.keyboard.press("Enter")
        assert spoken(page)[-1] == user_text and "<cancel>" in spoken(page)
        page.keyboard.press("Escape")
        assert focused(page)["tag"] == "TEXTAREA"

        # Alt+Shift+R reads the last answer from its start; Alt+Shift+X stops it.
        clear_records(page)
        page.keyboard.press("Alt+Shift+R")
        expected = sentences(last_answer(page))
        assert expected and spoken(page) == ["<cancel>", *expected]
        page.keyboard.press("Alt+Shift+X")
        assert spoken(page)[-1] == "<cancel>"
        assert page.locator(BOX).input_value() == ""  # the shortcuts typed nothing

        # "/" outside a text field goes to the message box; typed in it, it is text.
        page.keyboard.press("Alt+Shift+K")
        page.keyboard.press("/")
        assert focused(page)["tag"] == "TEXTAREA"
        page.keyboard.type("a/b")
        assert page.locator(BOX).input_value() == "a/b"

        # Alt+Shift+N: a new, empty chat, with focus in the message box.
        page.keyboard.press("Alt+Shift+K")
        page.keyboard.press("Alt+Shift+N")
        page.wait_for_function("(sel) => document.querySelectorAll(sel).length === 0", arg=MESSAGES, timeout=15_000)
        wait_announced(page, "New chat.")
        assert focused(page)["tag"] == "TEXTAREA"
    finally:
        context.close()


# -- stop ---------------------------------------------------------------------------------------------

def start_long_answer(page, text: str) -> None:
    before = page.locator("#chat [data-testid='bot']").count()
    page.keyboard.press("Alt+Shift+M")
    page.keyboard.type(text)
    page.keyboard.press("Enter")
    page.wait_for_function(
        """(n) => { const b = document.querySelectorAll("#chat [data-testid='bot']");
             return b.length > n && b[b.length - 1].innerText.length > 40; }""", arg=before, timeout=30_000)
    assert "Answering" in page.locator("#status").inner_text()


def test_stop_by_keyboard(browser, server):
    context, page = open_page(browser, server)
    try:
        page.keyboard.press("Alt+Shift+S")  # nothing to stop: it says so
        wait_announced(page, "No answer is being written.")
        long_answers(page)
        start_long_answer(page, "Write forever.")
        page.keyboard.press("Alt+Shift+S")
        page.locator("#chat").get_by_text("Stopped.").first.wait_for(timeout=15_000)
        wait_idle(page)
        assert page.locator(BOX).input_value() == ""
        # Escape in the message box while an answer is written stops it too.
        start_long_answer(page, "Write forever again.")
        assert focused(page)["tag"] == "TEXTAREA"
        page.keyboard.press("Escape")
        expect(page.locator("#chat").get_by_text("Stopped.")).to_have_count(2, timeout=15_000)
        wait_idle(page)
        assert announced(page).count("Stopped.") == 2
    finally:
        context.close()


# -- photos: describe, camera, paste and send ---------------------------------------------------------

def put_image_on_clipboard(page, path) -> None:
    page.evaluate(
        """async (b64) => {
          const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
          const blob = new Blob([bytes], {type: 'image/png'});
          await navigator.clipboard.write([new ClipboardItem({'image/png': blob})]);
        }""",
        base64.b64encode(path.read_bytes()).decode(),
    )


def wait_photo_sent(page, count: int) -> None:
    """Until `count` user messages carry an image and the answer has finished."""
    page.wait_for_function(
        "(n) => document.querySelectorAll(\"#chat [data-testid='user'] img\").length >= n", arg=count, timeout=30_000)
    page.locator("#chat [data-testid='bot']").nth(count - 1).wait_for(timeout=30_000)
    wait_idle(page)


def test_paste_and_send_reads_the_clipboard(browser, server, photo):
    """keys.js's part: the clipboard's image goes to vlchat.describeFile as a File; no image is said."""
    context, page = open_page(browser, server, clipboard=True)
    try:
        page.evaluate("""() => { window.__described = []; window.vlchat.describeFile = (f) => {
            window.__described.push([f.name, f.type, f.size]); return true; }; }""")
        page.evaluate("() => navigator.clipboard.writeText('just text')")
        page.keyboard.press("Alt+Shift+V")
        wait_announced(page, "The clipboard has no image.")
        put_image_on_clipboard(page, photo)
        page.keyboard.press("Alt+Shift+V")
        page.wait_for_function("() => window.__described.length === 1", timeout=10_000)
        name, kind, size = page.evaluate("() => window.__described[0]")
        assert kind == "image/png" and name.endswith(".png") and size > 1000
        wait_announced(page, "Sending the image from the clipboard.")
        # Without camera.js's function, the shortcut says it is not available.
        page.evaluate("() => { delete window.vlchat.describeFile; }")
        page.keyboard.press("Alt+Shift+V")
        wait_announced(page, "Describing a photo is not available.")
    finally:
        context.close()


def test_paste_and_send_and_describe_a_photo_send_it(browser, server, photo):
    """With camera.js: Alt+Shift+V sends the clipboard's image, Alt+Shift+D opens the file chooser and sends the
    chosen photo, Alt+Shift+C opens the camera; no mouse."""
    context, page = open_page(browser, server, clipboard=True)
    try:
        short_answers(page)
        page.keyboard.press("Alt+Shift+M")
        put_image_on_clipboard(page, photo)
        page.keyboard.press("Alt+Shift+V")
        wait_photo_sent(page, 1)

        with page.expect_file_chooser(timeout=10_000) as chooser:
            page.keyboard.press("Alt+Shift+D")
        chooser.value.set_files(str(photo))
        wait_photo_sent(page, 2)

        page.evaluate("""() => { window.__camera = 0; const open = window.vlchat.openCamera;
            window.vlchat.openCamera = () => { window.__camera += 1; }; window.__openCamera = open; }""")
        page.keyboard.press("Alt+Shift+C")
        assert page.evaluate("() => window.__camera") == 1
        assert page.locator(BOX).input_value() == ""  # no shortcut typed a character
    finally:
        context.close()


# -- Tab walk -----------------------------------------------------------------------------------------

WALK_STEP = """() => {
  if (!window.__ids) { window.__ids = new WeakMap(); window.__n = 0; }
  const el = document.activeElement;
  if (!window.__ids.has(el)) window.__ids.set(el, ++window.__n);
  return {id: window.__ids.get(el), body: el === document.body, html: el.outerHTML.slice(0, 100)};
}"""

# Every control Tab should reach: visible, enabled, in the tab order; one radio per group.
TABBABLE = """() => {
  if (!window.__ids) { window.__ids = new WeakMap(); window.__n = 0; }
  const sel = 'a[href], button, input, textarea, select, [tabindex]';
  const groups = new Set();
  const out = [];
  for (const el of document.querySelectorAll(sel)) {
    if (el.disabled || el.tabIndex < 0 || el.closest('[inert], dialog:not([open])')) continue;
    if (!el.checkVisibility({visibilityProperty: true, opacityProperty: false})) continue;
    if (el.matches('input[type=hidden]')) continue;
    if (el.matches('input[type=radio]')) {
      const group = el.name || el.closest('fieldset, [role=radiogroup]');
      if (groups.has(group)) continue;
      groups.add(group);
      const checked = Array.from(document.querySelectorAll('input[type=radio]'))
        .filter(r => (r.name || r.closest('fieldset, [role=radiogroup]')) === group);
      const on = checked.find(r => r.checked) || checked[0];
      if (!window.__ids.has(on)) window.__ids.set(on, ++window.__n);
      out.push({id: window.__ids.get(on), html: on.outerHTML.slice(0, 100)});
      continue;
    }
    if (!window.__ids.has(el)) window.__ids.set(el, ++window.__n);
    out.push({id: window.__ids.get(el), html: el.outerHTML.slice(0, 100)});
  }
  return out;
}"""


def walk(page, key: str) -> list[dict]:
    """Press `key` until focus comes back to where the walk started; every stop, in order."""
    page.evaluate("() => document.activeElement.blur()")
    stops = []
    for _ in range(150):
        page.keyboard.press(key)
        step = page.evaluate(WALK_STEP)
        if step["body"]:
            continue
        if stops and step["id"] == stops[0]["id"]:
            return stops
        assert not stops or step["id"] != stops[-1]["id"], f"{key} is stuck on {step['html']}"
        stops.append(step)
    raise AssertionError(f"{key} never came back to the start: {[s['html'] for s in stops[-5:]]}")


def test_tab_walk_reaches_every_control_named_and_never_gets_stuck(browser, server):
    context, page = open_page(browser, server)
    try:
        short_answers(page)
        ask(page, "A message to walk past.")
        page.wait_for_function("() => !!document.querySelector('#camera')", timeout=10_000)
        forward = walk(page, "Tab")
        print("\nTab walk:", *[s["html"] for s in forward], sep="\n  ")
        expected = page.evaluate(TABBABLE)
        reached = {s["id"] for s in forward}
        missed = [e["html"] for e in expected if e["id"] not in reached]
        assert not missed, missed
        assert len(forward) == len(reached)  # each control once per round
        for control in ("shortcuts", "new-chat", "stop", "read-aloud", "stop-reading", "camera"):
            assert any(f'id="{control}"' in s["html"] for s in forward), control
        # Every stop has a name and shows the focus ring: visit each again (the walk ended on the first).
        unringed = []
        for i, stop in enumerate(forward):
            while i and page.evaluate(WALK_STEP)["id"] == forward[i - 1]["id"] or page.evaluate(WALK_STEP)["body"]:
                page.keyboard.press("Tab")
            assert page.evaluate(WALK_STEP)["id"] == stop["id"], stop["html"]
            expect(page.locator("*:focus")).to_have_accessible_name(re.compile(r"\S"))
            if page.evaluate(RING) != "solid 3px":
                unringed.append(stop["html"])
        assert not unringed, unringed
        # Backwards: the same controls, in the opposite order.
        backward = walk(page, "Shift+Tab")
        assert {s["id"] for s in backward} == reached
        start = [s["id"] for s in forward].index(backward[0]["id"])
        cycle = [s["id"] for s in forward[start::-1]] + [s["id"] for s in forward[:start:-1]]
        assert [s["id"] for s in backward] == cycle
        # With the dialog open and closed again, the walk is the same (nothing left behind, nothing inert).
        page.keyboard.press("?")
        page.keyboard.press("Escape")
        assert {s["id"] for s in walk(page, "Tab")} == reached
    finally:
        context.close()
