"""Over-long conversations (issue 14): the oldest turns are left out (and the answer says so) instead of a refusal.

The page's handlers on the tiny model with a small context: the conversation's turns outgrow it, the next
message still gets an answer with the note, the history keeps every turn, and with --no-trim-history the
message is refused as before. The selection rules (newest image kept) are checked on chat.trim itself.
"""

from __future__ import annotations

import pytest
from PIL import Image

from chat import trim, ui
from chat.config import Settings
from chat.engine.local.engine import Engine
from chat.engine.local.runner import Runner
from chat.engine.types import ChatRequest, GenParams
from chat.images import open_clean
from chat.notices import Notice
from chat.store import Store
from tests.test_ui import Req

ME = ui.owner_of(Req())  # the store's owner key for the test browser

CONTEXT = 1024
LONG = " ".join(f"word{i}" for i in range(40))  # ~120 tokens of text per question


def ctx_for(tmp_path, loaded, trim_history: bool):
    store = Store(tmp_path / "data")
    settings = Settings(data_dir=tmp_path / "data", context_tokens=CONTEXT, trim_history=trim_history)
    engine = Engine(Runner(loaded.model, loaded.processor), lambda i: open_clean(store.image_bytes(i)),
                    max_context=CONTEXT)
    engine.start(warmup=False)
    return ui.Ctx(store=store, engine=engine, settings=settings, random_weights=True)


@pytest.fixture
def make_ctx(tmp_path, loaded):
    made = []

    def make(trim_history: bool):
        made.append(ctx_for(tmp_path / str(len(made)), loaded, trim_history))
        return made[-1]

    yield make
    for c in made:
        c.engine.shutdown()
        c.store.close()


def send(ctx, conv_id, text, files=(), max_new=16):
    return list(ui.send(ctx, conv_id, {"text": text, "files": list(files)}, "general", 0.0, 0.9, max_new, "",
                        detail="low", request=Req()))


def png(tmp_path, name="a.png"):
    path = tmp_path / name
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    return str(path)


def grow(ctx, tmp_path, turns: int) -> str:
    """A conversation of `turns` long questions (the first one with an image), each answered."""
    (tmp_path / "img").mkdir(exist_ok=True)
    outs = send(ctx, None, f"First. {LONG}", [png(tmp_path / "img")])
    conv_id = next(out[0] for out in outs if isinstance(out[0], str))
    for n in range(1, turns):
        send(ctx, conv_id, f"Question {n}. {LONG}")
    return conv_id


def fits_alone(ctx, conv_id) -> int:
    """How many turns the stored conversation holds."""
    return sum(1 for r in ctx.store.messages(ME, conv_id) if r["role"] == "user")


def test_an_over_long_conversation_leaves_out_its_oldest_turns_and_says_so(make_ctx, tmp_path):
    ctx = make_ctx(True)
    conv_id = grow(ctx, tmp_path, 6)  # a 300-token image and 6 x ~120 tokens of text: over the 1024-token context
    assert fits_alone(ctx, conv_id) == 6
    outs = send(ctx, conv_id, f"And now? {LONG}")
    rows = ctx.store.messages(ME, conv_id)
    # Every turn is still in the history; the new one was answered, not refused.
    assert [r["role"] for r in rows] == ["user", "assistant"] * 7
    answer = rows[-1]
    assert answer["status"] == "complete"
    left_out = answer["usage"]["left_out_turns"]
    assert 1 <= left_out <= 5
    assert answer["usage"]["kept_image_turn"] is True  # the first turn's image is the newest image
    assert answer["usage"]["prompt_tokens"] + 16 <= CONTEXT
    note = f"Earlier messages ({left_out} turns) were left out" if left_out > 1 else "Earlier messages (1 turn)"
    # Said in the chat (under the answer, also when the conversation is opened again) and in the status line.
    shown = outs[-1][1][-1]["content"]["text"]
    assert note in shown and "vl-trimmed" in shown
    assert note in outs[-1][4]
    reopened = ui.open_conversation(ctx, conv_id, Req())[1]
    assert note in reopened[-1]["content"]["text"]
    assert "The most recent image, with its question and answer, was kept." in reopened[-1]["content"]["text"]
    # An earlier answer (nothing left out then) has no such note.
    assert "vl-trimmed" not in reopened[1]["content"]["text"]
    # Before sending, the preview of an attachment that would not fit says what will happen.
    big = tmp_path / "big.png"
    Image.new("RGB", (1600, 1600), (1, 2, 3)).save(big)
    shown = ui.preview(ctx, conv_id, {"text": "", "files": [str(big)]}, "high", 16, Req())
    assert "tokens over the limit" in shown and "the oldest turns are left out to make room" in shown


def test_without_the_option_it_is_refused_as_before(make_ctx, tmp_path):
    ctx = make_ctx(False)
    conv_id = grow(ctx, tmp_path, 2)
    before = ctx.store.messages(ME, conv_id)
    with pytest.raises(Notice, match="over the 1024-token limit|more than the 1024-token"):
        send(ctx, conv_id, f"And now? {LONG} {LONG} {LONG}")
    assert ctx.store.messages(ME, conv_id) == before  # nothing stored
    big = tmp_path / "big.png"
    Image.new("RGB", (1600, 1600), (1, 2, 3)).save(big)
    assert "left out" not in ui.preview(ctx, conv_id, {"text": "", "files": [str(big)]}, "high", 16, Req())
    # Even with the option on, a single message that cannot fit alone is refused (there is nothing to leave out).
    on = make_ctx(True)
    with pytest.raises(Notice, match="over the 1024-token limit|more than the 1024-token"):
        send(on, None, " ".join([LONG] * 5))


def req(*turns, system="Be brief."):
    messages = [{"role": "system", "content": system}]
    for text, image in turns:
        parts = ([{"type": "image", "image_id": "x", "detail": "low"}] if image else []) + [{"type": "text",
                                                                                            "text": text}]
        messages += [{"role": "user", "content": parts}, {"role": "assistant", "content": f"answer to {text}"}]
    return ChatRequest(messages[:-1], GenParams(max_new_tokens=10))


def size(messages):
    """A stand-in tokenizer: 10 tokens a message, 50 more for an image."""
    return sum(10 + (50 if trim._has_image(m) else 0) for m in messages)


def texts(request):
    return [m["content"][-1]["text"] for m in request.messages if m["role"] == "user"]


def test_the_rules_system_prompt_newest_image_and_latest_turns():
    five = req(("t0", False), ("t1", True), ("t2", False), ("t3", False), ("t4", False))
    # All of it: 10 + 9 x 10 + 50 = 150 tokens. Room 110 - 10: the image turn (70) + system (10) + the last turn.
    short, left = trim.shortened(five, size, 110)
    assert short.messages[0] == {"role": "system", "content": "Be brief."}
    assert texts(short) == ["t1", "t4"] and left == trim.Trimmed(turns=3, kept_image=True)
    # More room: more of the latest turns come back, the image's turn stays.
    short, left = trim.shortened(five, size, 130)
    assert texts(short) == ["t1", "t3", "t4"] and left.turns == 2
    # The image's turn and the last one do not fit together: the image goes too.
    short, left = trim.shortened(five, size, 60)
    assert texts(short) == ["t3", "t4"] and left == trim.Trimmed(turns=3, kept_image=False)
    # The newest turn has its own image: no older turn is pinned.
    short, left = trim.shortened(req(("t0", True), ("t1", False), ("t2", True)), size, 85)
    assert texts(short) == ["t2"] and left == trim.Trimmed(turns=2, kept_image=False)
    # Nothing fits but the system prompt and the last turn... and not even that: None (refused as before).
    assert trim.shortened(five, size, 25) is None
    assert trim.shortened(req(("only", False)), size, 15) is None
    # The note, in the page's language.
    from chat.i18n_text import speaking

    usage = {"left_out_turns": 3, "kept_image_turn": True}
    assert trim.note_text(usage) == ("Earlier messages (3 turns) were left out to fit the model's context. The most "
                                     "recent image, with its question and answer, was kept.")
    with speaking("zh-CN"):
        assert trim.note_text(usage) == ("为了放进模型的上下文，较早的消息（3 轮）未发送给模型。"
                                         "最近的一张图片及其问答已保留。")
    assert trim.note_text({"prompt_tokens": 10}) == ""


# -- the API, behind --trim-history-api (off by default: a client usually sends what it wants answered) ------------


def test_the_api_leaves_out_the_oldest_turns_with_the_option_and_says_so_in_a_header(tmp_path_factory, model_dir):
    import openai

    from tests.servers import Server, data_dir

    server = Server(data_dir(tmp_path_factory, model_dir, "trim-api"), "--context-tokens", str(CONTEXT),
                    "--trim-history-api").start()
    try:
        sdk = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "system", "content": "Be brief."}]
        for n in range(10):  # ~10 x 130 tokens: over the 1024-token context
            messages += [{"role": "user", "content": f"Question {n}. {LONG}"},
                         {"role": "assistant", "content": f"Answer {n}."}]
        messages.append({"role": "user", "content": "And the last one?"})
        raw = sdk.chat.completions.with_raw_response.create(model="tiny-random", messages=messages, max_tokens=16)
        left_out = int(raw.headers["x-vlchat-left-out-turns"])
        completion = raw.parse()
        assert completion.choices[0].message.content and 1 <= left_out <= 10
        assert completion.usage.prompt_tokens + 16 <= CONTEXT
        # Without max_tokens the answer may take the room left: half the context is kept for it (the default
        # answer length, 1024, is more than half).
        raw = sdk.chat.completions.with_raw_response.create(model="tiny-random", messages=messages)
        assert int(raw.headers["x-vlchat-left-out-turns"]) > left_out
        assert raw.parse().usage.prompt_tokens <= CONTEXT // 2
        # A conversation that fits has no such header; one message too long on its own is still refused.
        raw = sdk.chat.completions.with_raw_response.create(model="tiny-random", messages=messages[-1:], max_tokens=16)
        assert "x-vlchat-left-out-turns" not in raw.headers
        with pytest.raises(openai.BadRequestError) as info:
            sdk.chat.completions.create(model="tiny-random", max_tokens=16,
                                        messages=[{"role": "user", "content": " ".join([LONG] * 10)}])
        assert info.value.code == "context_length_exceeded"
    finally:
        server.stop()
