"""Refusals shown as a dismissable notice in the chat area, instead of Gradio's red error overlay.

A handler raises `Notice("...")`; `chat.page.bind` turns it into output updates that leave every
other output untouched (gr.skip()) and show the message in the notice region: a visible,
focusable `role="alert"` box with a Dismiss button. A handler that succeeds hides it again.
"""

from __future__ import annotations

import html
import itertools

import gradio as gr

_SERIAL = itertools.count()


class Notice(Exception):
    """Something the person must know (a refused message, a missing conversation); nothing else changes."""

    def __init__(self, message: str, *, box=None) -> None:
        super().__init__(message)
        self.message = message
        self.box = box  # an input-box value to put back (a refused question), or None: leave it


def notice_html(message: str) -> str:
    """The notice's markup: an alert that is announced, focusable and shows the text as typed."""
    # The serial makes a repeated message a new value, so it is shown and announced again.
    return (f'<div class="notice-text" role="alert" tabindex="0" data-n="{next(_SERIAL)}">'
            f"⚠ {html.escape(message)}</div>")


def shown(message: str) -> tuple:
    """Updates for (notice region, notice text) that show `message`."""
    return gr.update(visible=True), notice_html(message)


def hidden() -> tuple:
    """Updates for (notice region, notice text) that hide the notice."""
    return gr.update(visible=False), ""


def untouched() -> tuple:
    """Updates for (notice region, notice text) that change nothing."""
    return gr.skip(), gr.skip()
