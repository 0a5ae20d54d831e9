"""How fast an answer reaches the page compared with the API (issue 13: "the page streams as fast as the API").

Starts a real vlchat server (the tiny random model, on this machine's CPU), then asks the same greedy
question through the API (streamed, with the `openai` client) and through the page (Debian's chromium
driven by Playwright), several times each. For the page, a MutationObserver in the browser stamps every
change of the answer's text; the rate is the answer's characters over the time from its first visible
character to its last. The API's rate is the same measure over its streamed chunks. Both are characters
per second of the same text, so they compare directly; a page that draws slower than the engine writes
falls behind and shows up here as a lower rate.

    .venv/bin/python bench/page_stream.py [--tokens 600] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from openai import OpenAI  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from tests.conftest import CHROMIUM, CHROMIUM_ARGS  # noqa: E402
from tests.servers import Server  # noqa: E402

WATCH = """
(() => {
  window.__stamps = [];
  const start = () => {
    const chat = document.getElementById('chat');
    if (!chat) return setTimeout(start, 50);
    new MutationObserver(() => {
      const bots = chat.querySelectorAll("[data-testid='bot'] .message-content");
      if (!bots.length) return;
      const text = bots[bots.length - 1].textContent;
      const last = window.__stamps[window.__stamps.length - 1];
      if (!last || last[1] !== text.length) window.__stamps.push([performance.now(), text.length]);
    }).observe(chat, {subtree: true, childList: true, characterData: true});
  };
  start();
})();
"""


def api_rate(base: str, question: str, tokens: int) -> tuple[float, int]:
    client = OpenAI(base_url=base + "/v1", api_key="none")
    first = last = None
    text = ""
    stream = client.chat.completions.create(model="vlchat", messages=[{"role": "user", "content": question}],
                                            max_tokens=tokens, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first or now
            last = now
            text += chunk.choices[0].delta.content
    return len(text) / (last - first), len(text)


def page_rate(page, base: str, question: str, tokens: int) -> tuple[float, int, int]:
    page.goto(base + "/")
    page.locator("#input textarea:not([disabled])").wait_for(timeout=120_000)
    page.locator("#settings .label-wrap").first.click()
    field = page.locator("#max-new-tokens input[type=number]")
    field.fill(str(tokens))
    field.press("Enter")
    page.locator("#input textarea").fill(question)
    page.locator("#input textarea").press("Enter")
    page.locator("#chat [data-testid='bot']").first.wait_for(timeout=60_000)
    page.wait_for_function("() => !document.querySelector('#status').innerText.includes('Answering')",
                           timeout=300_000)
    time.sleep(0.5)
    stamps = page.evaluate("() => window.__stamps.filter(s => s[1] > 1)")
    (t0, _), (t1, chars) = stamps[0], stamps[-1]
    return chars / ((t1 - t0) / 1000), chars, len(stamps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=600)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    question = "Tell me a long story about a lighthouse."
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp)).start()
        try:
            api = [api_rate(server.base, question, args.tokens) for _ in range(args.runs)]
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                context.add_init_script(WATCH)
                page = context.new_page()
                shown = [page_rate(page, server.base, question, args.tokens) for _ in range(args.runs)]
                browser.close()
        finally:
            server.stop()
    print(f"answer: {api[0][1]} characters ({args.tokens} tokens asked), {args.runs} runs each")
    print("API  chars/s: " + ", ".join(f"{r:.0f}" for r, _ in api)
          + f"  (median {statistics.median(r for r, _ in api):.0f})")
    print("page chars/s: " + ", ".join(f"{r:.0f}" for r, _, _ in shown)
          + f"  (median {statistics.median(r for r, _, _ in shown):.0f}); redraws per answer: "
          + ", ".join(str(n) for _, _, n in shown))


if __name__ == "__main__":
    main()
