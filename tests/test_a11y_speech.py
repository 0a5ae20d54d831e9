"""Issue 11, announcements and read-aloud (assets/announce.js), against a real server in Debian's chromium.

The tiny model's answers are random noise, so the checks are about shape, not words: every announced
line is a sentence of the final answer, together they are the answer, one each, then one completion line.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.servers import Server, data_dir
from tests.test_e2e_browser import open_settings, send, set_setting, wait_idle, wait_ready

# Installed before the page's scripts run: records what the live region is given, line by line. It watches the
# whole document from the start, so no line is missed however late the region appears.
ANNOUNCED = """
(() => {
  window.__announced = [];
  new MutationObserver((records) => {
    for (const r of records) {
      if (!r.target || r.target.id !== 'vl-announcer') continue;
      for (const n of r.addedNodes) window.__announced.push(n.textContent);
    }
  }).observe(document, {childList: true, subtree: true});
})();
"""
# ...and speechSynthesis replaced with a recorder (headless chromium has no voices).
RECORDER = ANNOUNCED + """
(() => {
  window.__spoken = [];
  class Utterance { constructor(text) { this.text = text; } }
  window.SpeechSynthesisUtterance = Utterance;
  const synth = {
    speak(u) { window.__spoken.push(u.text); },
    cancel() { window.__spoken.push('<cancel>'); },
    getVoices() { return []; },
    addEventListener() {},
    removeEventListener() {},
    speaking: false, pending: false, paused: false,
  };
  Object.defineProperty(window, 'speechSynthesis', {value: synth, configurable: true});
})();
"""

SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s)|\n")
STATUS_LINES = ("Answering…",)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    srv = Server(data_dir(tmp_path_factory, model_dir, "speech-data")).start()
    yield srv
    srv.stop()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.add_init_script(RECORDER)
    pg = context.new_page()
    yield pg
    context.close()


def squash(text: str) -> str:
    """Text without white space or Markdown emphasis marks: noise like `a_b ... c_d` streams with its
    underscores, then turns italic once the closing mark arrives (a real answer's emphasis closes within
    its sentence, long before the sentence is said)."""
    return re.sub(r"[\s_*~]+", "", text)


def sentences(text: str) -> list[str]:
    """The answer cut where announce.js cuts it."""
    out, start = [], 0
    for m in SENTENCE_END.finditer(text):
        piece = text[start:m.end()].strip()
        if piece:
            out.append(piece)
        start = m.end()
    if text[start:].strip():
        out.append(text[start:].strip())
    return out


def last_answer(page) -> str:
    """The last answer's text as the page shows it, without the note under it."""
    return page.evaluate("""() => {
      const bots = document.querySelectorAll('#chat [data-testid="bot"]');
      const copy = bots[bots.length - 1].querySelector('.message-content').cloneNode(true);
      copy.querySelectorAll('.answer-note, button, svg').forEach(n => n.remove());
      document.body.appendChild(copy);
      const text = copy.innerText;
      copy.remove();
      return text;
    }""")


def recorded(page, name: str) -> list[str]:
    return page.evaluate("(name) => window[name].slice()", name)


def ask(page, question: str, tokens: str = "2000") -> str:
    open_settings(page)
    set_setting(page, "max-new-tokens", tokens)
    send(page, question)
    page.locator("#chat [data-testid='bot']").first.wait_for(timeout=20_000)
    wait_idle(page)
    deadline = time.monotonic() + 5  # the completion line follows the last update
    while time.monotonic() < deadline and not any(a.startswith(("Answer complete", "Stopped"))
                                                  for a in recorded(page, "__announced")):
        time.sleep(0.1)
    return last_answer(page)


def test_answer_is_announced_sentence_by_sentence(server, page):
    page.goto(server.base + "/")
    wait_ready(page)
    # Gradio's own live region in the chat (it re-read the whole answer on every token) is turned off.
    page.wait_for_function("""() => document.getElementById('vl-announcer')
                               && document.querySelector('#chat [role=log]')
                               && !document.querySelector("#chat [aria-live]:not([aria-live='off'])")""",
                           timeout=10_000)
    region = page.locator("#vl-announcer")
    assert region.get_attribute("role") == "status" and region.get_attribute("aria-live") == "polite"
    answer = ask(page, "Tell me a long story.")
    assert_said_once(recorded(page, "__announced"), answer)
    assert page.locator("#chat [aria-live]:not([aria-live='off'])").count() == 0

    # Regenerate replaces the answer: the new one is said from its first sentence.
    page.evaluate("() => { window.__announced.length = 0; }")
    page.locator("#regenerate").click()
    page.wait_for_function("() => window.__announced.includes('Answering…')", timeout=20_000)
    wait_idle(page)
    page.wait_for_function("() => window.__announced.some(a => a.startsWith('Answer complete'))", timeout=10_000)
    assert_said_once(recorded(page, "__announced"), last_answer(page))


def assert_said_once(announced: list[str], answer: str) -> None:
    said = [a for a in announced if a not in STATUS_LINES]
    expected = sentences(answer)
    assert len(expected) >= 3, answer  # several sentences
    assert said[-1].startswith("Answer complete"), said  # (with the length note when it ran out)
    body = said[:-1]
    assert len(body) == len(expected), (body, expected)  # one announcement per sentence, none twice
    assert squash("".join(body)) == squash(answer)  # together: the answer, once
    for line in body:
        assert squash(line) in squash(answer)  # never a token soup, never the whole answer again


def test_status_and_stop_are_announced(server, page):
    page.goto(server.base + "/")
    wait_ready(page)
    open_settings(page)
    set_setting(page, "max-new-tokens", "4096")
    send(page, "Write forever.")
    page.wait_for_function("() => window.__announced.includes('Answering…')", timeout=30_000)
    page.locator("#stop").click()
    page.wait_for_function("() => window.__announced.includes('Stopped.')", timeout=15_000)
    assert recorded(page, "__announced").count("Stopped.") == 1


def test_auto_read_speaks_each_sentence_and_stop_cancels(server, page):
    page.goto(server.base + "/")
    wait_ready(page)
    auto = page.get_by_role("checkbox", name="Auto-read answers")
    assert not auto.is_checked()  # off in general chat
    page.locator("#mode label", has_text="Scene description").click()
    assert auto.is_checked()  # on by default in scene description
    answer = ask(page, "Describe the scene in detail.")
    spoken = recorded(page, "__spoken")
    assert [squash(s) for s in spoken] == [squash(s) for s in sentences(answer)], (spoken, answer)

    # Read aloud: the last answer again, from the start; the page's Stop cancels it.
    page.get_by_role("button", name="Read the last answer").click()
    assert recorded(page, "__spoken")[len(spoken):] == ["<cancel>", *sentences(last_answer(page))]
    page.locator("#stop").click()
    assert recorded(page, "__spoken")[-1] == "<cancel>"
    page.get_by_role("button", name="Stop reading").click()
    assert recorded(page, "__spoken")[-1] == "<cancel>"

    # Rate and the choice are kept in the browser.
    page.get_by_role("slider", name="Speech rate").fill("1.5")
    auto.uncheck()
    page.reload()
    wait_ready(page)
    page.locator("#mode label", has_text="Scene description").click()
    assert not page.get_by_role("checkbox", name="Auto-read answers").is_checked()
    assert page.get_by_role("slider", name="Speech rate").input_value() == "1.5"


def test_announcement_levels(server, page):
    page.goto(server.base + "/")
    wait_ready(page)
    level = page.get_by_role("combobox", name="Announce")
    assert level.input_value() == "sentences"
    level.select_option(label="Only when an answer ends")
    page.reload()  # the level is kept
    wait_ready(page)
    assert page.get_by_role("combobox", name="Announce").input_value() == "end"
    answer = ask(page, "Tell me another long story.")
    assert len(sentences(answer)) >= 1
    said = [a for a in recorded(page, "__announced") if a not in STATUS_LINES]
    assert len(said) == 1 and said[0].startswith("Answer complete"), said
    assert recorded(page, "__spoken") == []  # auto-read is off in general chat

    # Nothing: not even the status and the end (refusals are alerts, outside this region).
    page.get_by_role("combobox", name="Announce").select_option(label="Nothing")
    page.evaluate("() => { window.__announced.length = 0; }")
    ask(page, "One more story.")
    page.wait_for_timeout(500)
    assert recorded(page, "__announced") == []


def test_every_answer_has_its_own_read_aloud_button(server, page):
    page.goto(server.base + "/")
    wait_ready(page)
    first = ask(page, "First story.", tokens="64")
    ask(page, "Second story.", tokens="64")
    buttons = page.get_by_role("button", name=re.compile(r"^Read aloud: answer \d$"))
    page.wait_for_function("() => document.querySelectorAll('#chat .vl-read-answer').length === 2", timeout=10_000)
    assert buttons.count() == 2
    before = len(recorded(page, "__spoken"))
    page.get_by_role("button", name="Read aloud: answer 1").click()
    assert recorded(page, "__spoken")[before:] == ["<cancel>", *sentences(first)]
