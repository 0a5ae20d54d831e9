"""The page's handlers: module-level functions that check, store and start answers.

Thin by design. Each handler takes a `Ctx` (store, engine, settings, the live requests) plus
Gradio's inputs, so the functions can be tested without a browser. Nothing here imports
torch: generation goes through `engine.submit()` and comes back as events (`chat.stream`).
A refusal raises `chat.notices.Notice`, which the page shows in the chat area.

Ownership: the logged-in user with --auth, else the browser identity kept in an HttpOnly
signed cookie (`chat.security.browser_owner`). The owner is also the request's cache salt,
so one owner's cached prompt state never serves another.

Order of a message: every cheap check (text length, image count, bytes, declared pixels,
the conversation's image limit, model ready) -> images decoded and cleaned in memory ->
`engine.submit` (busy, or a prompt that cannot fit, is refused here and nothing is stored) ->
images, question and a 'pending' answer stored -> uploaded originals deleted -> streamed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import gradio as gr

from chat import trim
from chat.config import Settings
from chat.conversation import (
    attachment_preview,
    context_used,
    engine_messages,
    localized,
    md_escape,
    mode_for,
    title_from,
)
from chat.engine.sampling_defaults import defaults_of
from chat.engine.types import ChatRequest, EngineError, Failed
from chat.i18n import lang_of
from chat.i18n_text import say, translate  # issue 13: status lines in the page's language
from chat.images import DEFAULT_DETAIL, DETAILS, plan
from chat.notices import Notice
from chat.ratelimit_gate import client_address, page_ticket
from chat.render import chat_history
from chat.store import NotFound, Store
from chat.stream import Turn, forget_session, stream, switch_view, view_token, wait_turn
from chat.uploads import check_files, clean_files, discard_originals, give_back, name_of

try:
    from chat.security import browser_owner
except ImportError:  # until the web helper's module lands: no browser identity yet

    def browser_owner(request) -> str | None:
        """No cookie identity available."""
        return None


PLACEHOLDER = "Ask about an image — Enter sends, Shift+Enter for a new line; paste or drop images"
DEFAULT_MAX_MESSAGE_CHARS = 100_000


@dataclass
class Ctx:
    """What the handlers need; built once by app.py."""

    store: Store
    engine: object  # chat.engine.local.engine.Engine (not imported: it pulls in torch)
    settings: Settings
    random_weights: bool = False
    model_name: str = ""
    exit_code: int = 0
    api: object = None  # the /v1 state (chat.api.ApiState), set by app.py
    limits: object = None  # chat.ratelimit_gate.Gate (--rate-limit, --token-limit; issue 14), set by app.py
    accounts: object = None  # chat.accounts.Accounts (page logins, admins; issue 14), set by app.py
    status: object = None  # chat.engine.types.LoadStatus: start-up progress ("Loading the model, 43%")
    active: dict[str, object] = field(default_factory=dict)  # Gradio session -> Handle it is drawing
    running: dict[str, object] = field(default_factory=dict)  # conversation id -> Handle answering it
    views: dict[str, int] = field(default_factory=dict)  # Gradio session -> view token (chat.stream)
    streams: dict[str, threading.Event] = field(default_factory=dict)  # session -> "its stream stopped drawing"
    queued: set[str] = field(default_factory=set)  # sessions with a message waiting for the answer on screen
    lock: threading.Lock = field(default_factory=threading.Lock)


# -- identity and checks --------------------------------------------------------------------


def owner_of(request: gr.Request | None) -> str:
    """The owner key: the logged-in user, else this browser's cookie identity."""
    user = getattr(request, "username", None) if request is not None else None
    if user:
        return "user:" + user
    owner = browser_owner(request) if request is not None else None
    if not owner:
        raise Notice("This browser has no identity yet; reload the page.")
    return owner


def max_message_chars(ctx: Ctx) -> int:
    """The longest text one message may carry."""
    return int(getattr(ctx.settings, "max_message_chars", DEFAULT_MAX_MESSAGE_CHARS))


def check_text(ctx: Ctx, text: str, system: str | None = "") -> None:
    """Refuse a message (or system prompt) longer than the setting, before anything else is done."""
    limit = max_message_chars(ctx)
    for what, value in (("Your message", text), ("The system prompt override", system or "")):
        if len(value) > limit:
            raise Notice(f"{what} is {len(value):,} characters; the limit is {limit:,}. Shorten it or split it "
                         "into several messages. Nothing was sent.")


def loading_line(ctx: Ctx) -> str:
    """How start-up is going (or, with --engine-url, whether the model server is there), for a person."""
    remote_line = getattr(ctx.engine, "state_line", None)
    if remote_line is not None:
        return remote_line()
    return ctx.status.describe() if ctx.status is not None else "The model is loading…"


def check_ready(ctx: Ctx) -> None:
    """Refuse work until the model serves (nothing is stored for a message sent too early)."""
    if not ctx.engine.ready.is_set():
        if getattr(ctx.engine, "state_line", None) is not None:  # --engine-url: the model server is away
            raise Notice(f"{loading_line(ctx)} Nothing was sent; your message is still in the box.")
        raise Notice(f"{loading_line(ctx)} The model is not ready yet, so nothing was sent; try again when "
                     "the box is enabled.")


def readiness(ctx: Ctx) -> tuple:
    """(input box, status line, timer) updates: the box is off, with the loading line, until ready.

    With --engine-url the model server can go away and come back, so the timer keeps watching (every
    `watch_seconds`) and the status line is left alone while nothing changes (it may say "Answering…").
    """
    watch = getattr(ctx.engine, "watch_seconds", None)
    if ctx.engine.ready.is_set():
        if watch is None:
            return gr.update(interactive=True, placeholder=PLACEHOLDER), "", gr.Timer(active=False)
        just_back = time.monotonic() - ctx.engine.changed_at < 2 * watch
        return (gr.update(interactive=True, placeholder=PLACEHOLDER), "" if just_back else gr.skip(),
                gr.Timer(watch, active=True))
    line = translate(loading_line(ctx))  # issue 13: in the page's language
    failed = getattr(ctx.status, "phase", "") == "failed"
    return gr.update(interactive=False, placeholder=line), line, gr.Timer(active=not failed)


def conversation_choices(ctx: Ctx, owner: str) -> list[tuple[str, str]]:
    """(title, id) pairs for the sidebar, newest first."""
    return [(c["title"], c["id"]) for c in ctx.store.list_conversations(owner)]


# -- handlers -------------------------------------------------------------------------------


def on_load(ctx: Ctx, request: gr.Request):
    """First paint: the browser's conversations, and the input box enabled only once the model serves."""
    try:
        choices = conversation_choices(ctx, owner_of(request))
    except Notice:  # no identity (cookies blocked?): the box still follows start-up; sending says why
        choices = []
    return (gr.update(choices=choices, value=None), *readiness(ctx))


def loading_tick(ctx: Ctx, request: gr.Request = None):  # the request: the page's language (chat.page.bind)
    """While the model loads: the progress line; then enable the box and stop the timer."""
    return readiness(ctx)


def new_chat(ctx: Ctx, request: gr.Request):
    """Clear the page for a new conversation (created on its first message)."""
    switch_view(ctx, request.session_hash)
    return None, [], "", gr.update(value=None), ""


def open_conversation(ctx: Ctx, conv_id: str | None, request: gr.Request):
    """Show a stored conversation (an answer still streaming elsewhere stops drawing here)."""
    if not conv_id:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    owner = owner_of(request)
    try:
        conv = ctx.store.get_conversation(owner, conv_id)
        rows = ctx.store.messages(owner, conv_id)
    except NotFound:
        raise Notice("That conversation does not exist (it may have been deleted).") from None
    switch_view(ctx, request.session_hash)
    return conv_id, chat_history(ctx.store, rows), conv["title"], conv["mode"]


def rename(ctx: Ctx, conv_id: str | None, title: str, request: gr.Request):
    """Rename the open conversation."""
    owner = owner_of(request)
    if not conv_id:
        raise Notice("Open or start a conversation first.")
    try:
        ctx.store.rename_conversation(owner, conv_id, title)
    except ValueError:
        raise Notice("A title cannot be empty.") from None
    except NotFound:
        raise Notice("That conversation no longer exists.") from None
    return gr.update(choices=conversation_choices(ctx, owner), value=conv_id), say("Renamed.")


def delete(ctx: Ctx, conv_id: str | None, request: gr.Request):
    """Delete the open conversation (ending its answer first) and clear the page."""
    owner = owner_of(request)
    if conv_id:
        try:
            ctx.store.get_conversation(owner, conv_id)
        except NotFound:
            conv_id = None
    if conv_id:
        with ctx.lock:
            handle = ctx.running.get(conv_id)
        if handle is not None:
            handle.cancel()
        switch_view(ctx, request.session_hash)
        ctx.store.delete_conversation(owner, conv_id)
    return None, [], "", gr.update(choices=conversation_choices(ctx, owner), value=None), say("Conversation deleted.")


def change_mode(ctx: Ctx, conv_id: str | None, mode: str, request: gr.Request):
    """Switch mode: its defaults go into the settings panel and the conversation remembers it."""
    m = mode_for(mode)
    if conv_id:
        try:
            ctx.store.update_conversation(owner_of(request), conv_id, mode=m.key)
        except NotFound:
            pass
    return m.temperature, m.max_new_tokens


def stop(ctx: Ctx, request: gr.Request) -> str:
    """Stop this page's running answer (the worker ends it within a decode step)."""
    with ctx.lock:
        handle = ctx.active.get(request.session_hash)
    if handle is None:
        return ""
    handle.cancel()
    return say("Stopped.")


def page_closed(ctx: Ctx, request: gr.Request) -> None:
    """A closed tab stops the answer it was showing; what was generated is kept."""
    stop(ctx, request)
    forget_session(ctx, request.session_hash)


def preview(ctx: Ctx, conv_id, box, detail, max_new_tokens, request: gr.Request) -> str:
    """Before sending: each attached image's size, what the model will see, its token cost, context left."""
    files = (box or {}).get("files") or []
    if not files:
        return ""
    try:
        sizes = check_files(files, ctx.settings)
    except Notice as exc:
        return f"**{md_escape(translate(exc.message))}**"
    plans = [plan(*size, detail or DEFAULT_DETAIL) for size in sizes]
    used = 0
    if conv_id:
        try:
            used = context_used(ctx.store.messages(owner_of(request), conv_id))
        except (NotFound, Notice):
            pass
    text = attachment_preview([name_of(f) for f in files], plans, used, ctx.settings.context_tokens,
                              int(max_new_tokens))
    left = ctx.settings.context_tokens - used - sum(p.tokens for p in plans) - int(max_new_tokens)
    if left < 0 and used and ctx.settings.trim_history:  # issue 14: it is sent, without the oldest turns
        text += " " + say("Sent as it is, the oldest turns are left out to make room (the answer says so).")
    return "\n".join(translate(line) for line in text.split("\n"))  # issue 13: in the page's language


def _turn_settings(temperature, top_p, max_new_tokens, system, detail: str | None = None, **sampling) -> dict:
    """The sampling settings stored with a message (detail only where images were attached).

    `sampling`: top_k, presence_penalty, frequency_penalty from the settings panel (issue 14; None: not given,
    the model's default applies and nothing is stored)."""
    settings = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "system": system or ""}
    settings.update({k: v for k, v in sampling.items() if v is not None})
    if detail is not None:
        settings["detail"] = detail if detail in DETAILS else DEFAULT_DETAIL
    return settings


def _submit(ctx: Ctx, owner: str, conv_id: str | None, rows: list[dict], settings: dict, mode: str, turn: Turn,
            images: dict | None = None, lang: str | None = None, address: str | None = None):
    """Hand the conversation to the engine; a refusal (busy, loading, too long) is a Notice, nothing stored.

    `lang`: the page's language (chat.i18n); the mode's prompt is in it (issue 13). `address`: the client's,
    for --address-rate-limit.
    """
    system = settings["system"].strip() or localized(mode_for(mode), lang).system_prompt
    params = ctx.settings.clamp_params(settings["temperature"], settings["top_p"], settings["max_new_tokens"],
                                       defaults=defaults_of(ctx.engine), top_k=settings.get("top_k"),
                                       presence_penalty=settings.get("presence_penalty"),
                                       frequency_penalty=settings.get("frequency_penalty"))  # issue 14
    request = ChatRequest(engine_messages(rows, system), params, session=conv_id, cache_salt=owner,
                          images=images or {}, adapter=settings.get("adapter") or "")  # issue 14: LoRA
    ticket = page_ticket(ctx.limits, owner, address)  # issue 14: over a rate limit -> a Notice; nothing stored
    try:
        # issue 14 (chat/trim.py): too long for the context -> the oldest turns are left out, and the answer says so
        handle, trimmed = trim.submit(ctx.engine, request, ticket.on_finish(turn.on_finish),
                                      enabled=ctx.settings.trim_history)
        if trimmed is not None:
            turn.extra.update(trimmed.as_usage())
    except EngineError as exc:
        ticket.refund()  # busy or loading: the message did not count against the rate limit
        raise Notice(f"{exc} Your message is still in the box.") from None
    result = handle.result
    if isinstance(result, Failed) and result.code == "context_length_exceeded":
        raise Notice(result.message)
    return handle


def send(ctx: Ctx, conv_id, box, mode, temperature, top_p, max_new_tokens, system, detail="auto",
         request: gr.Request = None, top_k=None, presence_penalty=None, frequency_penalty=None,
         adapter=None) -> Iterator[tuple]:
    """Check everything, submit, then store the question (and images) and stream the answer."""
    owner = owner_of(request)
    session = request.session_hash
    token = view_token(ctx, session)
    box = box or {}
    text = (box.get("text") or "").strip()
    files = box.get("files") or []
    if not text and not files:
        raise Notice("Type a question or attach an image.")
    check_text(ctx, text, system)
    check_files(files, ctx.settings)
    check_ready(ctx)
    yield from wait_turn(ctx, session)
    rows: list[dict] = []
    if conv_id:
        try:
            ctx.store.get_conversation(owner, conv_id)
            rows = ctx.store.messages(owner, conv_id)
        except NotFound:
            raise Notice("That conversation no longer exists; start a new chat.") from None
    held = sum(len(r["image_ids"]) for r in rows)
    if held + len(files) > ctx.settings.max_images_per_conversation:
        raise Notice(f"This conversation would hold {held + len(files)} images; the limit is "
                     f"{ctx.settings.max_images_per_conversation}. Start a new chat.")
    images = clean_files(files, ctx.settings)
    names = [name_of(f) for f in files]
    lang = lang_of(request)  # issue 13 (ux): the describe and system prompts in the page's language
    m = localized(mode_for(mode), lang)
    asked = text or m.describe_prompt  # images and no text: the mode's describe prompt (paste + Enter)
    settings = _turn_settings(temperature, top_p, max_new_tokens, system, detail, top_k=top_k,
                              presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                              adapter=adapter or None)
    question = {"role": "user", "text": asked, "image_ids": [i.sha256 for i in images], "settings": settings,
                "status": "complete"}
    turn = Turn(ctx, owner)
    handle = _submit(ctx, owner, conv_id, [*rows, question], settings, m.key, turn,
                     {i.sha256: i.data for i in images}, lang=lang, address=client_address(request))
    try:  # accepted: now it is stored
        ids = [ctx.store.put_image(i.data, mime=i.mime, width=i.width, height=i.height) for i in images]
        if not conv_id:
            # issue 13: a photo sent without a question is titled by its file name, not the describe prompt
            named = title_from(say("Photo: {name}", name=", ".join(names))) if names and not text else None
            conv_id = ctx.store.create_conversation(owner, title=named or title_from(asked), mode=m.key,
                                                    settings=settings)
        question_id = ctx.store.add_message(owner, conv_id, role="user", text=asked, image_ids=ids, mode=m.key,
                                            settings=settings, image_names=names)
        answer_id = ctx.store.add_message(owner, conv_id, role="assistant", text="", status="pending", mode=m.key,
                                          settings=settings)
    except NotFound:
        handle.cancel()
        raise Notice("That conversation no longer exists; start a new chat.") from None
    discard_originals(files)
    turn.attach(conv_id, answer_id, question_id, ids, handle)
    history = chat_history(ctx.store, ctx.store.messages(owner, conv_id)[:-1])
    first = (conv_id, {"text": "", "files": []}, gr.update(choices=conversation_choices(ctx, owner), value=conv_id),
             ctx.store.get_conversation(owner, conv_id)["title"])
    yield from stream(ctx, turn, handle, session, token, history, first,
                      give_back=lambda: {"text": text, "files": give_back(images, names)})


def regenerate(ctx: Ctx, conv_id, mode, temperature, top_p, max_new_tokens, system,
               request: gr.Request, top_k=None, presence_penalty=None, frequency_penalty=None,
               adapter=None) -> Iterator[tuple]:
    """Answer the last user message again: a new version of the answer (the earlier ones stay, chat.versions)."""
    owner = owner_of(request)
    session = request.session_hash
    token = view_token(ctx, session)
    if not conv_id:
        raise Notice("Nothing to regenerate yet.")
    check_text(ctx, "", system)
    try:
        rows = ctx.store.messages(owner, conv_id)
    except NotFound:
        raise Notice("That conversation no longer exists.") from None
    if not any(r["role"] == "user" for r in rows):
        raise Notice("Nothing to regenerate yet.")
    check_ready(ctx)
    with ctx.lock:
        live = ctx.running.get(conv_id)
    if live is not None:  # the answer still streaming ends first (it stays, as a stopped version)
        live.cancel()
        live.wait(10)
        rows = ctx.store.messages(owner, conv_id)
    while rows and rows[-1]["role"] == "assistant":
        rows.pop()
    if not rows or rows[-1]["role"] != "user":
        raise Notice("Nothing to regenerate yet.")
    settings = _turn_settings(temperature, top_p, max_new_tokens, system, top_k=top_k,
                              presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                              adapter=adapter or None)
    m = mode_for(mode)
    turn = Turn(ctx, owner)
    handle = _submit(ctx, owner, conv_id, rows, settings, m.key, turn, lang=lang_of(request),
                     address=client_address(request))
    try:  # a sibling of the answers so far (issue 13: versions)
        answer_id = ctx.store.add_message(owner, conv_id, role="assistant", text="", status="pending", mode=m.key,
                                          settings=settings, parent_id=rows[-1]["id"])
    except NotFound:
        handle.cancel()
        raise Notice("That conversation no longer exists.") from None
    turn.attach(conv_id, answer_id, handle=handle)
    first = (gr.skip(), gr.skip(), gr.skip(), gr.skip())
    yield from stream(ctx, turn, handle, session, token, chat_history(ctx.store, rows), first)
