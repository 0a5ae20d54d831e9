"""Over-long conversations (issue 14): leave out the oldest turns instead of refusing the message.

Outside the engine, on purpose: a request goes to the engine as it is; only when the engine refuses it
as too long for its context (code `context_length_exceeded`) is a shorter copy made and sent instead.
Nothing is deleted from the history; only what the model is shown is shorter, and the answer says so.

What is kept, in this order of importance:
1. the system prompt and the newest turn (the question being asked) — always; if these alone do not fit,
   the message is refused as before;
2. the newest image: when the newest turn has no image, the most recent earlier turn that has one is kept
   (its question and answer with it), so "and what is on the left?" still sees the picture it is about —
   if that turn and the newest one cannot fit together, the image's turn goes too;
3. as many of the latest turns as fit, newest first.
A turn is one user message and the answer(s) after it.

Sizes come from the engine's own tokenizer (`engine.build_prompt`, which renders exactly what would be
sent, images included), found by a binary search over how many latest turns to keep: a handful of
renderings, and only for conversations already over the limit. An engine that cannot measure (the remote
engine: the model server counts) is not trimmed: its refusal is shown as before.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass, replace

from chat.engine.types import ChatRequest, Failed

log = logging.getLogger(__name__)

CONTEXT_CODE = "context_length_exceeded"
_IMAGE_PARTS = ("image", "image_url", "input_image")


@dataclass(frozen=True)
class Trimmed:
    """What a shortened request left out."""

    turns: int  # earlier turns the model did not see
    kept_image: bool  # an older turn was kept for its image

    def as_usage(self) -> dict:
        """Stored with the answer's usage, so a reopened conversation still says it."""
        return {"left_out_turns": self.turns, "kept_image_turn": self.kept_image}


def _has_image(message: dict) -> bool:
    content = message.get("content")
    return isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in _IMAGE_PARTS for p in content)


def _chars(messages: list[dict]) -> int:
    total = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    return total


def split_turns(messages: list[dict]) -> tuple[list[dict], list[list[dict]]]:
    """(the leading system messages, the turns): each turn starts with a user message."""
    head: list[dict] = []
    turns: list[list[dict]] = []
    for m in messages:
        if m.get("role") == "user" or (turns and m.get("role") != "system"):
            if m.get("role") == "user":
                turns.append([m])
            else:
                turns[-1].append(m)
        elif not turns:
            head.append(m)
        else:  # a system message between turns travels with the turn before it
            turns[-1].append(m)
    return head, turns


def _room(request: ChatRequest, context: int) -> int:
    """The most prompt tokens that can go with this request's answer (as the engine checks it).

    A request whose answer may take whatever room is left (an API request without max_tokens) keeps room
    for its usual answer length, or half the context if that is more than half: a shortened conversation
    that left the answer one token would be no use.
    """
    params = request.params
    if params.fit_to_context:
        return context - max(1, min(params.max_new_tokens, context // 2))
    return min(context - params.max_new_tokens, context - 1)


def shortened(request: ChatRequest, measure, context: int, max_chars: int | None = None
              ) -> tuple[ChatRequest, Trimmed] | None:
    """A copy of `request` without its oldest turns that fits `context`, or None when none fits.

    `measure(messages)` is the prompt's size in tokens. The rules are in the module's docstring.
    """
    head, turns = split_turns(request.messages)
    n = len(turns)
    if n < 2:
        return None
    room = _room(request, context)
    pinned = None
    if not _has_image(turns[-1][0]):
        pinned = next((i for i in range(n - 2, -1, -1) if _has_image(turns[i][0])), None)

    def candidate(keep: int, pin: bool) -> tuple[list[dict], bool]:
        start = n - keep
        extra = pin and pinned is not None and pinned < start
        kept = [*head, *(turns[pinned] if extra else []), *(m for t in turns[start:] for m in t)]
        return kept, extra

    def fits(messages: list[dict]) -> bool:
        if max_chars is not None and _chars(messages) > max_chars:
            return False  # too long whatever it tokenizes to: no need to tokenize it
        return measure(messages) <= room

    for pin in (True, False) if pinned is not None else (False,):
        if not fits(candidate(1, pin)[0]):
            continue
        lo, hi = 1, n - 1  # keeping `lo` latest turns fits; the whole conversation did not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(candidate(mid, pin)[0]):
                lo = mid
            else:
                hi = mid - 1
        messages, extra = candidate(lo, pin)
        return replace(request, messages=messages), Trimmed(turns=n - lo - (1 if extra else 0), kept_image=extra)
    return None


def submit(engine, request: ChatRequest, on_finish=None, enabled: bool = True) -> tuple[object, Trimmed | None]:
    """`engine.submit`, and when the engine refuses the prompt as too long: the shortened request instead.

    Returns (handle, what was left out or None). A request that cannot be shortened enough comes back
    refused, exactly as without this module (`on_finish` gets the refusal).
    """
    refused: list[Failed] = []
    inside = True

    def first(event) -> None:
        if inside and isinstance(event, Failed) and event.code == CONTEXT_CODE:
            refused.append(event)  # decided below: shortened and sent again, or passed on
            return
        if on_finish is not None:
            on_finish(event)

    handle = engine.submit(request, on_finish=first if enabled else on_finish)
    inside = False
    if not refused:
        return handle, None
    build = getattr(engine, "build_prompt", None)
    context = getattr(engine, "max_context", None)
    fitted = None
    if build is not None and context:
        def measure(messages: list[dict]) -> int:
            return len(build(messages, request.images).ids)

        try:
            fitted = shortened(request, measure, int(context), getattr(engine, "max_prompt_chars", None))
        except Exception:  # an image that cannot be read any more, a template error: refuse as before
            log.exception("measuring a shortened conversation failed")
            fitted = None
    if fitted is None:
        if on_finish is not None:
            on_finish(refused[0])
        return handle, None
    short, trimmed = fitted
    return engine.submit(short, on_finish=on_finish), trimmed


# -- saying so in the chat --------------------------------------------------------------------------


def note_text(usage: dict | None) -> str:
    """The sentence an answer made from a shortened conversation carries ("" for any other answer)."""
    from chat.i18n_text import current, say  # the page's language

    turns = int((usage or {}).get("left_out_turns") or 0)
    if turns < 1:
        return ""
    text = (say("Earlier messages (1 turn) were left out to fit the model's context.") if turns == 1 else
            say("Earlier messages ({n} turns) were left out to fit the model's context.", n=turns))
    if (usage or {}).get("kept_image_turn"):
        space = "" if current().startswith("zh") else " "
        text = f"{text}{space}{say('The most recent image, with its question and answer, was kept.')}"
    return text


def with_note(content: dict, usage: dict | None) -> dict:
    """An answer's Chatbot text part with the note added (a note: read-aloud and the announcer leave it out)."""
    text = note_text(usage)
    if not text or not isinstance(content, dict) or content.get("type") != "text":
        return content
    note = f'<p class="answer-note vl-trimmed"><em>{html.escape(text)}</em></p>'
    body = content.get("text") or ""
    return {**content, "text": f"{body}\n{note}" if body else note}
