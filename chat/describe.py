"""Describe in one step (issue 11): a photo sent at once with the mode's describe prompt, and follow-ups.

"Describe a photo" (an upload button; on phones it offers the camera) and "Take a photo"
(assets/camera.js, which puts the captured frame into that same button's file input) both end in
`describe`: the photo goes through `chat.ui.send` with no text, so the mode's describe prompt is
asked and stored, through the same checks, submit, store and stream as a typed message.

Once the conversation on screen has an answer, the mode's follow-up questions show as buttons
under the chat ("More detail", "Read any text", ...); `follow_up` sends the question of the
button pressed (its label is what Gradio passes in), `follow_ups` shows or hides them.
"""

from __future__ import annotations

from collections.abc import Iterator

import gradio as gr

from chat import ui
from chat.conversation import MODES, localized, mode_for
from chat.i18n import lang_of
from chat.notices import Notice
from chat.store import NotFound

MAX_FOLLOW_UPS = max(len(m.follow_ups) for m in MODES.values())
# Answers worth a follow-up question (a failed or refused one is not).
_ANSWERED = ("complete", "stopped", "interrupted")


def _keep_box(updates: Iterator[tuple]) -> Iterator[tuple]:
    """`ui.send`'s updates without its first one's emptied input box: what is typed there stays.

    A question the engine refuses after it was stored still comes back into the box (a later update).
    """
    first = True
    for out in updates:
        if first:
            out = (*out[:2], gr.skip(), *out[3:])
            first = False
        yield out


def ready(ctx: ui.Ctx):
    """'Describe a photo' is on once the model serves, like the message box (camera.js follows it)."""
    return gr.update(interactive=ctx.engine.ready.is_set())


def _not_answering(ctx: ui.Ctx, request: gr.Request | None) -> None:
    """Refuse while this page shows an answer still coming: two answers would draw into one chat.

    (These buttons' events run even while the message box's is pending, so the refusal is said here.)
    """
    with ctx.lock:
        busy = request is not None and ctx.active.get(request.session_hash) is not None
    if busy:
        raise Notice("An answer is still coming. Wait for it to finish, or press Stop, then try again.")


def describe(ctx: ui.Ctx, conv_id, photo, mode, temperature, top_p, max_new_tokens, system, detail="auto",
             request: gr.Request = None, top_k=None, presence_penalty=None,
             frequency_penalty=None, adapter=None) -> Iterator[tuple]:
    """'Describe a photo' / 'Take a photo': the photo sent at once with the mode's describe prompt."""
    _not_answering(ctx, request)
    files = [f for f in (photo if isinstance(photo, list) else [photo]) if f]
    if not files:
        raise Notice("Choose a photo to describe.")
    # No text: `send` asks (and stores) the mode's describe prompt.
    box = {"text": "", "files": files}
    yield from _keep_box(ui.send(ctx, conv_id, box, mode, temperature, top_p, max_new_tokens, system, detail,
                                 request, top_k, presence_penalty, frequency_penalty, adapter))


def question_for(mode: str | None, label: str | None) -> str | None:
    """The question a follow-up button sends: its mode's first, then any mode's (the mode just changed)."""
    # Issue 13 (ux): a button shows its label in the page's language; either language's label is known.
    for m in (mode_for(mode), *MODES.values()):
        for shown, question in (*m.follow_ups, *localized(m, "zh-CN").follow_ups):
            if shown == label:
                return question
    return None


def follow_up(ctx: ui.Ctx, label, conv_id, mode, temperature, top_p, max_new_tokens, system, detail="auto",
              request: gr.Request = None, top_k=None, presence_penalty=None,
              frequency_penalty=None, adapter=None) -> Iterator[tuple]:
    """A follow-up button: its question sent in the conversation on screen."""
    _not_answering(ctx, request)
    question = question_for(mode, label)
    if question is None:
        raise Notice("That follow-up question is not available in this mode.")
    if not conv_id:
        raise Notice("Describe a photo or ask a question first; follow-up questions are about its answer.")
    box = {"text": question, "files": []}
    yield from _keep_box(ui.send(ctx, conv_id, box, mode, temperature, top_p, max_new_tokens, system, detail,
                                 request, top_k, presence_penalty, frequency_penalty, adapter))


def has_answer(ctx: ui.Ctx, conv_id: str | None, request: gr.Request) -> bool:
    """Whether the conversation on screen has an answer to follow up."""
    if not conv_id:
        return False
    try:
        rows = ctx.store.messages(ui.owner_of(request), conv_id)
    except (NotFound, Notice):
        return False
    return any(r["role"] == "assistant" and r["status"] in _ANSWERED and r["text"] for r in rows)


def follow_ups(ctx: ui.Ctx, conv_id, mode, request: gr.Request) -> tuple:
    """The follow-up row and its buttons: the mode's questions, shown once the conversation has an answer."""
    m = localized(mode_for(mode), lang_of(request))  # issue 13 (ux): labels in the page's language
    shown = has_answer(ctx, conv_id, request)
    buttons = [gr.update(value=m.follow_ups[i][0], visible=True) if i < len(m.follow_ups) else gr.update(visible=False)
               for i in range(MAX_FOLLOW_UPS)]
    return (gr.update(visible=shown), *buttons)
