"""Page handlers around a reopened or deleted conversation (issue 13): its settings come back as they were
last used in it, and Delete asks first (an inline confirmation; `chat.ui.delete` deletes).
"""

from __future__ import annotations

import gradio as gr

from chat.conversation import md_escape, mode_for
from chat.i18n import lang_of
from chat.i18n import t as i18n_t
from chat.images import DEFAULT_DETAIL, DETAILS
from chat.notices import Notice
from chat.store import NotFound
from chat.ui import Ctx, owner_of


def _last_settings(conv: dict, rows: list[dict]) -> dict:
    """The settings last used in a conversation: its newest message's (a user message's for image detail)."""
    found = dict(conv.get("settings") or {})
    for row in rows:  # oldest first: later messages win
        settings = row.get("settings") or {}
        found.update({k: v for k, v in settings.items() if k != "detail" or row["role"] == "user"})
    return found


def restore_settings(ctx: Ctx, conv_id: str | None, request: gr.Request):
    """A reopened conversation's sliders, system override and image detail as they were last used in it.

    (temperature, top p, max new tokens, system override, image detail); untouched when there is none.
    """
    skip = (gr.skip(),) * 5
    if not conv_id:
        return skip
    owner = owner_of(request)
    try:
        conv = ctx.store.get_conversation(owner, conv_id)
        found = _last_settings(conv, ctx.store.messages(owner, conv_id))
    except NotFound:
        return skip
    m = mode_for(conv.get("mode"))
    limit = ctx.settings.max_new_tokens_limit

    def number(key, default, low, high):
        try:
            return min(max(float(found.get(key, default)), low), high)
        except (TypeError, ValueError):
            return default

    detail = found.get("detail")
    return (number("temperature", m.temperature, 0.0, 2.0), number("top_p", 0.9, 0.05, 1.0),
            int(number("max_new_tokens", m.max_new_tokens, 16, limit)), str(found.get("system") or ""),
            detail if detail in DETAILS else DEFAULT_DETAIL)


def ask_delete(ctx: Ctx, conv_id: str | None, request: gr.Request):
    """Delete pressed: the inline confirmation ("Delete 'title'?") with its question; nothing deleted yet."""
    if not conv_id:
        raise Notice("Open a conversation first; there is nothing to delete.")
    try:
        conv = ctx.store.get_conversation(owner_of(request), conv_id)
    except NotFound:
        raise Notice("That conversation no longer exists.") from None
    return gr.update(visible=True), i18n_t(lang_of(request), "delete.question", title=md_escape(conv["title"]))


def hide_confirm():
    """The confirmation closes (Cancel, after Delete, or the page showed something else)."""
    return gr.update(visible=False)
