"""Grounding on the page (issue 14): an answer's boxes drawn under it, and "Find" in screenshot mode.

An answer whose text holds Qwen3-VL boxes or points (`chat.grounding.parse`) is shown with the
image it is about (the latest image in the conversation up to that answer) drawn with them, under
the answer, once the answer has finished. Nothing extra is stored: the drawing is made from the
stored answer text and the stored image whenever the chat is drawn, and kept as a file next to the
images (`images/drawn/<key>.<ext>`, the key a sha256 of the image's sha and the marks), so it is
drawn once and survives reloads and restarts; deleting that folder only costs a redraw. The file's
name cannot be guessed without the image and the answer, like the images' own (named by their
sha256), and the chat only ever lists the owner's own conversation.

The drawn image is HTML at the end of the answer's own message (a figure, class `answer-note
vl-grounding`, with alt text "Boxes: cat, red car (2)" and the same words as a visible caption),
served from the store's images folder like the attached images (app.py's allowed_paths).

"Find" (screenshot mode): what the person names is asked for in the words Qwen3-VL answers with
its JSON boxes, as a question in the conversation, about its latest image.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import gradio as gr
from PIL import Image

from chat import grounding
from chat.notices import Notice
from chat.store import IMAGE_EXTENSIONS, NotFound, Store

DRAWN_DIR = "drawn"
DRAW_VERSION = "2"  # part of the file key: a change to the drawing makes new files
SHOWN_STATUSES = ("complete", "stopped", "interrupted")  # finished answers (a pending one is still streaming)
FIND_MODE = "troubleshoot"
MAX_FIND_CHARS = 200
FIND_PROMPT = ('Locate every "{thing}" in the image and output the bbox coordinates in JSON format, as '
               '[{{"bbox_2d": [x1, y1, x2, y2], "label": "{thing}"}}].')


def latest_image(rows: list[dict]) -> str | None:
    """The sha of the newest image attached in `rows` (the conversation so far), or None."""
    for row in reversed(rows):
        if row.get("role") == "user" and row.get("image_ids"):
            return row["image_ids"][-1]
    return None


def _drawn_path(store: Store, sha: str, marks: list[grounding.Mark], mime: str) -> Path:
    key = hashlib.sha256(json.dumps([DRAW_VERSION, sha, [m.as_json() for m in marks]]).encode()).hexdigest()
    return store.images_dir / DRAWN_DIR / key[:2] / f"{key}.{IMAGE_EXTENSIONS[mime]}"


def _write(path: Path, image: Image.Image, mime: str) -> None:
    """Save atomically: a page drawing the same chat at the same time sees no file or the whole one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format={"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}[mime],
                       **({"quality": 90} if mime != "image/png" else {}))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def drawn_file(store: Store, sha: str | None, marks: list[grounding.Mark]) -> tuple[Path, str] | None:
    """(path, mime) of the stored image `sha` drawn with `marks` (drawn now unless it already was); None if
    there is no such image."""
    if not sha or not marks:
        return None
    try:
        mime = store.image_row(sha)["mime"]
        path = _drawn_path(store, sha, marks, mime)
        if not path.exists():
            with Image.open(store.image_path(sha)) as source:
                _write(path, grounding.draw(source, marks), mime)
    except (NotFound, OSError, ValueError, Image.DecompressionBombError):
        return None
    return path, mime


def figure_html(path: Path, marks: list[grounding.Mark]) -> str:
    """The drawn image as HTML inside the answer: a link to it at full size around it, its labels as alt text.

    Part of the answer's own message (not a second chat message), so the page's announcer, Read aloud and
    Copy see one answer as before; it is a note (class answer-note), which they leave out. The caption says
    in words what the alt text says, for sighted readers (hidden from screen readers, which read the alt).
    """
    words = html.escape(grounding.summary(marks))
    url = html.escape("gradio_api/file=" + quote(str(path)))  # relative: works under a path prefix too
    return (f'<figure class="answer-note vl-grounding"><p class="vl-grounding-caption" aria-hidden="true">{words}</p>'
            f'<a href="{url}" target="_blank" rel="noopener noreferrer">'
            f'<img src="{url}" alt="{words}" class="vl-grounding-image"></a></figure>')


def figure(store: Store, sha: str | None, text: str) -> str | None:
    """The figure HTML for an answer with boxes or points about image `sha`; None without."""
    marks = grounding.parse(text)
    drawn = drawn_file(store, sha, marks)
    return None if drawn is None else figure_html(drawn[0], marks)


def with_figure(content, store: Store, sha: str | None, text: str, status: str):
    """An answer's Chatbot content with its drawn image at its end (when it has boxes and has finished)."""
    if status not in SHOWN_STATUSES:
        return content
    found = figure(store, sha, text)
    if found is None:
        return content
    parts = list(content) if isinstance(content, list) else [content]
    last = max((i for i, p in enumerate(parts) if isinstance(p, dict) and p.get("type") == "text"), default=None)
    if last is None:
        parts.append({"type": "text", "text": found})
    else:
        parts[last] = {**parts[last], "text": f'{parts[last]["text"]}\n{found}'}
    return parts if isinstance(content, list) else parts[0]


def for_conversation(store: Store, owner: str, conv_id: str | None, content, text: str, status: str):
    """`with_figure` for the newest answer of a conversation (the one just streamed)."""
    if not conv_id or status not in SHOWN_STATUSES or not grounding.parse(text):
        return content
    try:
        rows = store.messages(owner, conv_id)
    except NotFound:
        return content
    return with_figure(content, store, latest_image(rows), text, status)


# -- Find (screenshot mode) -------------------------------------------------------------------


def find_visible(mode: str | None):
    """The Find row shows in screenshot mode only."""
    return gr.update(visible=mode == FIND_MODE)


def find_prompt(thing: str) -> str:
    """The question that makes Qwen3-VL answer with its JSON boxes for `thing`."""
    return FIND_PROMPT.format(thing=thing.replace('"', "'"))


def find(ctx, thing, conv_id, mode, temperature, top_p, max_new_tokens, system, detail="auto",
         request: gr.Request = None, top_k=None, presence_penalty=None, frequency_penalty=None,
         adapter=None) -> Iterator[tuple]:
    """'Find on the image': asks for the boxes of what was named, on the conversation's latest image."""
    from chat import describe, ui

    describe._not_answering(ctx, request)
    thing = " ".join(str(thing or "").split())
    if not thing:
        raise Notice("Type what to find on the image, for example: the Save button.")
    if len(thing) > MAX_FIND_CHARS:
        raise Notice(f"Name what to find in at most {MAX_FIND_CHARS} characters.")
    rows = []
    if conv_id:
        try:
            rows = ctx.store.messages(ui.owner_of(request), conv_id)
        except NotFound:
            rows = []
    if latest_image(rows) is None:
        raise Notice("Find looks at the latest image in the conversation: send a screenshot first (attach it and "
                     "press Enter), then name what to find.")
    box = {"text": find_prompt(thing), "files": []}
    yield from describe._keep_box(ui.send(ctx, conv_id, box, mode, temperature, top_p, max_new_tokens, system,
                                          detail, request, top_k, presence_penalty, frequency_penalty, adapter))
