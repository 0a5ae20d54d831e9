"""The page's layout: Gradio Blocks wired to the handlers in `chat.ui`.

Every event is queued (the page reaches Gradio only through its queue) and private (not a
Gradio API: programs use /v1). Handlers get the shared `Ctx` through `bind`, which keeps the
signature and type hints Gradio inspects to inject `gr.Request`.
"""

from __future__ import annotations

import functools
import inspect

import gradio as gr

from chat.conversation import DEFAULT_MODE, MODES
from chat.ui import (
    Ctx,
    change_mode,
    delete,
    new_chat,
    on_load,
    open_conversation,
    page_closed,
    preview,
    regenerate,
    rename,
    send,
    stop,
)


def bind(fn, ctx: Ctx):
    """`fn` with `ctx` filled in, keeping what Gradio inspects: signature, type hints, generator-ness."""
    if inspect.isgeneratorfunction(fn):
        def bound(*args, **kwargs):
            yield from fn(ctx, *args, **kwargs)
    else:
        def bound(*args, **kwargs):
            return fn(ctx, *args, **kwargs)
    functools.update_wrapper(bound, fn)
    sig = inspect.signature(fn)
    bound.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])
    return bound


def build(ctx: Ctx, browser_key: str, delete_cache: tuple[int, int] | None = None) -> gr.Blocks:
    """The Blocks page."""
    mode_choices = [(m.label, m.key) for m in MODES.values()]
    default = MODES[DEFAULT_MODE]
    with gr.Blocks(title="vlchat", fill_height=True, delete_cache=delete_cache) as demo:
        secret = gr.BrowserState(None, storage_key="vlchat-identity", secret=browser_key)
        conv_id = gr.State(None)
        if ctx.random_weights:
            gr.Markdown(
                "⚠ **Test model with random weights.** Answers are noise; everything around them is real.",
                elem_id="random-weights-banner", elem_classes=["banner"],
            )
        with gr.Sidebar(label="Conversations", position="left"):
            new_btn = gr.Button("New chat", variant="primary", elem_id="new-chat")
            conv_list = gr.Radio(label="Conversations", choices=[], elem_id="conversation-list")
            title = gr.Textbox(label="Title", elem_id="title", max_lines=1)
            with gr.Row():
                rename_btn = gr.Button("Rename", size="sm", elem_id="rename")
                delete_btn = gr.Button("Delete", size="sm", variant="stop", elem_id="delete")
        mode = gr.Radio(mode_choices, value=default.key, label="Mode", elem_id="mode")
        chatbot = gr.Chatbot(label="Conversation", elem_id="chat", height=520, buttons=["copy"],
                             feedback_options=None, placeholder="Attach or paste an image and ask about it.")
        status = gr.Markdown("", elem_id="status", container=False)
        box = gr.MultimodalTextbox(
            file_types=["image"], file_count="multiple", sources=["upload"], elem_id="input",
            placeholder="Ask about an image — Enter sends, Shift+Enter for a new line; paste or drop images",
            show_label=False, autofocus=True, max_plain_text_length=100_000,  # long pastes stay text
        )
        with gr.Row(equal_height=True):
            detail = gr.Radio([("Low", "low"), ("Auto", "auto"), ("High", "high")], value="auto",
                              label="Image detail", elem_id="detail", scale=1,
                              info="Low: about 256 tokens per image. Auto: screenshots keep their resolution. "
                                   "High: up to about 4,096 tokens, for dense documents.")
            attachments = gr.Markdown("", elem_id="attachments", container=False)
        with gr.Row():
            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
            regen_btn = gr.Button("Regenerate", elem_id="regenerate")
        with gr.Accordion("Settings", open=False, elem_id="settings"):
            temperature = gr.Slider(0.0, 2.0, value=default.temperature, step=0.05, label="Temperature",
                                    elem_id="temperature")
            top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top p", elem_id="top-p")
            max_new = gr.Slider(16, ctx.settings.max_new_tokens_limit, value=default.max_new_tokens, step=16,
                                label="Max new tokens", elem_id="max-new-tokens")
            system = gr.Textbox(label="System prompt override (empty: the mode's prompt)", lines=3,
                                elem_id="system")

        outputs = [conv_id, chatbot, box, conv_list, status, title]
        # The page's events are for the page: not listed or callable as a Gradio API (the /v1
        # API is the way in for programs), and the queue runs with api_open=False.
        PRIVATE = {"api_visibility": "private"}
        sampling = [mode, temperature, top_p, max_new, system]
        preview_inputs = [secret, conv_id, box, detail, max_new]
        demo.load(bind(on_load, ctx), [secret], [secret, conv_list], **PRIVATE)
        box.submit(bind(send, ctx), [secret, conv_id, box, *sampling, detail], outputs, concurrency_limit=None,
                   **PRIVATE)
        for source in (box, detail, max_new):
            source.change(bind(preview, ctx), preview_inputs, [attachments], queue=True, show_progress="hidden",
                          **PRIVATE)
        regen_btn.click(bind(regenerate, ctx), [secret, conv_id, *sampling], outputs, concurrency_limit=None,
                        **PRIVATE)
        # No `cancels=`: the engine ends the answer and the streaming handler shows it as stopped.
        stop_btn.click(bind(stop, ctx), None, [status], **PRIVATE)
        new_btn.click(new_chat, None, [conv_id, chatbot, title, conv_list, status], **PRIVATE)
        conv_list.input(bind(open_conversation, ctx), [secret, conv_list], [conv_id, chatbot, title, mode],
                        **PRIVATE)
        rename_btn.click(bind(rename, ctx), [secret, conv_id, title], [conv_list, status], **PRIVATE)
        title.submit(bind(rename, ctx), [secret, conv_id, title], [conv_list, status], **PRIVATE)
        delete_btn.click(bind(delete, ctx), [secret, conv_id], [conv_id, chatbot, title, conv_list, status],
                         **PRIVATE)
        mode.input(bind(change_mode, ctx), [secret, conv_id, mode], [temperature, max_new], **PRIVATE)
        demo.unload(bind(page_closed, ctx))
    return demo
