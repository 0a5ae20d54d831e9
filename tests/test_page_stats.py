"""Issue 13 (ux), handlers with the tiny model: per-answer details stored and shown again; settings restored."""

from __future__ import annotations

import re

import gradio as gr
import pytest

from chat import stats, ui, ui_conversation
from tests.test_ui import OWNER, Req, png, real_ctx, text_of


@pytest.fixture
def ctx(tmp_path, loaded):
    yield from real_ctx(tmp_path, loaded)


def ask(ctx, conv_id, text, *, files=(), mode="general", temperature=0.0, top_p=0.9, max_new=24, system="",
        detail="auto", req=None):
    return list(ui.send(ctx, conv_id, {"text": text, "files": list(files)}, mode, temperature, top_p, max_new,
                        system, detail, req or Req()))


def test_an_answer_stores_its_tokens_and_timings_and_shows_them_again(ctx, tmp_path):
    updates = ask(ctx, None, "What is this?", files=[png(tmp_path)], max_new=64)
    conv_id = updates[0][0]
    answer = ctx.store.messages(OWNER, conv_id)[-1]
    usage = answer["usage"]
    assert usage["completion_tokens"] == 64 and usage["prompt_tokens"] > 64 and usage["images_encoded"] == 1
    assert 0 < usage["ttft_s"] < 30
    assert usage["tokens_per_s"] > 0
    # The streamed answer ends with its details, collapsed, after the answer's text.
    shown = text_of(updates[-1][1][-1])
    assert re.search(r'<details class="answer-note vl-stats"><summary>Details</summary><dl>.*</dl></details>$',
                     shown), shown
    assert "64 generated" in shown and "Time to first token" in shown and "tokens/s" in shown
    assert "<dt>Images encoded</dt><dd>1</dd>" in shown
    # Reopened, the same details come back from the store.
    history = ui.open_conversation(ctx, conv_id, Req())[1]
    assert text_of(history[-1]).endswith(stats.details_html(usage))

    # A second turn on the same image reuses the cached prompt; each answer keeps its own details.
    ask(ctx, conv_id, "And now?", max_new=16)
    rows = ctx.store.messages(OWNER, conv_id)
    second = rows[-1]["usage"]
    assert second["completion_tokens"] == 16 and second["cached_tokens"] > 0 and second["images_encoded"] == 0
    history = ui.open_conversation(ctx, conv_id, Req())[1]
    assert "16 generated" in text_of(history[-1]) and "64 generated" in text_of(history[1])


def test_a_failed_answer_has_no_details():
    assert stats.details_html({"error": "boom"}) == ""
    assert stats.details_html({}) == ""
    html = stats.details_html({"prompt_tokens": 1200, "cached_tokens": 1000, "completion_tokens": 3,
                               "images_encoded": 0, "ttft_s": 0.25, "tokens_per_s": 41.5})
    assert "1,200 prompt, 3 generated" in html and "250 ms" in html and "41.5 tokens/s" in html
    assert "<dd>1,000</dd>" in html


def test_timing_measures_from_submit_to_first_text_and_the_decode_rate():
    assert stats.timing(10.0, 10.5, 12.5, 101) == {"ttft_s": 0.5, "tokens_per_s": 50.0}
    assert stats.timing(10.0, None, 12.5, 101) == {}
    assert stats.timing(10.0, 10.5, 10.5, 1) == {"ttft_s": 0.5}


def test_a_reopened_conversation_brings_back_its_settings(ctx, tmp_path):
    first = ask(ctx, None, "scene one", files=[png(tmp_path)], mode="scene", temperature=1.25, top_p=0.6,
                max_new=48, system="Be terse.", detail="high")[0][0]
    ask(ctx, first, "more", mode="scene", temperature=1.1, top_p=0.55, max_new=32, system="Be terse.",
        detail="low")
    second = ask(ctx, None, "plain", temperature=0.3, top_p=0.95, max_new=64, detail="auto")[0][0]

    assert ui.open_conversation(ctx, first, Req())[3] == "scene"
    assert ui_conversation.restore_settings(ctx, first, Req()) == (1.1, 0.55, 32, "Be terse.", "low")
    assert ui.open_conversation(ctx, second, Req())[3] == "general"
    assert ui_conversation.restore_settings(ctx, second, Req()) == (0.3, 0.95, 64, "", "auto")
    # Another browser's conversation, or none: nothing changes.
    assert all(o is gr.skip() or o == gr.skip() for o in ui_conversation.restore_settings(ctx, None, Req()))
    other = Req(browser="c" * 32)
    assert all(o is gr.skip() or o == gr.skip() for o in ui_conversation.restore_settings(ctx, first, other))


def test_delete_asks_first_and_names_the_conversation(ctx):
    conv_id = ask(ctx, None, "a *title*")[0][0]
    shown, question = ui_conversation.ask_delete(ctx, conv_id, Req())
    assert shown["visible"] is True and "Delete “a \\*title\\*”?" in question
    assert ctx.store.get_conversation(OWNER, conv_id)  # nothing deleted by asking
    with pytest.raises(ui.Notice):
        ui_conversation.ask_delete(ctx, None, Req())
