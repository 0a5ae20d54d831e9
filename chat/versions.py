"""Edit a sent question and page through versions (issue 13): the page's "Edit and versions" panel.

The conversation is a tree (chat.store_messages): editing a question adds a sibling of it with a
fresh answer; Regenerate (chat.ui.regenerate) adds a sibling answer. Nothing is lost: each earlier
question or answer stays as a version, and the chat shows the selected path.

Gradio's own Chatbot editing would put the message's rendered HTML into its edit box (the page
renders Markdown on the server), so the panel has plain, named controls instead, all reachable by
keyboard: "Message" (which question or answer of the path), a line saying "Answer 2: version 1 of
3", "Previous version" / "Next version", and for a question "Edited question" + "Send edited
question". Each message with versions also says "Version k of n" in the chat (chat.render).
"""

from __future__ import annotations

from collections.abc import Iterator

import gradio as gr

from chat import ui
from chat.conversation import localized, mode_for
from chat.i18n import lang_of
from chat.i18n_text import say, translate
from chat.notices import Notice
from chat.ratelimit_gate import client_address
from chat.render import chat_history
from chat.store import NotFound
from chat.stream import Turn, stream, view_token, wait_turn

SNIPPET = 40


def labels(rows: list[dict]) -> dict[int, str]:
    """Each path message's name on the page: "Question 2: what is…", "Answer 2"."""
    out, asked, answered = {}, 0, 0
    for row in rows:
        if row["role"] == "user":
            asked += 1
            text = " ".join(row["text"].split())
            snippet = text if len(text) <= SNIPPET else text[:SNIPPET].rstrip() + "…"
            out[row["id"]] = f"Question {asked}: {snippet}"
        elif row["role"] == "assistant":
            answered += 1
            out[row["id"]] = f"Answer {answered}"
    return out


def default_target(rows: list[dict]) -> int | None:
    """The message the panel starts on: the last one that has versions, else the last answer."""
    for row in reversed(rows):
        if row.get("versions", 1) > 1:
            return row["id"]
    for row in reversed(rows):
        if row["role"] == "assistant":
            return row["id"]
    return rows[-1]["id"] if rows else None


def _as_id(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _path(ctx: ui.Ctx, conv_id: str | None, request: gr.Request) -> list[dict]:
    if not conv_id:
        return []
    try:
        return ctx.store.messages(ui.owner_of(request), conv_id)
    except (NotFound, Notice):
        return []


def _shown(label: str) -> str:
    """A message's name in the page's language ("Question 2: what is…" -> "问题 2：what is…")."""
    head, sep, rest = label.partition(": ")
    return translate(head) + (say(": ") + rest if sep else "")


def _panel(rows: list[dict], target: int | None, keep_text: bool) -> tuple:
    """(message choice, version line, previous, next, edited question, send edited) updates."""
    names = labels(rows)
    by_id = {row["id"]: row for row in rows if row["id"] in names}
    if target not in by_id:
        target, keep_text = default_target([r for r in rows if r["id"] in names]), False
    if target is None:
        return (gr.update(choices=[], value=None), say("Nothing to edit yet: send a message first."),
                gr.update(interactive=False), gr.update(interactive=False),
                gr.update(visible=False, value=""), gr.update(visible=False))
    row = by_id[target]
    line = f"{names[target].split(':')[0]}: version {row['version']} of {row['versions']}."
    question = row["role"] == "user"
    if question:
        line += " Edit it below to ask it another way; the answers so far stay as versions."
    text = gr.skip() if keep_text else row["text"]
    line = translate(line)  # issue 13: in the page's language
    return (gr.update(choices=[(_shown(label), str(i)) for i, label in names.items()], value=str(target)), line,
            gr.update(interactive=row["version"] > 1), gr.update(interactive=row["version"] < row["versions"]),
            gr.update(visible=question, value=text), gr.update(visible=question))


def panel(ctx: ui.Ctx, conv_id, target, seen, request: gr.Request) -> tuple:
    """The panel for what is on screen, after the chat changed: (*panel, newest message id).

    A new message anywhere in the conversation (a question, an answer, a regenerated or edited one), or
    another conversation, moves it to `default_target`; otherwise (paging through versions) it stays on
    the chosen message while that is shown.
    """
    with ctx.lock:
        streaming = ctx.active.get(request.session_hash) is not None
    if streaming:  # drawn token by token: nothing to do now (the event's end brings the panel up to date)
        return (gr.skip(),) * 7
    rows = _path(ctx, conv_id, request)
    newest = None
    if rows:
        try:
            newest = max(r["id"] for r in ctx.store.message_tree(ui.owner_of(request), conv_id)[0])
        except (NotFound, Notice):
            rows = []
    chosen = _as_id(target) if newest is not None and newest == seen else None
    return (*_panel(rows, chosen, keep_text=chosen is not None), newest)


def choose(ctx: ui.Ctx, conv_id, target, request: gr.Request) -> tuple:
    """Another message chosen in "Message": its versions, and its text to edit if it is a question."""
    return _panel(_path(ctx, conv_id, request), _as_id(target), keep_text=False)


def redraw(ctx: ui.Ctx, conv_id, request: gr.Request):
    """The chat drawn again from the store after a new version streamed (so it says "Version k of n").

    Left alone while this page shows an answer still coming (a message sent meanwhile).
    """
    with ctx.lock:
        busy = ctx.active.get(request.session_hash) is not None
    rows = [] if busy else _path(ctx, conv_id, request)
    return chat_history(ctx.store, rows) if rows else gr.skip()


def _not_busy(ctx: ui.Ctx, conv_id: str, request: gr.Request) -> None:
    with ctx.lock:
        busy = ctx.running.get(conv_id) is not None or ctx.active.get(request.session_hash) is not None
    if busy:
        raise Notice("An answer is still coming. Wait for it to finish, or press Stop, then try again.")


def step(ctx: ui.Ctx, conv_id, target, by: int, request: gr.Request) -> tuple:
    """Show the previous (-1) or next (+1) version of the chosen message: (chat, *panel)."""
    message_id = _as_id(target)
    if not conv_id or message_id is None:
        raise Notice("Choose a message that has versions first.")
    _not_busy(ctx, conv_id, request)
    owner = ui.owner_of(request)
    try:
        chosen = ctx.store.switch_version(owner, conv_id, message_id, by)
        rows = ctx.store.messages(owner, conv_id)
    except NotFound:
        raise Notice("That message is no longer there; open the conversation again.") from None
    return (chat_history(ctx.store, rows), *_panel(rows, chosen, keep_text=False))


def previous_version(ctx: ui.Ctx, conv_id, target, request: gr.Request) -> tuple:
    """"Previous version"."""
    return step(ctx, conv_id, target, -1, request)


def next_version(ctx: ui.Ctx, conv_id, target, request: gr.Request) -> tuple:
    """"Next version"."""
    return step(ctx, conv_id, target, 1, request)


def edit(ctx: ui.Ctx, conv_id, target, text, mode, temperature, top_p, max_new_tokens, system,
         request: gr.Request = None, top_k=None, presence_penalty=None, frequency_penalty=None,
         adapter=None) -> Iterator[tuple]:
    """Send an edited question: a new version of it (same images) with a fresh answer, streamed.

    Yields the same outputs as `ui.send` (conv_id, chat, box, list, status, title); the box is left alone.
    """
    owner = ui.owner_of(request)
    session = request.session_hash
    token = view_token(ctx, session)
    message_id = _as_id(target)
    text = (text or "").strip()
    if not conv_id or message_id is None:
        raise Notice("Choose the question to edit first.")
    ui.check_text(ctx, text, system)
    try:
        rows = ctx.store.messages(owner, conv_id)
    except NotFound:
        raise Notice("That conversation no longer exists.") from None
    at = next((n for n, r in enumerate(rows) if r["id"] == message_id), None)
    if at is None or rows[at]["role"] != "user":
        raise Notice("Only a question can be edited; choose one under Message.")
    original = rows[at]
    if not text and not original["image_ids"]:
        raise Notice("The edited question is empty; type it, or choose Previous version to go back.")
    _not_busy(ctx, conv_id, request)
    ui.check_ready(ctx)
    yield from wait_turn(ctx, session)
    lang = lang_of(request)  # issue 13: the mode's prompts in the page's language, as ui.send does
    m = localized(mode_for(mode), lang)
    asked = text or m.describe_prompt
    detail = (original.get("settings") or {}).get("detail") if original["image_ids"] else None
    settings = ui._turn_settings(temperature, top_p, max_new_tokens, system, detail, top_k=top_k,
                                 presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                 adapter=adapter or None)
    question = {"role": "user", "text": asked, "image_ids": original["image_ids"], "settings": settings,
                "status": "complete"}
    turn = Turn(ctx, owner)
    handle = ui._submit(ctx, owner, conv_id, [*rows[:at], question], settings, m.key, turn, lang=lang,
                        address=client_address(request))
    try:  # accepted: the new version is stored beside the old one
        question_id = ctx.store.add_message(owner, conv_id, role="user", text=asked, image_ids=original["image_ids"],
                                            image_names=original.get("image_names") or [], mode=m.key,
                                            settings=settings, parent_id=original["parent_id"])
        answer_id = ctx.store.add_message(owner, conv_id, role="assistant", text="", status="pending", mode=m.key,
                                          settings=settings, parent_id=question_id)
    except NotFound:
        handle.cancel()
        raise Notice("That conversation no longer exists.") from None
    turn.attach(conv_id, answer_id, question_id, [], handle)
    history = chat_history(ctx.store, ctx.store.messages(owner, conv_id)[:-1])
    skip = gr.skip()
    yield from stream(ctx, turn, handle, session, token, history, (conv_id, skip, skip, skip),
                      give_back=lambda: skip)
