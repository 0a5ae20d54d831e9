"""The page's layout: Gradio Blocks wired to the handlers in `chat.ui`.

Every event is queued (the page reaches Gradio only through its queue) and private (not a
Gradio API: programs use /v1). Handlers get the shared `Ctx` through `bind`, which keeps the
signature and type hints Gradio inspects to inject `gr.Request`, and turns a `Notice` into the
dismissable notice in the chat area (every other output left as it was). The browser identity
is an HttpOnly cookie set by the server (`chat.security`), so the page keeps no secret.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import gradio as gr

from chat import admin, describe, history_io, notices, search, versions  # history_io, search, versions: issue 13
from chat.conversation import DEFAULT_MODE, MODES
from chat.engine.sampling_defaults import CARD
from chat.grounding_page import find, find_visible  # issue 14 (grounding): "Find on the image", screenshot mode
from chat.i18n import I18N
from chat.i18n import label as L  # issue 13 (ux): labels translated in the browser (chat/i18n.py)
from chat.i18n_text import in_language, page_lang, speaking, translate  # issue 13: server sentences
from chat.notices import Notice
from chat.sampling_panel import adapter_choice, controls, page_defaults, restore  # issue 14: sampling, LoRA
from chat.ui import (
    PLACEHOLDER,
    Ctx,
    change_mode,
    delete,
    loading_tick,
    max_message_chars,
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
from chat.ui_conversation import ask_delete, hide_confirm, restore_settings

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def bind(fn, ctx: Ctx, outputs: int | None = None):
    """`fn` with `ctx` filled in, keeping what Gradio inspects: signature, type hints, generator-ness.

    With `outputs` (how many outputs `fn` itself has), two more outputs follow them: the notice
    region and its text. A `Notice` then shows there and leaves the other outputs untouched; a
    handler that succeeds hides an earlier notice.

    Issue 13: the handler runs in the page's language (chat.i18n_text: status lines and notes it writes
    with `say`), and a notice is shown in it.
    """
    def refused(exc: Notice, lang: str) -> tuple:
        return (*[gr.skip()] * outputs, *notices.shown(translate(exc.message, lang)))

    if inspect.isgeneratorfunction(fn):
        def bound(*args, **kwargs):
            lang = page_lang(args, kwargs)
            if outputs is None:
                yield from in_language(lang, fn(ctx, *args, **kwargs))
                return
            first = True
            try:
                for out in in_language(lang, fn(ctx, *args, **kwargs)):
                    yield (*_as_tuple(out), *(notices.hidden() if first else notices.untouched()))
                    first = False
            except Notice as exc:
                yield refused(exc, lang)
    else:
        def bound(*args, **kwargs):
            lang = page_lang(args, kwargs)
            with speaking(lang):
                if outputs is None:
                    return fn(ctx, *args, **kwargs)
                try:
                    return (*_as_tuple(fn(ctx, *args, **kwargs)), *notices.hidden())
                except Notice as exc:
                    return refused(exc, lang)
    functools.update_wrapper(bound, fn)
    sig = inspect.signature(fn)
    bound.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])
    return bound


def mount_options(ctx: Ctx) -> dict:
    """What app.py passes to gr.mount_gradio_app for this page: its script and style."""
    # announce.js: the answer said sentence by sentence in a live region of its own, and read aloud.
    # a11y.js/.css: landmarks, names and alt text Gradio leaves out; contrast, focus, motion.
    # prefs.js: choices kept in the browser (mode, high contrast). camera.js: describe a photo, camera.
    # keys.js: keyboard shortcuts and their dialog, moving between messages.
    # They share `window.vlchat` (each adds its own functions to it).
    # i18n.js (issue 13, ux; first): vlchat.t(key) and the language choice. theme.js: light/dark/system.
    # ux.js/.css: send turns into Stop, Delete asks first.
    scripts = ("i18n.js", "page.js", "announce.js", "a11y.js", "prefs.js", "camera.js", "keys.js", "theme.js", "ux.js")
    return {"head": "".join(f"<script>{(ASSETS / name).read_text()}</script>" for name in scripts),
            "css": "\n".join((ASSETS / name).read_text() for name in ("page.css", "a11y.css", "ux.css")),
            "i18n": I18N}  # issue 13 (ux): English and Simplified Chinese labels (chat/i18n.py)


def build(ctx: Ctx, delete_cache: tuple[int, int] | None = None) -> gr.Blocks:
    """The Blocks page."""
    mode_choices = [(L(f"mode.{m.key}"), m.key) for m in MODES.values()]
    default = MODES[DEFAULT_MODE]
    ready = ctx.engine.ready.is_set()
    with gr.Blocks(title="vlchat", fill_height=True, delete_cache=delete_cache) as demo:
        conv_id = gr.State(None)
        gr.Markdown("# vlchat", elem_id="page-title", container=False)  # the page's h1
        if ctx.random_weights:
            gr.Markdown(
                "⚠ **Test model with random weights.** Answers are noise; everything around them is real.",
                elem_id="random-weights-banner", elem_classes=["banner"],
            )
        with gr.Sidebar(label=L("conversations"), position="left"):
            new_btn = gr.Button(L("new_chat"), variant="primary", elem_id="new-chat")
            # -- issue 13 (history): search the conversations (chat.search) --
            search_box = gr.Textbox(label=L("search.label"), elem_id="search", max_lines=1,
                                    placeholder=L("search.placeholder"))
            search_line = gr.Markdown("", elem_id="search-results", container=False)
            # -- end issue 13 (history) --
            conv_list = gr.Radio(label=L("conversations"), choices=[], elem_id="conversation-list")
            title = gr.Textbox(label=L("title"), elem_id="title", max_lines=1)
            with gr.Row():
                rename_btn = gr.Button(L("rename"), size="sm", elem_id="rename")
                delete_btn = gr.Button(L("delete"), size="sm", variant="stop", elem_id="delete")
            # -- issue 13 (ux): Delete asks first (assets/ux.js moves the focus here and back) --
            with gr.Column(visible=False, elem_id="delete-confirm") as confirm_box:
                confirm_text = gr.Markdown("", elem_id="delete-confirm-text", sanitize_html=True)
                with gr.Row():
                    confirm_yes = gr.Button(L("delete"), size="sm", variant="stop", elem_id="delete-confirm-yes")
                    confirm_no = gr.Button(L("cancel"), size="sm", elem_id="delete-confirm-no")
            # -- end issue 13 (ux) --
            # -- issue 13 (history): export (ZIP of Markdown + images, JSON) and import (chat.history_io) --
            with gr.Accordion(L("export.title"), open=False, elem_id="export-import"):
                export_btn = gr.Button(L("export.button"), size="sm", elem_id="export")
                export_zip = gr.DownloadButton(L("export.zip"), size="sm", visible=False,
                                               elem_id="export-zip")
                export_json = gr.DownloadButton(L("export.json"), size="sm", visible=False,
                                                elem_id="export-json")
                import_btn = gr.UploadButton(L("import.button"), size="sm", file_types=[".json"],
                                             file_count="single", type="filepath", elem_id="import")
            # -- end issue 13 (history) --
        mode = gr.Radio(mode_choices, value=default.key, label=L("mode"), elem_id="mode")
        # Messages arrive as HTML rendered on the server with raw HTML escaped (chat.render):
        # the browser must not run them through Markdown again.
        chatbot = gr.Chatbot(label=L("conversation"), elem_id="chat", height=520, buttons=["copy"],
                             feedback_options=None,
                             placeholder=L("chat_placeholder"),
                             render_markdown=False, sanitize_html=True)
        # Follow-up questions (chat.describe): shown once the conversation on screen has an answer.
        with gr.Row(visible=False, elem_id="follow-ups", equal_height=True) as follow_row:
            gr.Markdown(L("ask_next"), elem_id="follow-ups-label", container=False, scale=0, min_width=80)
            follow_btns = [gr.Button(label, size="sm", elem_id=f"follow-up-{i}", scale=0, min_width=120)
                           for i, (label, _) in enumerate(default.follow_ups)]
            follow_btns += [gr.Button("", size="sm", visible=False, elem_id=f"follow-up-{i}", scale=0, min_width=120)
                            for i in range(len(follow_btns), describe.MAX_FOLLOW_UPS)]
        # -- issue 14 (grounding): screenshot mode asks for the boxes of what is named (chat.grounding_page) --
        with gr.Row(visible=False, elem_id="find-row", equal_height=True) as find_row:
            find_text = gr.Textbox(label=L("find.label"), elem_id="find", max_lines=1, scale=4,
                                   placeholder="What to find, e.g. the Save button; Enter finds it")
            find_btn = gr.Button(L("find.button"), elem_id="find-button", scale=0, min_width=120)
        # -- end issue 14 (grounding) --
        with gr.Column(visible=False, elem_id="notice", elem_classes=["notice"]) as notice:
            # Markdown, not gr.HTML: Gradio 6's HTML component evaluates templates with Function(),
            # which the page's CSP (no 'unsafe-eval') refuses. The text is escaped in chat.notices.
            notice_text = gr.Markdown("", elem_id="notice-text", sanitize_html=True)
            dismiss = gr.Button(L("dismiss"), size="sm", elem_id="dismiss-notice")
        status = gr.Markdown("", elem_id="status", container=False)
        box = gr.MultimodalTextbox(
            file_types=["image"], file_count="multiple", sources=["upload"], elem_id="input",
            placeholder=PLACEHOLDER if ready else "Starting…", interactive=ready,
            show_label=False, autofocus=True,
            # Long pastes stay text (turned into a file they would be refused as "not an image"), so
            # one over the limit gets the notice that says how long it is and what the limit is.
            max_plain_text_length=10 * max_message_chars(ctx),
            stop_btn=True,  # issue 13 (ux): the send button turns into Stop while the box's answer streams
        )
        with gr.Row(elem_id="describe-row"):
            # Opens the file picker (on phones it offers the camera too) and sends the photo at once with the
            # mode's describe prompt. assets/camera.js adds "Take a photo" next to it.
            describe_btn = gr.UploadButton(L("describe_photo"), file_types=["image"], file_count="single",
                                           type="filepath", elem_id="describe-photo", scale=0, min_width=220,
                                           interactive=ready)
        timer = gr.Timer(1.0, active=False)
        with gr.Row(equal_height=True):
            detail = gr.Radio([(L(f"detail.{d}"), d) for d in ("low", "auto", "high")], value="auto",
                              label=L("image_detail"), elem_id="detail", scale=1,
                              info=L("detail_info"))
            attachments = gr.Markdown("", elem_id="attachments", container=False)
        with gr.Row():
            stop_btn = gr.Button(L("stop"), variant="stop", elem_id="stop")
            regen_btn = gr.Button(L("regenerate"), elem_id="regenerate")
        # -- issue 13 (history): edit a question, page through versions (chat.versions) --
        with gr.Accordion(L("versions.title"), open=False, elem_id="versions"):
            # allow_custom_value: the choices follow the chat on every change, and a value from just before is
            # checked by chat.versions (it must be on the path on screen), not refused by Gradio as "not a choice".
            version_target = gr.Dropdown(label=L("versions.message"), choices=[], elem_id="version-message",
                                         allow_custom_value=True)
            version_line = gr.Markdown("", elem_id="version-line")
            with gr.Row():
                prev_btn = gr.Button(L("versions.previous"), size="sm", interactive=False, elem_id="version-prev")
                next_btn = gr.Button(L("versions.next"), size="sm", interactive=False, elem_id="version-next")
            edit_text = gr.Textbox(label=L("versions.edited"), lines=3, visible=False, elem_id="edit-text")
            edit_btn = gr.Button(L("versions.send"), variant="primary", visible=False, elem_id="edit-send")
            version_seen = gr.State(None)  # the newest message id the panel has seen (chat.versions.panel)
        # -- end issue 13 (history) --
        with gr.Accordion(L("settings"), open=False, elem_id="settings"):
            temperature = gr.Slider(0.0, 2.0, value=default.temperature, step=0.05, label=L("temperature"),
                                    elem_id="temperature")
            top_p = gr.Slider(0.05, 1.0, value=CARD.top_p, step=0.05, label=L("top_p"), elem_id="top-p")
            # issue 14: top k, presence and frequency penalty, then the LoRA adapter (shown when --lora loads some)
            penalties = [*controls(), adapter_choice(ctx)]
            max_new = gr.Slider(16, ctx.settings.max_new_tokens_limit, value=default.max_new_tokens, step=16,
                                label=L("max_new_tokens"), elem_id="max-new-tokens")
            system = gr.Textbox(label=L("system_override"), lines=3,
                                elem_id="system")

        note = [notice, notice_text]
        outputs = [conv_id, chatbot, box, conv_list, status, title]
        cleared = [conv_id, chatbot, title, conv_list, status]
        # The page's events are for the page: not listed or callable as a Gradio API (the /v1
        # API is the way in for programs), and the queue runs with api_open=False.
        PRIVATE = {"api_visibility": "private"}
        sampling = [mode, temperature, top_p, max_new, system]
        preview_inputs = [conv_id, box, detail, max_new]
        demo.load(bind(on_load, ctx, 4), None, [conv_list, box, status, timer, *note], show_progress="hidden",
                  **PRIVATE).then(bind(describe.ready, ctx), None, [describe_btn], show_progress="hidden", **PRIVATE)
        timer.tick(bind(loading_tick, ctx), None, [box, status, timer], show_progress="hidden", **PRIVATE
                   ).then(bind(describe.ready, ctx), None, [describe_btn], show_progress="hidden", **PRIVATE)
        # The follow-up buttons follow what is on screen: after every event that changes it.
        follow = {"fn": bind(describe.follow_ups, ctx), "inputs": [conv_id, mode],
                  "outputs": [follow_row, *follow_btns], "show_progress": "hidden", "concurrency_limit": None,
                  **PRIVATE}
        # The versions panel follows the chat (chatbot.change below), but not token by token: while this page
        # streams an answer it is left alone, and brought up to date once the answer's event ends.
        panel = {"fn": bind(versions.panel, ctx), "inputs": [conv_id, version_target, version_seen],
                 "outputs": [version_target, version_line, prev_btn, next_btn, edit_text, edit_btn, version_seen],
                 "show_progress": "hidden", **PRIVATE}
        # "multiple": a message sent while the answer streams reaches the server, which holds it until then.
        box.submit(bind(send, ctx, len(outputs)), [conv_id, box, *sampling, detail, *penalties], [*outputs, *note],
                   concurrency_limit=None, trigger_mode="multiple", **PRIVATE).then(**follow).then(**panel)
        # "multiple": pressed while an answer is coming, they reach the server, which says why it waits
        # (the browser would drop a second press of a pending event without a word).
        describe_btn.upload(bind(describe.describe, ctx, len(outputs)),
                            [conv_id, describe_btn, *sampling, detail, *penalties],
                            [*outputs, *note], concurrency_limit=None, trigger_mode="multiple", **PRIVATE
                            ).then(**follow).then(**panel)
        for btn in follow_btns:
            btn.click(bind(describe.follow_up, ctx, len(outputs)), [btn, conv_id, *sampling, detail, *penalties],
                      [*outputs, *note], concurrency_limit=None, trigger_mode="multiple", **PRIVATE
                      ).then(**follow).then(**panel)
        for source in (box, detail, max_new):
            source.change(bind(preview, ctx), preview_inputs, [attachments], queue=True, show_progress="hidden",
                          **PRIVATE)
        regenerated = regen_btn.click(bind(regenerate, ctx, len(outputs)), [conv_id, *sampling, *penalties],
                                      [*outputs, *note],
                                      concurrency_limit=None, **PRIVATE).then(**follow)
        # No `cancels=`: the engine ends the answer and the streaming handler shows it as stopped.
        stop_btn.click(bind(stop, ctx), None, [status], **PRIVATE)
        box.stop(bind(stop, ctx), None, [status], **PRIVATE)  # issue 13 (ux): the box's own Stop button
        dismiss.click(notices.hidden, None, note, show_progress="hidden", **PRIVATE)
        new_btn.click(bind(new_chat, ctx, len(cleared)), None, [*cleared, *note], **PRIVATE).then(**follow)
        conv_list.input(bind(open_conversation, ctx, 4), [conv_list], [conv_id, chatbot, title, mode, *note],
                        **PRIVATE).then(**follow)
        # -- issue 13 (ux): a reopened conversation's settings come back; Delete asks first --
        conv_list.input(bind(restore_settings, ctx), [conv_list], [temperature, top_p, max_new, system, detail],
                        show_progress="hidden", **PRIVATE)
        # The confirmation names what was on screen: it goes when the page shows something else.
        new_btn.click(hide_confirm, None, [confirm_box], show_progress="hidden", **PRIVATE)
        conv_list.input(hide_confirm, None, [confirm_box], show_progress="hidden", **PRIVATE)
        delete_btn.click(bind(ask_delete, ctx, 2), [conv_id], [confirm_box, confirm_text, *note],
                         show_progress="hidden", **PRIVATE)
        confirm_no.click(hide_confirm, None, [confirm_box], show_progress="hidden", **PRIVATE)
        confirm_yes.click(hide_confirm, None, [confirm_box], show_progress="hidden", **PRIVATE)
        confirm_yes.click(bind(delete, ctx, len(cleared)), [conv_id], [*cleared, *note], **PRIVATE).then(**follow)
        # -- end issue 13 (ux) --
        rename_btn.click(bind(rename, ctx, 2), [conv_id, title], [conv_list, status, *note], **PRIVATE)
        title.submit(bind(rename, ctx, 2), [conv_id, title], [conv_list, status, *note], **PRIVATE)
        mode.input(bind(change_mode, ctx, 2), [conv_id, mode], [temperature, max_new, *note], **PRIVATE).then(**follow)
        # -- issue 13 (history): versions panel, edit, search, export and import --
        version_outs = [version_target, version_line, prev_btn, next_btn, edit_text, edit_btn]
        chatbot.change(bind(versions.panel, ctx), [conv_id, version_target, version_seen],
                       [*version_outs, version_seen], trigger_mode="always_last", show_progress="hidden", **PRIVATE)
        version_target.input(bind(versions.choose, ctx), [conv_id, version_target], version_outs,
                             show_progress="hidden", **PRIVATE)
        for btn, fn in ((prev_btn, versions.previous_version), (next_btn, versions.next_version)):
            btn.click(bind(fn, ctx, 1 + len(version_outs)), [conv_id, version_target], [chatbot, *version_outs, *note],
                      show_progress="hidden", **PRIVATE).then(**follow)
        edited = edit_btn.click(bind(versions.edit, ctx, len(outputs)),
                                [conv_id, version_target, edit_text, *sampling, *penalties],
                                [*outputs, *note], concurrency_limit=None, **PRIVATE).then(**follow)
        # Once a new version has streamed, the chat is drawn again from the store: it says "Version k of n".
        for event in (regenerated, edited):
            event.then(bind(versions.redraw, ctx), [conv_id], [chatbot], show_progress="hidden", **PRIVATE
                       ).then(**panel)
        for event in (search_box.change, search_box.submit):
            event(bind(search.search, ctx), [search_box, conv_id], [conv_list, search_line], show_progress="hidden",
                  trigger_mode="always_last", **PRIVATE)
        export_btn.click(bind(history_io.export, ctx, 3), [conv_id], [export_zip, export_json, status, *note],
                         **PRIVATE)
        conv_id.change(history_io.hide_downloads, None, [export_zip, export_json], show_progress="hidden", **PRIVATE)
        import_btn.upload(bind(history_io.import_conversation, ctx, 6), [import_btn],
                          [conv_id, chatbot, title, mode, conv_list, status, *note], **PRIVATE).then(**follow)
        # -- end issue 13 (history) --
        admin.panel(ctx, demo, PRIVATE)  # issue 14 (accounts): usage per user, for admins only
        # -- issue 14 (grounding): Find (button or Enter), shown in screenshot mode only --
        for trigger in (find_btn.click, find_text.submit):
            trigger(bind(find, ctx, len(outputs)), [find_text, conv_id, *sampling, detail, *penalties],
                    [*outputs, *note], concurrency_limit=None, trigger_mode="multiple", **PRIVATE
                    ).then(**follow).then(**panel)
        mode.change(find_visible, [mode], [find_row], show_progress="hidden", **PRIVATE)
        # -- end issue 14 (grounding) --
        # -- issue 14 (sampling): the panel starts at the model's defaults; a reopened conversation's come back --
        demo.load(bind(page_defaults, ctx), None, [top_p, *penalties], show_progress="hidden",
                  **PRIVATE)
        conv_list.input(bind(restore, ctx), [conv_list], penalties, show_progress="hidden", **PRIVATE)
        # -- end issue 14 (sampling) --
        demo.unload(bind(page_closed, ctx))
    return demo
