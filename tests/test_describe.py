"""Describe in one step (chat.describe): the handlers called directly, on a real store and the tiny model's engine.

"Describe a photo" sends the photo at once with the mode's describe prompt; a photo with no text does the
same; the follow-up buttons send their question and show only once there is an answer; a refusal stores nothing.
"""

from __future__ import annotations

import gradio as gr
import pytest

from chat import describe, page, ui
from chat.conversation import MODES
from chat.notices import Notice
from tests.test_ui import OWNER, Req, png, real_ctx, text_of


@pytest.fixture
def ctx(tmp_path, loaded):
    yield from real_ctx(tmp_path, loaded)


@pytest.fixture
def small_ctx(tmp_path, loaded):
    yield from real_ctx(tmp_path, loaded, max_context=900)


def skipped(value) -> bool:
    return value is gr.skip() or value == gr.skip()


def run_describe(ctx, conv_id, photo, mode="scene", max_new=24, req=None, detail="auto"):
    return list(describe.describe(ctx, conv_id, photo, mode, 0.0, 0.9, max_new, "", detail, req or Req()))


def run_follow_up(ctx, label, conv_id, mode="scene", req=None):
    return list(describe.follow_up(ctx, label, conv_id, mode, 0.0, 0.9, 16, "", "auto", req or Req()))


def shown(ctx, conv_id, mode, req=None) -> tuple[bool, list[str]]:
    """Whether the follow-up row shows, and the labels of its visible buttons."""
    row, *buttons = describe.follow_ups(ctx, conv_id, mode, req or Req())
    return row["visible"], [b["value"] for b in buttons if b.get("visible")]


def nothing_stored(ctx) -> bool:
    return ctx.store.list_conversations(OWNER) == [] and ctx.store.db.table("images").count == 0


@pytest.mark.parametrize("mode", ["scene", "troubleshoot", "general"])
def test_describe_sends_the_modes_prompt_at_once_and_stores_it(ctx, tmp_path, mode):
    updates = run_describe(ctx, None, png(tmp_path), mode=mode)
    conv_id = updates[0][0]
    prompt = MODES[mode].describe_prompt
    rows = ctx.store.messages(OWNER, conv_id)
    assert [r["role"] for r in rows] == ["user", "assistant"]
    assert rows[0]["text"] == prompt and len(rows[0]["image_ids"]) == 1
    assert rows[1]["status"] == "complete" and rows[1]["text"]
    assert ctx.store.get_conversation(OWNER, conv_id)["mode"] == mode
    # On the page: the question shown is the prompt, under the photo; the title names the photo (issue 13).
    history = updates[-1][1]
    assert text_of(history[0]).endswith(f"<p>{prompt}</p>")  # (after the file names, if shown)
    assert history[0]["content"][0]["file"]["path"].endswith(rows[0]["image_ids"][0] + ".png")
    assert updates[0][5] == "Photo: a.png"
    # What is typed in the message box meanwhile stays there: no update of the box.
    assert all(skipped(u[2]) for u in updates)


def test_describe_in_a_conversation_adds_a_turn(ctx, tmp_path):
    conv_id = ui_send(ctx, None, "hello")
    run_describe(ctx, conv_id, png(tmp_path), mode="general")
    rows = ctx.store.messages(OWNER, conv_id)
    assert [r["text"] for r in rows if r["role"] == "user"] == ["hello", MODES["general"].describe_prompt]


def ui_send(ctx, conv_id, text, files=(), mode="scene"):
    return list(ui.send(ctx, conv_id, {"text": text, "files": list(files)}, mode, 0.0, 0.9, 24, "", "auto",
                        Req()))[0][0]


def test_a_photo_with_no_text_asks_the_describe_prompt(ctx, tmp_path):
    """Paste an image and press Enter: that is enough."""
    conv_id = ui_send(ctx, None, "   ", [png(tmp_path)], mode="troubleshoot")
    question = ctx.store.messages(OWNER, conv_id)[0]
    assert question["text"] == MODES["troubleshoot"].describe_prompt and question["image_ids"]
    assert ctx.store.get_conversation(OWNER, conv_id)["title"] == "Photo: a.png"  # not the prompt (issue 13)
    # Typed text is asked as typed; no text and no image is still refused.
    conv_id = ui_send(ctx, None, "What is this?", [png(tmp_path, "b.png", colour=(1, 2, 3))])
    assert ctx.store.messages(OWNER, conv_id)[0]["text"] == "What is this?"
    with pytest.raises(Notice, match="Type a question or attach an image"):
        ui_send(ctx, None, "")


def test_follow_ups_show_once_there_is_an_answer_and_send_their_question(ctx, tmp_path):
    labels = [label for label, _ in MODES["scene"].follow_ups]
    assert labels == ["More detail", "Read any text", "What colours?", "Is anything in the way?"]
    assert shown(ctx, None, "scene") == (False, labels)  # an empty page: hidden
    conv_id = run_describe(ctx, None, png(tmp_path))[0][0]
    assert shown(ctx, conv_id, "scene") == (True, labels)
    # Each mode has its own questions.
    for mode in MODES.values():
        assert shown(ctx, conv_id, mode.key) == (True, [label for label, _ in mode.follow_ups])
        assert len(mode.follow_ups) <= describe.MAX_FOLLOW_UPS

    updates = run_follow_up(ctx, "Read any text", conv_id)
    assert all(skipped(u[2]) for u in updates)
    rows = ctx.store.messages(OWNER, conv_id)
    question = dict(MODES["scene"].follow_ups)["Read any text"]
    assert [r["text"] for r in rows if r["role"] == "user"][-1] == question
    assert rows[-1]["role"] == "assistant" and rows[-1]["status"] == "complete"
    assert text_of(updates[-1][1][-2]) == f"<p>{question}</p>"
    # A label from the mode that was on screen when the button was drawn still works after a switch.
    run_follow_up(ctx, "What colours?", conv_id, mode="general")
    assert ctx.store.messages(OWNER, conv_id)[-2]["text"] == dict(MODES["scene"].follow_ups)["What colours?"]
    # Another browser does not see this conversation's answer.
    assert shown(ctx, conv_id, "scene", Req(browser="c" * 32))[0] is False


def test_follow_up_refusals_store_nothing(ctx, tmp_path):
    with pytest.raises(Notice, match="follow-up questions are about its answer"):
        run_follow_up(ctx, "More detail", None)
    with pytest.raises(Notice, match="not available"):
        run_follow_up(ctx, "Write me a poem", None)
    assert nothing_stored(ctx)
    conv_id = run_describe(ctx, None, png(tmp_path))[0][0]
    before = ctx.store.messages(OWNER, conv_id)
    with pytest.raises(Notice, match="no longer exists"):
        run_follow_up(ctx, "More detail", conv_id, req=Req(browser="c" * 32))
    ctx.engine.max_waiting = 0
    with pytest.raises(Notice, match="busy"):
        run_follow_up(ctx, "More detail", conv_id)
    assert ctx.store.messages(OWNER, conv_id) == before


def test_describe_refusals_store_nothing(ctx, tmp_path):
    with pytest.raises(Notice, match="Choose a photo"):
        run_describe(ctx, None, None)
    fake = tmp_path / "cat.png"
    fake.write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(Notice, match="cat.png: "):
        run_describe(ctx, None, str(fake))
    with pytest.raises(Notice, match="reload the page"):
        run_describe(ctx, None, png(tmp_path), req=Req(browser=None))
    waiting, ctx.engine.max_waiting = ctx.engine.max_waiting, 0
    with pytest.raises(Notice, match="busy"):
        run_describe(ctx, None, png(tmp_path))
    ctx.engine.max_waiting = waiting
    ctx.engine.ready.clear()
    try:
        with pytest.raises(Notice, match="not ready yet"):
            run_describe(ctx, None, png(tmp_path))
    finally:
        ctx.engine.ready.set()
    assert nothing_stored(ctx)
    assert shown(ctx, None, "scene")[0] is False


def test_describe_refused_on_the_page_changes_nothing_but_the_notice(small_ctx, tmp_path):
    """Through the page's wrapper: a photo too big for the context is refused before anything is stored."""
    ctx = small_ctx
    path = png(tmp_path, "doc.png", size=(1600, 1200))
    out = list(page.bind(describe.describe, ctx, 6)(None, path, "scene", 0.0, 0.9, 16, "", "high", Req()))
    assert len(out) == 1 and all(skipped(o) for o in out[0][:6])
    assert out[0][6]["visible"] is True and "over the 900-token limit" in out[0][7]
    assert nothing_stored(ctx)
    # The same photo at low detail fits, and the page's first update hides the notice.
    out = list(page.bind(describe.describe, ctx, 6)(None, path, "scene", 0.0, 0.9, 16, "", "low", Req()))
    assert out[0][6]["visible"] is False
    rows = ctx.store.messages(OWNER, out[0][0])
    assert rows[0]["text"] == MODES["scene"].describe_prompt and rows[-1]["status"] == "complete"


def test_scene_mode_answers_short_first():
    scene = MODES["scene"]
    assert "two or three short sentences" in scene.system_prompt and "urgent" in scene.system_prompt
    assert scene.max_new_tokens < MODES["general"].max_new_tokens
    assert all(m.describe_prompt and m.follow_ups for m in MODES.values())


def test_no_second_answer_while_one_is_coming(ctx, tmp_path):
    """Describe or a follow-up pressed while this page shows an answer still coming is refused, nothing stored."""
    conv_id = run_describe(ctx, None, png(tmp_path))[0][0]
    req = Req(session="tab-busy")
    gen = ui.send(ctx, conv_id, {"text": "go on", "files": []}, "scene", 0.0, 0.9, 4000, "", "auto", req)
    next(gen), next(gen)  # streaming now
    stored = len(ctx.store.messages(OWNER, conv_id))
    with pytest.raises(Notice, match="still coming"):
        run_describe(ctx, conv_id, png(tmp_path, "b.png", colour=(1, 2, 3)), req=req)
    with pytest.raises(Notice, match="still coming"):
        run_follow_up(ctx, "More detail", conv_id, req=req)
    assert len(ctx.store.messages(OWNER, conv_id)) == stored
    assert ctx.store.db.table("images").count == 1
    ui.stop(ctx, req)
    list(gen)
    run_follow_up(ctx, "More detail", conv_id, req=req)  # once it has ended
    assert ctx.store.messages(OWNER, conv_id)[-1]["status"] == "complete"


def test_describe_is_off_until_the_model_serves(ctx):
    ctx.engine.ready.clear()
    try:
        assert describe.ready(ctx)["interactive"] is False
        built = page.build(ctx)
        button = next(b for b in built.blocks.values() if getattr(b, "elem_id", None) == "describe-photo")
        assert button.interactive is False
    finally:
        ctx.engine.ready.set()
    assert describe.ready(ctx)["interactive"] is True
