"""The page's handlers called directly (no browser): validation, storage, ownership, stop, regenerate."""

from __future__ import annotations

import io
import threading
from types import SimpleNamespace

import gradio as gr
import pytest
from PIL import Image

from chat import page, ui
from chat.config import Settings
from chat.engine.local.engine import Engine
from chat.engine.local.runner import Runner
from chat.images import open_clean
from chat.notices import Notice
from chat.render import message_html
from chat.store import Store

ME, OTHER = "a" * 32, "b" * 32  # browser ids, as the identity cookie's middleware leaves them in request.state


class Req(SimpleNamespace):
    """Stands in for gr.Request: the handlers read only these attributes."""

    def __init__(self, session="s1", username=None, browser=ME):
        super().__init__(session_hash=session, username=username, state=SimpleNamespace(vlchat_browser=browser))


def real_ctx(tmp_path, loaded, **engine_options):
    """A Ctx over a real store and the tiny model's engine (a generator: the fixtures below wrap it)."""
    store = Store(tmp_path / "data")
    settings = Settings(data_dir=tmp_path / "data", max_images_per_message=2, max_images_per_conversation=3)
    engine = Engine(Runner(loaded.model, loaded.processor), lambda i: open_clean(store.image_bytes(i)),
                    **engine_options)
    engine.start(warmup=False)
    yield ui.Ctx(store=store, engine=engine, settings=settings, random_weights=True)
    engine.shutdown()
    store.close()


@pytest.fixture
def ctx(tmp_path, loaded):
    yield from real_ctx(tmp_path, loaded)


def png(tmp_path, name="a.png", size=(120, 80), colour=(10, 200, 30)) -> str:
    path = tmp_path / name
    Image.new("RGB", size, colour).save(path)
    return str(path)


def drain(gen):
    return list(gen)


def send(ctx, conv_id, text, files=(), max_new=24, req=None, system="", detail="auto"):
    return drain(ui.send(ctx, conv_id, {"text": text, "files": list(files)}, "general", 0.0, 0.9, max_new,
                         system, detail, req or Req()))


def text_of(message) -> str:
    """The HTML of a Chatbot message's text part."""
    content = message["content"]
    if isinstance(content, list):
        content = [part for part in content if part.get("type") == "text"][-1]
    return content["text"]


OWNER = "browser:" + ME


def test_send_stores_question_and_answer_and_streams(ctx, tmp_path):
    # Long enough to stream for a while: the page draws what arrived every 0.1 s, and the engine is fast.
    updates = send(ctx, None, "What is this?", [png(tmp_path)], max_new=1500)
    conv_id = updates[0][0]
    rows = ctx.store.messages(OWNER, conv_id)
    assert [r["role"] for r in rows] == ["user", "assistant"]
    assert rows[0]["text"] == "What is this?" and len(rows[0]["image_ids"]) == 1
    assert rows[1]["status"] == "complete" and rows[1]["usage"]["completion_tokens"] == 1500
    history = updates[-1][1]
    # The answer, then its collapsed details (chat.stats, issue 13).
    assert text_of(history[-1]).split("\n<details", 1)[0] == message_html(rows[1]["text"])
    assert len(updates) > 3  # streamed in several updates, not one
    assert updates[0][5] == "What is this?"  # the title box shows the new title
    # The image is shown inline from the store, by content hash.
    assert history[0]["content"][0]["file"]["path"].endswith(rows[0]["image_ids"][0] + ".png")


def test_follow_up_reuses_the_image_and_the_prefix(ctx, tmp_path):
    conv_id = send(ctx, None, "Describe", [png(tmp_path)])[0][0]
    before = ctx.engine.metrics.images_encoded._value.get()
    send(ctx, conv_id, "More detail please")
    assert ctx.engine.metrics.images_encoded._value.get() == before
    rows = ctx.store.messages(OWNER, conv_id)
    assert rows[-1]["usage"]["cached_tokens"] > rows[1]["usage"]["prompt_tokens"]


def test_bad_input_is_refused_clearly_and_nothing_is_stored(ctx, tmp_path):
    with pytest.raises(Notice, match="Type a question or attach an image"):
        send(ctx, None, "   ")
    fake = tmp_path / "cat.png"
    fake.write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(Notice, match="cat.png: "):
        send(ctx, None, "look", [str(fake)])
    with pytest.raises(Notice, match="3 images attached; a message may carry 2"):
        send(ctx, None, "look", [png(tmp_path, f"{i}.png") for i in range(3)])
    assert ctx.store.list_conversations(OWNER) == []


def test_images_per_conversation_limit(ctx, tmp_path):
    conv_id = send(ctx, None, "one", [png(tmp_path, "1.png"), png(tmp_path, "2.png", colour=(1, 2, 3))])[0][0]
    with pytest.raises(Notice, match="would hold 4 images; the limit is 3"):
        send(ctx, conv_id, "two", [png(tmp_path, "3.png", colour=(9, 9, 9)),
                                          png(tmp_path, "4.png", colour=(8, 8, 8))])


def test_other_browser_and_users_cannot_see_or_touch(ctx, tmp_path):
    conv_id = send(ctx, None, "mine")[0][0]
    other = Req(browser=OTHER)
    assert ui.on_load(ctx, other)[0]["choices"] == []
    with pytest.raises(Notice, match="does not exist"):
        ui.open_conversation(ctx, conv_id, other)
    with pytest.raises(Notice, match="no longer exists"):
        send(ctx, conv_id, "let me in", req=other)
    with pytest.raises(Notice):
        ui.rename(ctx, conv_id, "hacked", other)
    ui.delete(ctx, conv_id, other)
    assert ctx.store.get_conversation(OWNER, conv_id)["title"] == "mine"
    # With --auth the user name is the owner, whatever the browser secret.
    assert ui.owner_of(Req(username="ann")) == "user:ann" != OWNER
    # A request with no identity (no valid cookie) is told to reload, and nothing is done.
    with pytest.raises(Notice, match="reload the page"):
        send(ctx, None, "who am I?", req=Req(browser=None))


def test_open_rename_delete_and_list_order(ctx):
    first = send(ctx, None, "first question")[0][0]
    second = send(ctx, None, "second question")[0][0]
    choices = ui.on_load(ctx, Req())[0]["choices"]
    assert [c[1] for c in choices] == [second, first]  # newest first
    conv, history, title, mode = ui.open_conversation(ctx, first, Req())
    assert conv == first and title == "first question" and mode == "general"
    assert text_of(history[0]) == "<p>first question</p>"
    ui.rename(ctx, first, "  Renamed   chat ", Req())
    assert ctx.store.get_conversation(OWNER, first)["title"] == "Renamed chat"
    with pytest.raises(Notice, match="cannot be empty"):
        ui.rename(ctx, first, "   ", Req())
    ui.delete(ctx, first, Req())
    assert [c[1] for c in ui.on_load(ctx, Req())[0]["choices"]] == [second]


def test_regenerate_adds_a_version_of_the_last_answer(ctx):
    conv_id = send(ctx, None, "question")[0][0]
    owner = OWNER
    old = ctx.store.messages(owner, conv_id)[-1]
    drain(ui.regenerate(ctx, conv_id, "general", 1.0, 0.9, 24, "", Req()))
    rows = ctx.store.messages(owner, conv_id)
    assert [r["role"] for r in rows] == ["user", "assistant"]
    assert rows[-1]["id"] != old["id"] and rows[-1]["status"] == "complete"
    # The earlier answer is kept as version 1 of 2 (issue 13), the new one is shown.
    assert (rows[-1]["version"], rows[-1]["versions"]) == (2, 2)
    tree, _ = ctx.store.message_tree(owner, conv_id)
    assert [r["id"] for r in tree] == [rows[0]["id"], old["id"], rows[-1]["id"]]


def test_stop_button_marks_the_answer_stopped(ctx):
    req = Req(session="tab-1")
    gen = ui.send(ctx, None, {"text": "go on", "files": []}, "general", 0.0, 0.9, 4000, "", "auto", req)
    updates = [next(gen), next(gen)]  # the question is stored, the first text arrives
    assert ui.stop(ctx, req) == "Stopped."
    updates += list(gen)
    conv_id = updates[0][0]
    answer = ctx.store.messages(OWNER, conv_id)[-1]
    assert answer["status"] == "stopped"
    assert 0 < answer["usage"]["completion_tokens"] < 1000  # well short of the 4000 asked for
    assert "Stopped" in text_of(updates[-1][1][-1])
    assert req.session_hash not in ctx.active


def test_closed_page_stops_and_keeps_the_partial_answer(ctx):
    req = Req(session="tab-2")
    gen = ui.send(ctx, None, {"text": "go on", "files": []}, "general", 0.0, 0.9, 4000, "", "auto", req)
    conv_id = next(gen)[0]
    next(gen)
    ui.page_closed(ctx, req)  # what Gradio's unload calls
    gen.close()  # and the page's stream goes away
    answer = None
    for _ in range(100):
        answer = ctx.store.messages(OWNER, conv_id)[-1]
        if answer["status"] != "pending":
            break
        threading.Event().wait(0.05)
    assert answer["status"] == "stopped"


def test_busy_engine_gives_the_question_back_and_stores_nothing(ctx, tmp_path):
    """Item 11: "busy" is a moment, not a permanent error stored on the message."""
    conv_id = send(ctx, None, "first")[0][0]
    ctx.engine.max_waiting = 0
    with pytest.raises(Notice, match="busy.*still in the box"):
        send(ctx, conv_id, "anyone there?", [png(tmp_path)])
    with pytest.raises(Notice, match="busy"):
        send(ctx, None, "and a new chat?")
    assert [r["text"] for r in ctx.store.messages(OWNER, conv_id)][0] == "first"
    assert len(ctx.store.messages(OWNER, conv_id)) == 2
    assert len(ctx.store.list_conversations(OWNER)) == 1
    assert ctx.store.db.table("images").count == 0  # the refused message's image was never stored


def test_interrupted_answers_show_as_such(ctx):
    owner = OWNER
    conv_id = ctx.store.create_conversation(owner, title="t")
    ctx.store.add_message(owner, conv_id, role="user", text="q")
    ctx.store.add_message(owner, conv_id, role="assistant", text="partial ans", status="pending")
    assert ctx.store.recover_interrupted() == 1
    history = ui.open_conversation(ctx, conv_id, Req())[1]
    assert "partial ans" in text_of(history[-1]) and "Interrupted" in text_of(history[-1])


def test_pasted_jpeg_with_exif_is_stored_clean(ctx, tmp_path):
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate
    Image.new("RGB", (80, 40), (200, 0, 0)).save(buf, "JPEG", exif=exif)
    path = tmp_path / "paste.jpg"
    path.write_bytes(buf.getvalue())
    conv_id = send(ctx, None, "rotated?", [str(path)])[0][0]
    sha = ctx.store.messages(OWNER, conv_id)[0]["image_ids"][0]
    stored = Image.open(io.BytesIO(ctx.store.image_bytes(sha)))
    assert stored.size == (40, 80) and not stored.getexif()


@pytest.mark.parametrize("size", [(1920, 1080), (4032, 3024), (640, 480), (300, 2000), (20, 20)])
def test_preview_figures_match_the_processor(ctx, tmp_path, loaded, size):
    from chat.images import detail_pixels

    path = png(tmp_path, "shot.png", size=size)
    for detail in ("low", "auto", "high"):
        text = ui.preview(ctx, None, {"text": "", "files": [path]}, detail, 512, Req())
        lo, hi = detail_pixels(detail)
        img = Image.open(path).convert("RGB")
        if min(img.size) < 32:  # the sanitizer pads tiny images to 32 px first
            img = img.resize((max(img.width, 32), max(img.height, 32)))
        grid = loaded.processor.image_processor(images=[img], return_tensors="pt",
                                                size={"shortest_edge": lo, "longest_edge": hi})["image_grid_thw"][0]
        tokens = int(grid.prod()) // 4 + 2
        seen = f"{int(grid[2]) * 16}×{int(grid[1]) * 16}"
        assert f"model sees {seen}, {tokens:,} tokens" in text, (detail, text)
        assert ("(scaled down)" in text) == (int(grid.prod()) * 256 < 0.9 * max(size[0], 32) * max(size[1], 32))


def test_preview_warns_when_over_the_context(ctx, tmp_path):
    ctx.settings = Settings(data_dir=ctx.settings.data_dir, context_tokens=3000)
    text = ui.preview(ctx, None, {"text": "", "files": [png(tmp_path, "big.png", size=(4000, 3000))]},
                      "high", 512, Req())
    assert "over the limit" in text and "lower detail" in text


def test_detail_is_stored_and_used(ctx, tmp_path):
    path = png(tmp_path, "wide.png", size=(1600, 900))
    low = send(ctx, None, "low one", [path], detail="low")[0][0]
    high = send(ctx, None, "high one", [path], detail="high")[0][0]
    owner = OWNER
    low_rows, high_rows = ctx.store.messages(owner, low), ctx.store.messages(owner, high)
    assert low_rows[0]["settings"]["detail"] == "low"
    assert low_rows[-1]["usage"]["prompt_tokens"] + 1000 < high_rows[-1]["usage"]["prompt_tokens"]


@pytest.fixture
def small_ctx(tmp_path, loaded):
    yield from real_ctx(tmp_path, loaded, max_context=900)


def test_a_question_over_the_context_is_refused_and_given_back(small_ctx, tmp_path):
    ctx = small_ctx
    conv_id = send(ctx, None, "small first", max_new=16)[0][0]
    path = png(tmp_path, "doc.png", size=(1600, 1200))
    with pytest.raises(Notice, match="over the 900-token limit.*lower image detail"):
        send(ctx, conv_id, "read this document", [path], max_new=16, detail="high")
    rows = ctx.store.messages(OWNER, conv_id)
    assert [r["text"] for r in rows if r["role"] == "user"] == ["small first"]  # the chat is not stuck
    assert ctx.store.db.table("images").count == 0  # item 11: the refused message's image is not kept
    # On the page the refusal changes nothing but the notice: the box keeps what the person typed.
    box = {"text": "read this document", "files": [path]}
    out = list(page.bind(ui.send, ctx, 6)(conv_id, box, "general", 0.0, 0.9, 16, "", "high", Req()))
    assert len(out) == 1 and all(o is gr.skip() or o == gr.skip() for o in out[0][:6])
    assert out[0][6]["visible"] is True and "over the 900-token limit" in out[0][7]
    # The same question at low detail fits.
    send(ctx, conv_id, "read this document", [path], max_new=16, detail="low")
    assert ctx.store.messages(OWNER, conv_id)[-1]["status"] == "complete"


def test_preview_refuses_what_sending_would_refuse(ctx, tmp_path):
    ctx.settings = Settings(data_dir=ctx.settings.data_dir, max_image_pixels=1_000_000)
    path = png(tmp_path, "big.png", size=(1200, 1000))
    text = ui.preview(ctx, None, {"text": "", "files": [path]}, "auto", 512, Req())
    assert "too many pixels" in text or "the limit is 1 megapixels" in text, text
    assert "model sees" not in text
    with pytest.raises(Notice, match="big.png: .*1 megapixels"):
        send(ctx, None, "look", [path])


def test_regenerate_while_streaming_keeps_the_live_answer_as_a_version(ctx):
    req = Req(session="tab-3")
    gen = ui.send(ctx, None, {"text": "go on", "files": []}, "general", 0.0, 0.9, 4000, "", "auto", req)
    conv_id = next(gen)[0]
    next(gen)
    drain(ui.regenerate(ctx, conv_id, "general", 0.0, 0.9, 16, "", req))
    list(gen)  # the first stream ends (stopped)
    rows = ctx.store.messages(OWNER, conv_id)
    assert [r["role"] for r in rows] == ["user", "assistant"]
    assert rows[-1]["status"] == "complete" and rows[-1]["usage"]["completion_tokens"] == 16
    # The answer that was streaming stays as the earlier version, stopped.
    tree, _ = ctx.store.message_tree(OWNER, conv_id)
    assert [r["status"] for r in tree] == ["complete", "stopped", "complete"] and rows[-1]["versions"] == 2
