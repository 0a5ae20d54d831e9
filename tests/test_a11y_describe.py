"""Issue 11, describe in one step: "Describe a photo", "Take a photo" and the follow-up questions, in Debian's
chromium against a real server (`app.py --model tiny-random`).

The browser is launched here with Chromium's fake camera (a generated test pattern) and its fake permission
prompt, which accepts. Keyboard first: the controls are reached with Tab and pressed with Enter or Space. What
goes into the page's live region is recorded, to check that nothing is announced twice. axe-core runs with the
camera dialog open.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from PIL import Image

from chat.conversation import MODES
from tests.conftest import CHROMIUM, CHROMIUM_ARGS
from tests.servers import Server, data_dir
from tests.test_a11y_axe import AXE_JS, assert_clean
from tests.test_a11y_speech import ANNOUNCED
from tests.test_e2e_browser import open_settings, set_setting, wait_idle, wait_ready

FAKE_CAMERA = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
# Before the page's scripts: what the live region is given (as in the speech tests), and every camera stream
# handed out.
RECORDER = ANNOUNCED + """
(() => {
  window.__streams = [];
  const media = navigator.mediaDevices;
  if (media && media.getUserMedia) {
    const real = media.getUserMedia.bind(media);
    media.getUserMedia = async (constraints) => {
      const stream = await real(constraints);
      window.__streams.push(stream);
      return stream;
    };
  }
})();
"""
PHONE_UA = ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 "
            "Mobile Safari/537.36")

# The camera dialog's status line starts with `says` (it exists only once the dialog has been built).
CAMERA_SAYS = "(says) => (document.querySelector('#camera-message')?.textContent || '').startsWith(says)"


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    srv = Server(data_dir(tmp_path_factory, model_dir, "describe-data")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def camera_browser():
    """Chromium with a fake camera that needs no permission prompt."""
    from playwright import sync_api as playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"chromium not found at {CHROMIUM}; run tests/run.sh, which installs it")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + FAKE_CAMERA)
        yield b
        b.close()


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "street.png"
    Image.effect_mandelbrot((320, 200), (-2, -1, 1, 1), 60).convert("RGB").save(path)
    return path


CHOOSERS: dict = {}  # page -> the file choosers it opened


def open_page(browser, server, **options):
    context = browser.new_context(**({"viewport": {"width": 1280, "height": 900}} | options))
    context.add_init_script(RECORDER)
    context.add_init_script(path=str(AXE_JS))
    page = context.new_page()
    # File choosers are intercepted from the start: set up just before the key press (expect_file_chooser),
    # the interception sometimes came after the chooser had opened (the click/interception race).
    CHOOSERS[page] = []
    page.on("filechooser", lambda chooser: CHOOSERS[page].append(chooser))
    page.goto(server.base + "/")
    wait_ready(page)
    page.locator("#camera").wait_for()
    return context, page


def chooser_after(page, act):
    """The file chooser that `act` opens."""
    seen = len(CHOOSERS[page])
    act()
    deadline = time.monotonic() + 15
    while len(CHOOSERS[page]) == seen:
        assert time.monotonic() < deadline, "no file chooser opened"
        page.wait_for_timeout(50)
    return CHOOSERS[page][-1]


def focused(page) -> str:
    return page.evaluate("() => document.activeElement.id || document.activeElement.outerHTML.slice(0, 80)")


def tab_to(page, element_id: str, limit: int = 12) -> None:
    """Press Tab until `element_id` has the focus; its focus ring must show."""
    path = []
    for _ in range(limit):
        page.keyboard.press("Tab")
        path.append(focused(page))
        if path[-1] == element_id:
            ring = page.evaluate("() => { const s = getComputedStyle(document.activeElement); "
                                 "return s.outlineStyle + ' ' + s.outlineWidth; }")
            assert ring == "solid 3px", ring
            return
    raise AssertionError(f"Tab did not reach #{element_id}: {path}")


def user_texts(page) -> list[str]:
    """Each question's text as shown (its last line: a narrow screen shows a photo's file name above it)."""
    return [t.strip().splitlines()[-1] for t in page.locator("#chat .user-row").all_inner_texts()]


def announced(page) -> list[str]:
    return page.evaluate("() => window.__announced.slice()")


def wait_answered(page, turns: int) -> None:
    page.wait_for_function("(n) => document.querySelectorAll('#chat .bot-row').length >= n", arg=turns,
                           timeout=30_000)
    wait_idle(page)
    page.wait_for_function("(n) => window.__announced.filter(a => a.startsWith('Answer complete')).length >= n",
                           arg=turns, timeout=10_000)


def test_describe_a_photo_with_the_keyboard_then_follow_up(camera_browser, server, photo):
    context, page = open_page(camera_browser, server)
    try:
        open_settings(page)
        set_setting(page, "max-new-tokens", "1500")  # long enough to see it stream
        page.locator("#input textarea").focus()
        assert page.locator("#follow-ups").count() == 0 or not page.locator("#follow-ups").is_visible()
        tab_to(page, "describe-photo")
        chooser = chooser_after(page, lambda: page.keyboard.press("Enter"))
        assert chooser.element.get_attribute("accept") == "image/*"  # phones offer the camera here
        chooser.set_files(str(photo))
        # Sent at once: the question shown is the mode's describe prompt, with the photo; the answer streams.
        page.locator("#chat .user-row").first.wait_for(timeout=20_000)
        lengths = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(set(lengths)) < 3:
            texts = page.locator("#chat .bot-row").all_inner_texts()
            if texts:
                lengths.append(len(texts[-1]))
            time.sleep(0.05)
        assert len(set(lengths)) >= 3, f"no streaming seen: {lengths}"
        wait_answered(page, 1)
        assert user_texts(page) == [MODES["general"].describe_prompt]
        assert page.locator("#chat .user-row img").count() == 1
        assert page.locator("#input textarea").input_value() == ""
        said = announced(page)
        assert said.count("Answering…") == 1 and sum(a.startswith("Answer complete") for a in said) == 1, said
        assert focused(page) == "describe-photo"  # the focus stays where it was

        # The follow-up questions show under the chat once there is an answer, as one named group.
        group = page.get_by_role("group", name="Ask next")
        group.wait_for(timeout=10_000)
        labels = [label for label, _ in MODES["general"].follow_ups]
        assert [b.strip() for b in group.get_by_role("button").all_inner_texts()] == labels
        button = group.get_by_role("button", name="Read any text")
        button.focus()
        page.keyboard.press("Enter")
        page.wait_for_function("() => document.querySelectorAll('#chat .user-row').length >= 2", timeout=20_000)
        # Another one while the answer is coming is refused in words (a notice, role=alert), not dropped.
        group.get_by_role("button", name="More detail").focus()
        page.keyboard.press("Enter")
        page.locator("#notice-text").get_by_text("An answer is still coming").wait_for(timeout=10_000)
        wait_answered(page, 2)
        assert len(user_texts(page)) == 2
        assert user_texts(page)[-1] == dict(MODES["general"].follow_ups)["Read any text"]
        said = announced(page)
        assert said.count("Answering…") == 2 and sum(a.startswith("Answer complete") for a in said) == 2, said

        # Another mode, other questions; a new chat hides them.
        page.locator("#mode label", has_text="Scene description").click()
        scene = [label for label, _ in MODES["scene"].follow_ups]
        page.wait_for_function("(want) => Array.from(document.querySelectorAll('#follow-ups button'))"
                               ".map(b => b.innerText.trim()).join('|') === want", arg="|".join(scene),
                               timeout=10_000)
        page.locator("#new-chat").click()
        page.locator("#follow-ups").wait_for(state="hidden", timeout=10_000)
        # Reopening the conversation shows them again, in the mode it now has.
        page.locator("#conversation-list label").first.click()
        page.get_by_role("group", name="Ask next").get_by_role("button", name="Is anything in the way?") \
            .wait_for(timeout=10_000)
    finally:
        CHOOSERS.pop(page, None)
        context.close()


def test_pasted_photo_and_enter_is_enough(camera_browser, server, photo):
    from tests.test_e2e_browser import paste_image

    context, page = open_page(camera_browser, server)
    try:
        page.locator("#mode label", has_text="Scene description").click()
        paste_image(page, photo)
        page.locator("#input textarea").press("Enter")
        wait_answered(page, 1)
        assert user_texts(page) == [MODES["scene"].describe_prompt]
    finally:
        CHOOSERS.pop(page, None)
        context.close()


def camera_dialog_open(page) -> bool:
    return page.evaluate("() => !!document.querySelector('#camera-dialog') "
                         "&& document.querySelector('#camera-dialog').open")


def test_take_a_photo_on_a_desktop(camera_browser, server):
    context, page = open_page(camera_browser, server)
    try:
        page.locator("#mode label", has_text="Scene description").click()
        page.locator("#input textarea").focus()
        tab_to(page, "describe-photo")
        tab_to(page, "camera", limit=1)  # right after "Describe a photo"
        page.keyboard.press("Enter")
        dialog = page.get_by_role("dialog", name="Take a photo")
        dialog.wait_for()
        assert camera_dialog_open(page)
        assert focused(page) == "camera-take"  # the focus moved into the dialog
        page.wait_for_function(CAMERA_SAYS, arg="Camera ready", timeout=15_000)
        assert page.evaluate("() => document.querySelector('#camera-preview').videoWidth") > 0  # live preview
        assert dialog.get_by_role("heading", name="Take a photo").count() == 1
        assert_clean(page, "with the camera dialog open")
        # Its two buttons are reached with Tab and show the focus ring.
        for key, want in (("Tab", "camera-cancel"), ("Shift+Tab", "camera-take")):
            page.keyboard.press(key)
            assert focused(page) == want
            assert page.evaluate("() => { const s = getComputedStyle(document.activeElement); "
                                 "return s.outlineStyle + ' ' + s.outlineWidth; }") == "solid 3px"

        # Escape closes it, lets the camera go, and gives the focus back.
        page.keyboard.press("Escape")
        page.wait_for_function("() => !document.querySelector('#camera-dialog').open")
        assert focused(page) == "camera"
        assert page.evaluate("() => window.__streams.length") == 1
        assert page.evaluate("() => window.__streams.every(s => s.getTracks().every(t => t.readyState === 'ended'))")

        # Again, and take the photo: it is sent like an uploaded one, with the mode's describe prompt.
        page.keyboard.press("Enter")
        page.wait_for_function(CAMERA_SAYS, arg="Camera ready", timeout=15_000)
        page.wait_for_function("() => document.querySelector('#camera-preview').videoWidth > 0")
        page.keyboard.press("Enter")  # on "Take photo"
        page.wait_for_function("() => !document.querySelector('#camera-dialog').open")
        assert focused(page) == "camera"
        assert page.evaluate("() => window.__streams.every(s => s.getTracks().every(t => t.readyState === 'ended'))")
        wait_answered(page, 1)
        assert user_texts(page) == [MODES["scene"].describe_prompt]
        assert page.locator("#chat .user-row img").count() == 1
        said = announced(page)
        assert said.count("Answering…") == 1 and sum(a.startswith("Answer complete") for a in said) == 1, said
        page.get_by_role("group", name="Ask next").get_by_role("button", name="More detail").wait_for(timeout=10_000)
    finally:
        CHOOSERS.pop(page, None)
        context.close()


def test_camera_dialog_in_dark_mode(camera_browser, server):
    context, page = open_page(camera_browser, server, color_scheme="dark")
    try:
        page.goto(server.base + "/?__theme=dark")
        wait_ready(page)
        page.locator("#camera").click()
        page.wait_for_function(CAMERA_SAYS, arg="Camera ready", timeout=15_000)
        assert_clean(page, "in dark mode with the camera dialog open")
        page.locator("#camera-cancel").click()
        page.wait_for_function("() => !document.querySelector('#camera-dialog').open")
        assert page.evaluate("() => window.__streams.every(s => s.getTracks().every(t => t.readyState === 'ended'))")
    finally:
        CHOOSERS.pop(page, None)
        context.close()


@pytest.mark.parametrize("error, says", [("NotAllowedError", "Camera permission was refused"),
                                         ("NotFoundError", "No camera was found")])
def test_camera_refused_or_missing_is_said_in_words(camera_browser, server, error, says):
    context, page = open_page(camera_browser, server)
    try:
        page.evaluate("(name) => { navigator.mediaDevices.getUserMedia = () => "
                      "Promise.reject(new DOMException('no camera', name)); }", error)
        page.locator("#camera").focus()
        page.keyboard.press("Enter")
        page.wait_for_function(CAMERA_SAYS, arg=says, timeout=10_000)
        assert page.locator("#camera-message").get_attribute("role") == "status"
        assert focused(page) == "camera-cancel" and page.locator("#camera-cancel").inner_text() == "Close"
        assert not page.locator("#camera-take").is_visible()
        page.keyboard.press("Enter")
        page.wait_for_function("() => !document.querySelector('#camera-dialog').open")
        assert focused(page) == "camera"
        assert page.locator("#chat .user-row").count() == 0  # nothing was sent
    finally:
        CHOOSERS.pop(page, None)
        context.close()


def test_take_a_photo_on_a_phone_opens_the_system_camera(camera_browser, server, photo):
    context, page = open_page(camera_browser, server, viewport={"width": 412, "height": 915}, is_mobile=True,
                              has_touch=True, user_agent=PHONE_UA)
    try:
        assert page.locator("#camera").get_attribute("aria-haspopup") is None  # no dialog on a phone
        if page.locator(".sidebar.open").count():  # on a narrow screen the open sidebar covers the page
            page.get_by_role("button", name="Toggle Sidebar").tap()
        chooser = chooser_after(page, lambda: page.locator("#camera").tap())
        element = chooser.element
        assert element.get_attribute("accept") == "image/*" and element.get_attribute("capture") == "environment"
        chooser.set_files(str(photo))
        wait_answered(page, 1)
        assert user_texts(page) == [MODES["general"].describe_prompt]
        assert not camera_dialog_open(page)
    finally:
        CHOOSERS.pop(page, None)
        context.close()
