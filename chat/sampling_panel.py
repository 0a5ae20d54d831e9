"""The settings panel's sampling controls beyond temperature and top p (issue 14): top k, presence and
frequency penalty.

They start at the model's defaults (`chat.engine.sampling_defaults`: the checkpoint's generation
config, else Qwen3-VL's model card: top_p 0.8, top_k 20, presence penalty 1.5), are sent with every
message (the handlers in chat/ui.py, chat/describe.py and chat/versions.py take them as keyword
arguments after `request`), are saved with the turn's settings like temperature, and come back when
a conversation is reopened.
"""

from __future__ import annotations

import gradio as gr

from chat.engine.adapters import parse_specs
from chat.engine.sampling_defaults import CARD, defaults_of
from chat.i18n import label as L
from chat.store import NotFound
from chat.ui import Ctx, owner_of
from chat.ui_conversation import _last_settings

KEYS = ("top_k", "presence_penalty", "frequency_penalty")
TOP_K_MAX = 100  # the slider's range; the API takes more


def controls() -> list:
    """The three sliders (built inside the settings accordion), with the model card's values until the page
    loads (then `page_defaults` sets the model's own)."""
    return [
        gr.Slider(0, TOP_K_MAX, value=CARD.top_k, step=1, label=L("top_k"), elem_id="top-k"),
        gr.Slider(-2.0, 2.0, value=CARD.presence_penalty, step=0.1, label=L("presence_penalty"),
                  elem_id="presence-penalty"),
        gr.Slider(-2.0, 2.0, value=CARD.frequency_penalty, step=0.1, label=L("frequency_penalty"),
                  elem_id="frequency-penalty"),
    ]


def adapter_choice(ctx: Ctx):
    """Which model answers: the base model or one of the LoRA adapters `--lora` loads (hidden when there are none).

    The choice is saved with each turn's settings (key "adapter") and comes back with the conversation.
    """
    names = list(parse_specs(ctx.settings.lora)) if not ctx.settings.engine_urls else []
    base = ctx.settings.model.rstrip("/").split("/")[-1]
    return gr.Dropdown([(base, ""), *((name, name) for name in names)], value="", label=L("adapter"),
                       visible=bool(names), elem_id="adapter", interactive=True)


def page_defaults(ctx: Ctx) -> tuple:
    """On page load: top p, top k and the penalties at the model's defaults (the card's while it loads)."""
    d = defaults_of(ctx.engine)
    return d.top_p, min(d.top_k, TOP_K_MAX), d.presence_penalty, d.frequency_penalty, gr.skip()


def restore(ctx: Ctx, conv_id: str | None, request: gr.Request) -> tuple:
    """A reopened conversation's top k and penalties as last used in it (left as they are where it never set
    them: conversations from before these controls)."""
    skip = (gr.skip(),) * (len(KEYS) + 1)
    if not conv_id:
        return skip
    owner = owner_of(request)
    try:
        found = _last_settings(ctx.store.get_conversation(owner, conv_id), ctx.store.messages(owner, conv_id))
    except NotFound:
        return skip
    limits = {"top_k": (0, TOP_K_MAX), "presence_penalty": (-2.0, 2.0), "frequency_penalty": (-2.0, 2.0)}
    out = []
    for key in KEYS:
        try:
            low, high = limits[key]
            value = min(max(float(found[key]), low), high)
            out.append(int(value) if key == "top_k" else value)
        except (KeyError, TypeError, ValueError):
            out.append(gr.skip())
    adapter = found.get("adapter") or ""  # issue 14: the LoRA adapter it last used (the base model if it is gone)
    out.append(adapter if adapter in parse_specs(ctx.settings.lora) else "")
    return tuple(out)
