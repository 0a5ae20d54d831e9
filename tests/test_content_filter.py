"""Content filters (issue 14): --blocklist refuses messages and cuts answers before anything matching is sent.

Unit tests of the blocklist's matching (case, compatibility forms, Chinese, word edges), of the
engine wrapper with a scripted engine (an entry split across stream deltas is never emitted, the
kept text ends before it, the inner request is cancelled), the page's handlers over the tiny
model, and the API with the real `openai` client against real servers.
"""

from __future__ import annotations

import asyncio
import re
import threading

import httpx
import pytest

from chat.config import Settings, SettingsError, load_settings
from chat.engine.filtered import ContentFiltered, FilteredEngine
from chat.engine.handle import Handle
from chat.engine.metrics import Metrics
from chat.engine.types import ChatRequest, Delta, Done, Failed, GenParams, Usage
from chat.moderation import Blocklist, BlocklistError, read_blocklist

# -- the blocklist --------------------------------------------------------------------------


def test_matching_is_case_and_form_blind_and_keeps_to_whole_words_in_spaced_scripts():
    b = Blocklist(["bad", "Bad Word", "ﬁsh", "café", "敏感词", "ナイフ"])
    assert b.check_input("a bad day") == "bad"
    assert b.check_input("BAD!") == "bad"
    assert b.check_input("ＢＡＤ") == "bad"  # full-width letters (NFKC)
    assert b.check_input("b\u200bad") == "bad"  # a zero-width space inside does not hide it
    assert b.check_input("bad\n\n  WORD") == "bad"  # the first match; white space runs are one space
    assert b.check_input("that bad  word") == "bad"
    assert Blocklist(["bad word"]).check_input("that BAD\n word.") == "bad word"
    assert b.check_input("fish") == "ﬁsh"  # a ligature in the list matches plain letters
    assert b.check_input("cafe\u0301 au lait") == "café"  # decomposed accent
    assert b.check_input("CAFÉ") == "café"
    # Whole words in scripts written with spaces: no match inside longer words.
    for fine in ("a badge", "class", "badminton", "cafes", "fisherman", "sinbad2"):
        assert b.check_input(fine) is None, fine
    # Chinese and Japanese have no spaces: an entry matches inside longer text, and a Latin word next to them.
    assert b.check_input("这是敏感词吗") == "敏感词"
    assert b.check_input("敏感 词") is None
    assert b.check_input("大きなナイフです") == "ナイフ"
    assert b.check_input("badです") == "bad"


def test_a_file_has_comments_and_blank_lines_and_clear_errors(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("\ufeff# words we do not serve\n\n  Spam  \n敏感词\n# comment\n", encoding="utf-8")
    assert read_blocklist(path) == ["Spam", "敏感词"]
    b = Blocklist.from_file(path)
    assert b.check_input("# comment") is None and b.check_input("SPAM") == "Spam"
    with pytest.raises(BlocklistError, match="does not exist"):
        read_blocklist(tmp_path / "missing.txt")
    with pytest.raises(BlocklistError, match="is a folder"):
        read_blocklist(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("ok\nmal\xe9\n".encode("latin-1"))
    with pytest.raises(BlocklistError, match=r"not UTF-8 text \(line 2\)"):
        read_blocklist(tmp_path / "latin1.txt")
    (tmp_path / "long.txt").write_text("x" * 300)
    with pytest.raises(BlocklistError, match="line 1 has 300 characters"):
        read_blocklist(tmp_path / "long.txt")


def test_a_bad_blocklist_setting_stops_start_up_with_the_reason(tmp_path, capsys):
    with pytest.raises(SettingsError, match=r"--blocklist \(VLCHAT_BLOCKLIST\): the file .* does not exist"):
        Settings(blocklist=str(tmp_path / "nope.txt"))
    with pytest.raises(SystemExit) as stop:
        load_settings(["--blocklist", str(tmp_path)], environ={})
    assert stop.value.code == 2
    assert "vlchat could not start: --blocklist (VLCHAT_BLOCKLIST):" in capsys.readouterr().err
    good = tmp_path / "ok.txt"
    good.write_text("spam\n")
    assert load_settings([], environ={"VLCHAT_BLOCKLIST": str(good)}).blocklist == str(good)


def test_streaming_holds_back_only_what_could_still_become_a_match():
    b = Blocklist(["bad", "敏感词"])
    assert b.check_output("a ba").safe == 2  # "ba" may become "bad"
    assert b.check_output("a bad").safe == 2  # "bad" may yet be "badge"
    assert b.check_output("a badg").safe == 6  # it was not
    assert b.check_output("a bad ") == b.check_output("a bad ", start=2)
    assert b.check_output("a bad ").cut == 2
    assert b.check_output("a bad", final=True).cut == 2  # the end of the answer ends the word
    assert b.check_output("这是敏感").safe == 2
    assert b.check_output("这是敏感词").cut == 2
    assert b.check_output("nothing here").safe == len("nothing here")


# -- the engine wrapper, with a scripted engine ------------------------------------------------


class Scripted:
    """An engine that answers every request with the same deltas; `hold` keeps it open until cancelled."""

    def __init__(self, deltas: list[str], hold: bool = False) -> None:
        self.deltas, self.hold = deltas, hold
        self.metrics = Metrics()
        self.ready = threading.Event()
        self.ready.set()
        self.waiting = 0
        self.submitted: list[Handle] = []

    def submit(self, request, on_finish=None) -> Handle:
        handle = Handle(request, on_finish)
        handle._claim()
        self.submitted.append(handle)
        threading.Thread(target=self._run, args=(handle,), daemon=True).start()
        return handle

    def _run(self, handle: Handle) -> None:
        text = ""
        for piece in self.deltas:
            if handle.cancelled:
                break
            text += piece
            handle._emit_text(piece)
        if self.hold:
            handle._cancel.wait(30)
        reason = "cancelled" if handle.cancelled else "stop"
        handle._finish(Done(reason, text, Usage(7, 0, len(self.deltas), 0)))


def request(text: str = "hi", system: str = "") -> ChatRequest:
    messages = [{"role": "system", "content": system}] if system else []
    return ChatRequest([*messages, {"role": "user", "content": [{"type": "text", "text": text}]}], GenParams())


def collect(handle) -> tuple[list[str], object]:
    deltas, final = [], None
    for event in handle.events(timeout=30):
        if isinstance(event, Delta):
            deltas.append(event.text)
        else:
            final = event
    return deltas, final


def metric(engine, where: str) -> float:
    body = engine.metrics.render().decode()
    found = re.search(rf'^vlchat_content_filtered_total{{where="{where}"}} (\S+)$', body, re.M)
    return float(found.group(1))


@pytest.mark.parametrize("deltas, entry, kept", [
    (["Hello, this is ba", "d news and more"], "bad", "Hello, this is "),
    (["我们不谈", "敏", "感", "词之外的事"], "敏感词", "我们不谈"),
    (["one ", "B", "ad", " ", "wor", "d", ". More"], "bad word", "one "),
])
def test_an_entry_split_across_deltas_is_never_sent_and_the_request_is_cancelled(deltas, entry, kept):
    inner = Scripted(deltas, hold=True)
    engine = FilteredEngine(inner, Blocklist([entry]))
    finals = []
    handle = engine.submit(request(), on_finish=finals.append)
    sent, final = collect(handle)
    assert "".join(sent) == kept
    assert isinstance(final, Done) and final.finish_reason == "content_filter" and final.text == kept
    assert finals == [final] and handle.result is final  # what the page stores is the kept text
    assert inner.submitted[0].wait(30).finish_reason == "cancelled"  # the inner request was stopped
    assert final.usage.prompt_tokens == 7
    assert metric(engine, "output") == 1 and metric(engine, "input") == 0


def test_held_back_text_is_released_when_it_is_not_a_match():
    inner = Scripted(["a ba", "dge, a ", "bad", "minton racket; 敏感", "性"])
    engine = FilteredEngine(inner, Blocklist(["bad", "敏感词"]))
    sent, final = collect(engine.submit(request()))
    assert sent[0] == "a "  # "ba" waited for the next text
    assert "".join(sent) == final.text == "a badge, a badminton racket; 敏感性"
    assert final.finish_reason == "stop" and metric(engine, "output") == 0


def test_a_match_at_the_very_end_is_cut_when_the_answer_ends():
    engine = FilteredEngine(Scripted(["that is ", "bad"]), Blocklist(["bad"]))
    sent, final = collect(engine.submit(request()))
    assert "".join(sent) == final.text == "that is "
    assert final.finish_reason == "content_filter"


def test_async_readers_see_the_same_filtered_stream():
    engine = FilteredEngine(Scripted(["x ", "敏感", "词 y"], hold=True), Blocklist(["敏感词"]))

    async def read():
        handle = engine.submit(request())
        return [e async for e in handle.aevents()]

    events = asyncio.run(read())
    assert [e.text for e in events[:-1]] == ["x "]
    assert events[-1].finish_reason == "content_filter" and events[-1].text == "x "


def test_input_with_a_blocked_entry_is_refused_before_the_engine_sees_it():
    inner = Scripted(["fine"])
    engine = FilteredEngine(inner, Blocklist(["forbidden thing", "敏感词"]))
    with pytest.raises(ContentFiltered) as refused:
        engine.submit(request("tell me about the FORBIDDEN  thing"))
    assert refused.value.code == "content_filter"
    with pytest.raises(ContentFiltered):
        engine.submit(request("hello", system="你是一个会说敏感词的助手"))
    earlier = ChatRequest([{"role": "user", "content": "a forbidden thing"}, {"role": "assistant", "content": "ok"},
                           {"role": "user", "content": "go on"}])
    with pytest.raises(ContentFiltered):
        engine.submit(earlier)
    assert inner.submitted == [] and metric(engine, "input") == 3
    # An answer the model gave earlier is not the person's text; a forbidden word of it does not refuse.
    quoted = ChatRequest([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "forbidden thing"},
                          {"role": "user", "content": "go on"}])
    assert collect(engine.submit(quoted))[1].text == "fine"


def test_a_failure_keeps_only_the_text_before_a_match():
    class Failing(Scripted):
        def _run(self, handle):
            handle._emit_text("it was ")
            handle._finish(Failed("The model failed.", "generation_failed", "it was bad"))

    engine = FilteredEngine(Failing([]), Blocklist(["bad"]))
    sent, final = collect(engine.submit(request()))
    assert isinstance(final, Failed) and final.text == "it was " and "".join(sent) == "it was "


def test_the_wrapper_is_the_engine_for_everything_else():
    inner = Scripted([])
    inner.max_prompt_chars = 1234
    engine = FilteredEngine(inner, Blocklist(["x"]))
    assert engine.max_prompt_chars == 1234 and engine.ready is inner.ready and engine.metrics is inner.metrics
    assert "vlchat_content_filtered_total" in engine.metrics.render().decode()


# -- the page's handlers, over the tiny model ---------------------------------------------------

BROWSER = "c" * 32


def blockable(answer: str) -> str:
    """A whole word of `answer` (letters or digits between other characters), not at its start: an entry to block."""
    words = [w for w in re.finditer(r"[^\W_]+", answer) if 0 < w.start() and w.end() < len(answer)]
    for found in sorted(words, key=lambda w: len(w.group()) < 3):  # rather one of 3 characters or more
        start, end = found.span()
        if Blocklist([found.group()]).check_input(answer[start - 1:end + 1]):
            return found.group()
    pytest.skip(f"no whole word in the tiny model's answer {answer!r}")


@pytest.fixture
def page(tmp_path, loaded):
    """A page context over the tiny model's engine; `ctx.engine` is swapped for a filtered one by the tests."""
    from types import SimpleNamespace

    from chat import ui
    from chat.engine.local.engine import Engine
    from chat.engine.local.runner import Runner
    from chat.images import open_clean
    from chat.store import Store

    store = Store(tmp_path / "data")
    engine = Engine(Runner(loaded.model, loaded.processor), lambda i: open_clean(store.image_bytes(i)))
    engine.start(warmup=False)
    ctx = ui.Ctx(store=store, engine=engine, settings=Settings(data_dir=tmp_path / "data"), random_weights=True)
    req = SimpleNamespace(session_hash="s1", username=None, state=SimpleNamespace(vlchat_browser=BROWSER))

    def send(text, system=""):
        return list(ui.send(ctx, None, {"text": text, "files": []}, "general", 0.0, 0.9, 48, system, "auto", req))

    yield SimpleNamespace(ctx=ctx, engine=engine, send=send, owner="browser:" + BROWSER)
    engine.shutdown()
    store.close()


def test_page_refuses_a_blocked_message_and_stores_nothing(page):
    from chat.notices import Notice

    page.ctx.engine = FilteredEngine(page.engine, Blocklist(["forbidden", "敏感词"]))
    with pytest.raises(Notice, match="content filter blocks.*still in the box"):
        page.send("Is this Forbidden?")
    with pytest.raises(Notice, match="content filter"):
        page.send("hello", system="请说敏感词")
    assert page.ctx.store.list_conversations(page.owner) == []
    assert metric(page.ctx.engine, "input") == 2


def test_page_shows_and_stores_the_answer_cut_before_a_blocked_word(page):
    from chat.render import message_html

    plain = page.send("Say something.")
    conv = page.ctx.store.messages(page.owner, plain[0][0])
    answer = conv[-1]["text"]
    entry = blockable(answer)
    kept = answer[: Blocklist([entry]).check_output(answer, final=True).cut]
    assert kept and Blocklist([entry]).check_input(kept) is None, (answer, entry)

    page.ctx.engine = FilteredEngine(page.engine, Blocklist([entry]))
    updates = page.send("Say something.")
    rows = page.ctx.store.messages(page.owner, updates[0][0])
    assert rows[-1]["status"] == "filtered" and rows[-1]["text"] == kept
    assert updates[-1][4] == "The answer was stopped by the content filter."
    final = updates[-1][1][-1]["content"]["text"]
    assert final.startswith(message_html(kept)) and "Stopped by the content filter." in final
    prefixes = {message_html(kept[:n]) for n in range(len(kept) + 1)}
    for update in updates:  # every answer drawn while it streamed was part of the kept text, never more
        chat = update[1]
        if isinstance(chat, list) and chat and chat[-1]["role"] == "assistant":
            assert chat[-1]["content"]["text"].split('<p class="answer-note', 1)[0].strip() in prefixes
    assert metric(page.ctx.engine, "output") == 1


# -- the API, with the real openai client against real servers ------------------------------------

QUESTION = [{"role": "user", "content": "Say something."}]


def sdk(base: str):
    import openai

    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_dir):
    """The greedy answer of a plain server, then a server whose --blocklist holds a word of that answer."""
    from tests.servers import Server, data_dir

    plain = Server(data_dir(tmp_path_factory, model_dir, "plain")).start()
    try:
        full = sdk(plain.base).chat.completions.create(model="vlchat", messages=QUESTION, temperature=0,
                                                      max_tokens=48)
    finally:
        plain.stop()
    assert full.usage.completion_tokens == 48  # the tiny model never stops by itself
    answer = full.choices[0].message.content
    entry = blockable(answer)
    folder = data_dir(tmp_path_factory, model_dir, "filtered")
    listing = folder / "blocklist.txt"
    listing.write_text(f"# test list\n{entry}\n禁止词\nforbidden phrase\n", encoding="utf-8")
    server = Server(folder, "--blocklist", str(listing)).start()
    yield server, answer, entry
    server.stop()


def test_api_refuses_blocked_input_with_400_content_filter(served):
    import openai

    from tests.servers import metric as server_metric

    server, _, _ = served
    client = sdk(server.base)
    for messages in ([{"role": "user", "content": "what is a Forbidden   Phrase?"}],
                     [{"role": "system", "content": "你会说禁止词"}, {"role": "user", "content": "hi"}]):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="vlchat", messages=messages, stream=True)
        assert refused.value.status_code == 400 and refused.value.code == "content_filter"
        assert "content filter" in refused.value.body["message"]
    assert server_metric(server.base, 'vlchat_content_filtered_total{where="input"}') == 2


def test_api_stream_stops_before_a_blocked_word_with_finish_reason_content_filter(served):
    from tests.servers import metric as server_metric

    server, answer, entry = served
    kept = answer[: Blocklist([entry]).check_output(answer, final=True).cut]
    stream = sdk(server.base).chat.completions.create(model="vlchat", messages=QUESTION, temperature=0,
                                                      max_tokens=48, stream=True)
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "content_filter"
    assert "".join(pieces) == kept and kept
    # No chunk, nor the text so far at any chunk, ever held the entry.
    assert all(Blocklist([entry]).check_input("".join(pieces[:n])) is None for n in range(len(pieces) + 1))
    whole = sdk(server.base).chat.completions.create(model="vlchat", messages=QUESTION, temperature=0, max_tokens=48)
    assert whole.choices[0].finish_reason == "content_filter" and whole.choices[0].message.content == kept
    assert whole.usage.completion_tokens < 48  # the generation was stopped at the match, not run to the end
    response = sdk(server.base).responses.create(model="vlchat", input="Say something.", temperature=0,
                                                 max_output_tokens=48)
    assert response.status == "incomplete" and response.incomplete_details.reason == "content_filter"
    assert response.output_text == kept
    assert server_metric(server.base, 'vlchat_content_filtered_total{where="output"}') == 3
    body = httpx.get(server.base + "/health", timeout=5).json()
    assert body["status"] == "ok"  # it keeps serving


def test_the_filter_wraps_the_remote_engine_too_and_closes_the_upstream_stream():
    from chat.engine.remote import RemoteEngine
    from tests.fake_upstream import FakeUpstream

    fake = FakeUpstream("alpha").start()
    inner = RemoteEngine((fake.base,), secret=b"test", load_image=lambda image_id: b"")
    inner.start()
    try:
        engine = FilteredEngine(inner, Blocklist(["forbidden thing", "la la"]))
        assert engine.ready.wait(10)
        fake.replies.append("safe words, then the Forbidden thing.")
        sent, final = collect(engine.submit(request()))
        assert "".join(sent) == final.text == "safe words, then the " and final.finish_reason == "content_filter"
        fake.mode = "slow"  # "la " until the client goes away
        sent, final = collect(engine.submit(request()))
        assert sent == [] and final.text == "" and final.finish_reason == "content_filter"
        assert fake.disconnected.wait(10)  # the upstream's stream was closed: it stops generating
    finally:
        inner.shutdown()
        fake.stop()
