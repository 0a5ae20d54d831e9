"""What the chat shows: stored rows and streamed answers as safe HTML for Gradio's Chatbot.

Messages are Markdown rendered here, on the server, by markdown-it with raw HTML turned off:
every `<`, `>` and `&` a person or the model typed is shown as text (inside code spans and
fences too, where it reads exactly as typed). The Chatbot is built with
`render_markdown=False`, so the browser never parses the message as Markdown or HTML of its
own: one parser decides what is code and what is markup, and it is this one. Images in
Markdown (`![x](http://host/a.png)`) become plain links, so nothing in a message is fetched
from another host. Gradio's sanitizer still runs on top.
"""

from __future__ import annotations

import html
from urllib.parse import urlsplit

from markdown_it import MarkdownIt

from chat import trim  # issue 14: an answer from a shortened conversation says so
from chat.grounding_page import with_figure  # issue 14 (grounding): boxes drawn on the image under the answer
from chat.i18n_text import say, translate  # issue 13: notes in the page's language
from chat.stats import with_details
from chat.store import NotFound, Store

STATUS_NOTE = {"stopped": "⏹ Stopped.", "interrupted": "⚠ Interrupted (the server restarted).", "pending": "…",
               "filtered": "⚠ Stopped by the content filter."}
# A Done's finish_reason -> the answer's stored status (content_filter: chat/engine/filtered.py, issue 14).
FINISH_STATUS = {"cancelled": "stopped", "content_filter": "filtered"}
_LINK_SCHEMES = ("http", "https", "mailto")
# The same markup Gradio's own Markdown renderer puts around code, so its copy button works.
_COPY = ('<button title="copy" class="copy_code_button" aria-label="Copy code"><span class="copy-text">'
         '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 15 15" aria-hidden="true" width="15" height="15">'
         '<path fill="currentColor" d="M12.728 4.545v8.182H4.545V4.545zm0 -0.909H4.545a0.909 0.909 0 0 0 -0.909 '
         '0.909v8.182a0.909 0.909 0 0 0 0.909 0.909h8.182a0.909 0.909 0 0 0 0.909 -0.909V4.545a0.909 0.909 0 0 0 '
         '-0.909 -0.909"/><path fill="currentColor" d="M1.818 8.182H0.909V1.818a0.909 0.909 0 0 1 0.909 '
         '-0.909h6.364v0.909H1.818Z"/></svg></span><span class="check" aria-hidden="true">'
         '<svg xmlns="http://www.w3.org/2000/svg" width="17" height="17" viewBox="0 0 17 17" fill="none" '
         'stroke="currentColor" stroke-width="1.3"><path d="m13.813 4.781 -7.438 7.438 -3.188 -3.188"/></svg>'
         '</span></button>')


def _link_ok(url: str) -> bool:
    scheme = urlsplit(url).scheme.lower()
    return scheme in _LINK_SCHEMES or (not scheme and not url.startswith("//"))


def _image(renderer, tokens, idx, options, env) -> str:
    """A Markdown image as a plain link (http/https) or its text: nothing is fetched."""
    token = tokens[idx]
    src = token.attrGet("src") or ""
    alt = token.content or src
    label = html.escape(f"image: {alt}")
    if urlsplit(src).scheme.lower() in ("http", "https"):
        return f'<a href="{html.escape(src)}" target="_blank" rel="noopener noreferrer nofollow">{label}</a>'
    return f"<span>[{label}]</span>"


def _build() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable(["table", "strikethrough"])
    md.validateLink = _link_ok
    md.add_render_rule("image", _image)
    def link_open(renderer, tokens, idx, options, env) -> str:
        tokens[idx].attrSet("target", "_blank")
        tokens[idx].attrSet("rel", "noopener noreferrer nofollow")
        return renderer.renderToken(tokens, idx, options, env)

    def code(renderer, tokens, idx, options, env) -> str:
        token = tokens[idx]
        lang = token.info.strip().split(" ")[0] if token.info else ""
        cls = f' class="language-{html.escape(lang)}"' if lang else ""
        return f'<div class="code_wrap">{_COPY}<pre><code{cls}>{html.escape(token.content)}</code></pre></div>\n'

    md.add_render_rule("link_open", link_open)
    md.add_render_rule("fence", code)
    md.add_render_rule("code_block", code)
    return md


_MD = _build()


def message_html(text: str) -> str:
    """Markdown -> HTML with every raw tag shown as text and no remote resource."""
    return _MD.render(text or "").strip()


def _text(markup: str) -> dict:
    # A text part, not a bare string: Gradio runs inspect.cleandoc on bare strings.
    return {"type": "text", "text": markup}


def answer_content(text: str, status: str, error: str = "") -> dict:
    """An answer as a Chatbot text part, with a visible note when it did not complete."""
    body = message_html(text)
    if status == "error":
        note = f"⚠ {translate(error) if error else say('The answer failed.')}"
    else:
        note = say(STATUS_NOTE.get(status, "")) if status != "complete" else ""  # in the page's language
    if note:
        # The class says which note it is, whatever language the text is in (assets/announce.js reads it).
        note_html = f'<p class="answer-note vl-note-{status}"><em>{html.escape(note)}</em></p>'
        body = f"{body}\n{note_html}" if body else note_html
    return _text(body)


def _mark_version(message: dict, row: dict) -> None:
    """A message with other versions (issue 13: edit, regenerate) says which one it is, as text in it.

    Marked as a note (class answer-note, like "Stopped."), so reading the answer aloud leaves it out.
    """
    if row.get("versions", 1) < 2:
        return
    line = say("Version {k} of {n}", k=int(row["version"]), n=int(row["versions"]))
    note = f'<p class="answer-note vl-version">{html.escape(line)}</p>'
    content = message["content"]
    parts = content if isinstance(content, list) else [content]
    texts = [part for part in parts if isinstance(part, dict) and part.get("type") == "text"]
    if texts:
        texts[-1]["text"] = f'{texts[-1]["text"]}\n{note}'
    elif isinstance(content, list):
        content.append(_text(note))


def chat_history(store: Store, rows: list[dict]) -> list[dict]:
    """Stored rows as Chatbot messages: user images inline (with their stored type), safe HTML text."""
    out = []
    latest = None  # the newest image so far: what an answer's boxes are drawn on (issue 14, grounding)
    for row in rows:
        if row["role"] == "user":
            latest = row["image_ids"][-1] if row["image_ids"] else latest
            content: list[dict] = []
            names = row.get("image_names") or []
            for n, sha in enumerate(row["image_ids"], 1):
                try:
                    image = store.image_row(sha)
                    path = str(store.image_path(sha))
                except NotFound:
                    continue
                content.append({"type": "file", "file": {"path": path, "mime_type": image["mime"]},
                                "alt_text": f"Attached image {n}"})
            text = message_html(row["text"]) if row["text"] else ""
            if names:  # the files' names, shown under the images; assets/a11y.js makes them the alt text
                spans = ", ".join(f'<span class="vl-file">{html.escape(name)}</span>' for name in names)
                text = f'<p class="vl-files">{spans}</p>\n{text}'.strip()
            if text:
                content.append(_text(text))
            out.append({"role": "user", "content": content})
        elif row["role"] == "assistant":
            usage = row.get("usage") or {}
            content = trim.with_note(answer_content(row["text"], row["status"], usage.get("error", "")), usage)
            out.append({"role": "assistant", "content": with_details(content, usage)})  # chat.stats (issue 13)
            out[-1]["content"] = with_figure(out[-1]["content"], store, latest, row["text"], row["status"])
        if out and row["role"] in ("user", "assistant"):
            _mark_version(out[-1], row)
    return out
