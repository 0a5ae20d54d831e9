"""Issue 13 end to end (a real `python app.py --model tiny-random`, Debian's chromium): edit a sent question and
page through versions by keyboard, search the conversations, export then import, hostile imports refused."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from tests.servers import Server, data_dir
from tests.test_e2e_browser import open_settings, send, set_setting, wait_idle


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    srv = Server(data_dir(tmp_path_factory, model_dir, "e2e-history")).start()
    yield srv
    srv.stop()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    pg = context.new_page()
    yield pg
    context.close()


def start(page, server) -> None:
    page.goto(server.base + "/")
    page.locator("#input textarea:not([disabled])").wait_for(timeout=30_000)
    open_settings(page)
    set_setting(page, "max-new-tokens", "32")  # short answers: these tests are about history


def ask(page, text: str, image: Path | None = None) -> None:
    before = page.locator("#chat .user-row").count()
    send(page, text, image)
    try:
        page.wait_for_function(f"() => document.querySelectorAll('#chat .user-row').length > {before}",
                               timeout=45_000)
    except Exception:  # say what the page showed instead
        seen = page.evaluate("""() => ({status: document.querySelector('#status')?.innerText,
            notice: document.querySelector('#notice')?.innerText, box: document.querySelector('#input textarea')?.value,
            disabled: document.querySelector('#input textarea')?.disabled})""")
        raise AssertionError(f"{text!r} did not appear in the chat; the page showed {seen}") from None
    wait_idle(page)


def open_panel(page, elem_id: str) -> None:
    """Open an accordion by keyboard (its header is a button)."""
    header = page.locator(f"#{elem_id} .label-wrap").first
    header.focus()
    page.keyboard.press("Enter")


def rows(server, title: str) -> list[tuple]:
    with sqlite3.connect(server.data_dir / "vlchat.db") as db:
        return db.execute("SELECT m.role, m.text, m.parent_id FROM messages m JOIN conversations c"
                          " ON c.id = m.conversation_id WHERE c.title = ? ORDER BY m.seq", [title]).fetchall()


def test_edit_a_question_and_page_through_versions_by_keyboard(server, page):
    start(page, server)
    ask(page, "Versions: first question")
    ask(page, "Versions: second question")
    open_panel(page, "versions")
    choice = page.locator("#version-message input")
    choice.wait_for(state="visible")
    page.locator("#version-line", has_text="Answer 2: version 1 of 1").wait_for(timeout=10_000)
    # Choose "Question 1" in the Message list by typing (it filters), arrow and Enter; then edit it and send.
    choice.focus()
    page.keyboard.press("Control+a")
    page.keyboard.type("Question 1")
    page.locator("#version-message li", has_text="Question 1: Versions: first question").wait_for(timeout=10_000)
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Enter")
    edit = page.locator("#edit-text textarea")
    edit.wait_for(state="visible", timeout=10_000)
    page.wait_for_function("() => document.querySelector('#edit-text textarea').value === 'Versions: first question'",
                           timeout=10_000)
    edit.focus()
    page.keyboard.press("Control+a")
    page.keyboard.type("Versions: first question, asked again")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.id") == "edit-send"
    page.keyboard.press("Enter")
    page.locator("#chat").get_by_text("first question, asked again").wait_for(timeout=20_000)
    wait_idle(page)
    chat = page.locator("#chat").inner_text()
    assert "Version 2 of 2" in chat and "second question" not in chat
    assert len(page.locator("#chat .bot-row").all()) == 1
    page.locator("#version-line", has_text="Question 1: version 2 of 2").wait_for(timeout=10_000)
    # Previous version (keyboard): the first branch comes back whole; Next returns to the edit.
    page.locator("#version-prev").focus()
    page.keyboard.press("Enter")
    page.locator("#chat").get_by_text("Versions: second question").wait_for(timeout=10_000)
    assert "Version 1 of 2" in page.locator("#chat").inner_text()
    page.locator("#version-line", has_text="version 1 of 2").wait_for(timeout=10_000)
    assert page.locator("#version-prev").is_disabled() and not page.locator("#version-next").is_disabled()
    page.locator("#version-next").focus()
    page.keyboard.press("Enter")
    page.locator("#chat").get_by_text("Versions: second question").wait_for(state="detached", timeout=10_000)
    # Regenerate adds a version of the answer; both answers are kept.
    page.locator("#regenerate").click()
    page.locator("#version-line", has_text="Answer 1: version 2 of 2").wait_for(timeout=20_000)
    wait_idle(page)
    # Drawn again once it has streamed: the new answer says which version it is, like the edited question.
    page.wait_for_function("() => document.querySelector('#chat').innerText.split('Version 2 of 2').length === 3",
                           timeout=10_000)
    stored = rows(server, "Versions: first question")
    assert [r[0] for r in stored] == ["user", "assistant", "user", "assistant", "user", "assistant", "assistant"]
    assert stored[4][2] is None and stored[5][2] == stored[6][2]  # the edit is a root sibling; two answers to it


def test_search_finds_by_text_and_opens(server, page):
    start(page, server)
    ask(page, "Search: the zebra crossing near the bakery")
    page.locator("#new-chat").click()
    page.wait_for_function("() => !document.querySelector('#chat .user-row')", timeout=10_000)
    ask(page, "Search: something else entirely")
    box = page.locator("#search input").first

    def search_for(words: str) -> None:  # typed, as a person does (each key filters the list)
        box.focus()
        page.keyboard.press("Control+a")
        page.keyboard.press("Backspace")
        page.keyboard.type(words)

    search_for("BAKERY")
    item = page.locator("#conversation-list label", has_text="zebra crossing")
    item.wait_for(timeout=10_000)
    page.locator("#search-results", has_text="1 conversation matches").wait_for(timeout=10_000)
    assert page.locator("#conversation-list label").count() == 1
    item.click()
    page.locator("#chat").get_by_text("the zebra crossing near the bakery").wait_for(timeout=10_000)
    search_for("no such words anywhere")
    page.locator("#search-results", has_text="No conversations match").wait_for(timeout=10_000)
    assert page.locator("#conversation-list label").count() == 0
    search_for("")
    page.wait_for_function("() => document.querySelectorAll('#conversation-list label').length >= 2",
                           timeout=10_000)


def download(page, elem_id: str) -> bytes:
    with page.expect_download(timeout=20_000) as info:
        page.locator(f"#{elem_id}").click()
    return Path(info.value.path()).read_bytes()


def import_file(page, path: Path) -> None:
    page.locator("input[type=file]:has(+ #import)").set_input_files(str(path))


def test_export_then_import_is_the_same_conversation(server, page, browser, tmp_path):
    photo = tmp_path / "stripes.png"
    img = Image.new("RGB", (96, 64), (250, 250, 250))
    for x in range(0, 96, 12):
        img.paste((20, 20, 200), (x, 0, x + 6, 64))
    img.save(photo)
    start(page, server)
    ask(page, "Export: what pattern is this?", photo)
    ask(page, "Export: and the colours?")
    open_panel(page, "versions")
    page.locator("#regenerate").click()
    page.locator("#version-line", has_text="version 2 of 2").wait_for(timeout=20_000)
    wait_idle(page)
    open_panel(page, "export-import")
    page.locator("#export").click()
    page.locator("#export-json").wait_for(state="visible", timeout=10_000)
    exported = json.loads(download(page, "export-json"))
    with zipfile.ZipFile(io.BytesIO(download(page, "export-zip"))) as z:
        md = z.read("conversation.md").decode()
        images = {n: z.read(n) for n in z.namelist() if n.startswith("images/")}
    assert "Export: what pattern is this?" in md and "![stripes.png](images/" in md
    assert len(images) == 1
    original = next(iter(images.values()))

    # Another browser imports the JSON: the same conversation, its own now.
    upload = tmp_path / "conversation.json"
    upload.write_text(json.dumps(exported))
    other = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    stranger = other.new_page()
    start(stranger, server)
    open_panel(stranger, "export-import")
    import_file(stranger, upload)
    stranger.locator("#chat").get_by_text("Export: and the colours?").wait_for(timeout=20_000)
    stranger.locator("#conversation-list label", has_text="Export: what pattern").wait_for(timeout=10_000)
    assert stranger.locator("#chat img").count() == 1
    assert "Version 2 of 2" in stranger.locator("#chat").inner_text()
    stranger.locator("#export").click()
    stranger.locator("#export-json").wait_for(state="visible", timeout=10_000)
    again = json.loads(download(stranger, "export-json"))
    other.close()
    keep = ("parent", "role", "text", "status", "mode", "settings", "usage", "image_ids", "image_names")
    assert [{k: m[k] for k in keep} for m in again["messages"]] == [{k: m[k] for k in keep}
                                                                   for m in exported["messages"]]
    assert again["current"] == exported["current"] and again["title"] == exported["title"]
    assert [base64.b64decode(i["data"]) for i in again["images"]] == [original]
    with sqlite3.connect(server.data_dir / "vlchat.db") as db:
        owners = db.execute("SELECT DISTINCT owner FROM conversations WHERE title = ?",
                            [exported["title"]]).fetchall()
    assert len(owners) == 2  # two conversations, two owners: the import did not join the exporter's


def test_hostile_imports_are_refused_with_a_notice_and_store_nothing(server, page, tmp_path):
    start(page, server)
    ask(page, "Hostile: a conversation to export")
    open_panel(page, "export-import")
    page.locator("#export").click()
    page.locator("#export-json").wait_for(state="visible", timeout=10_000)
    good = json.loads(download(page, "export-json"))
    with sqlite3.connect(server.data_dir / "vlchat.db") as db:
        victim = db.execute("SELECT id, owner FROM conversations WHERE title = ?", [good["title"]]).fetchone()

    def variant(**changes) -> str:
        return json.dumps({**good, **changes})

    bad_png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 300).decode()
    sha = "ab" * 32
    first = {**good["messages"][0], "image_ids": [sha], "image_names": ["x.png"]}
    cases = {
        "huge.json": ("{" + '"pad": "' + "x" * 16_500_000 + '"}', "the limit is 16 MB"),
        "deep.json": ('{"format": ' + "[" * 3000 + "]" * 3000 + "}", "nests deeper"),
        "image.json": (variant(images=[{"sha256": sha, "mime": "image/png", "data": bad_png}],
                               messages=[first, *good["messages"][1:]]), "image 1: "),
        "owner.json": (variant(owner=victim[1], id=victim[0]), "fields an export does not have (owner)"),
    }
    count = lambda: sqlite3.connect(server.data_dir / "vlchat.db").execute(  # noqa: E731
        "SELECT (SELECT count(*) FROM conversations), (SELECT count(*) FROM messages),"
        " (SELECT count(*) FROM images)").fetchone()
    before = count()
    for name, (text, expected) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        import_file(page, path)
        alert = page.locator("#notice [role=alert]", has_text=expected)
        alert.wait_for(timeout=30_000)
        assert "Nothing was imported" in alert.inner_text()
        page.locator("#dismiss-notice").click()
        page.locator("#notice").wait_for(state="hidden", timeout=10_000)
        assert count() == before, name
    assert page.locator(".toast-body").count() == 0  # no red error overlay
    time.sleep(0.2)
    assert page.locator("#conversation-list label").count() == 1


def test_axe_with_the_history_controls_open(server, browser):
    """axe-core: no serious or critical violation with search, export/import and the versions panel all shown."""
    from tests.test_a11y_axe import AXE_JS, assert_clean

    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    context.add_init_script(path=str(AXE_JS))
    page = context.new_page()
    start(page, server)
    ask(page, "Axe: a question with versions")
    open_panel(page, "versions")
    page.locator("#regenerate").click()
    page.locator("#version-line", has_text="version 2 of 2").wait_for(timeout=20_000)
    wait_idle(page)
    choice = page.locator("#version-message input")
    choice.focus()
    page.keyboard.press("Control+a")
    page.keyboard.type("Question 1")
    page.locator("#version-message li", has_text="Question 1").wait_for(timeout=10_000)
    page.keyboard.press("Enter")
    page.locator("#edit-text textarea").wait_for(state="visible", timeout=10_000)
    open_panel(page, "export-import")
    page.locator("#export").click()
    page.locator("#export-json").wait_for(state="visible", timeout=10_000)
    page.locator("#search input").first.focus()
    page.keyboard.type("nothing like this")
    page.locator("#search-results", has_text="No conversations match").wait_for(timeout=10_000)
    page.wait_for_timeout(400)
    assert_clean(page, "with the history controls open")
    context.close()
