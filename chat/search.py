"""Search the owner's conversations from the sidebar (issue 13): titles and message text, any version.

The "Search conversations" box filters the Conversations list as one types; choosing a result
opens it as usual. A plain substring match (SQLite LIKE, its wildcards escaped) over the owner's
rows only (chat.store_messages.search_conversations); case is ignored for ASCII letters.
"""

from __future__ import annotations

import gradio as gr

from chat import ui
from chat.i18n_text import translate
from chat.notices import Notice

MAX_QUERY_CHARS = 200


def search(ctx: ui.Ctx, query: str | None, conv_id: str | None, request: gr.Request) -> tuple:
    """(Conversations list, result line): the owner's conversations that match, newest first."""
    query = " ".join((query or "").split())[:MAX_QUERY_CHARS]
    try:
        owner = ui.owner_of(request)
    except Notice:
        return gr.update(choices=[], value=None), ""
    found = ctx.store.search_conversations(owner, query)
    choices = [(c["title"], c["id"]) for c in found]
    value = conv_id if any(c["id"] == conv_id for c in found) else None
    if not query:
        line = ""
    elif not found:
        line = "No conversations match."
    else:
        line = f"{len(found)} conversation{'s' if len(found) != 1 else ''} match{'es' if len(found) == 1 else ''}."
    return gr.update(choices=choices, value=value), translate(line)  # issue 13: in the page's language
