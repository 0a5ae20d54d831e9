"""The page: Gradio Blocks wired to module-level functions that validate, store and stream.

Thin by design. Each handler takes a `Ctx` (store, engine, settings, the live requests) plus
Gradio's inputs, so the functions can be tested without a browser. Nothing here imports
torch: generation goes through `engine.submit()` and comes back as events.

Ownership: a browser gets a random secret in its local storage (BrowserState, encrypted with a
key kept in the data folder so it survives restarts); its conversations belong to the hash of
that secret. With --auth the logged-in user name is the owner instead.

Persistence: the user's message is written before generation starts; the answer row is
created as 'pending', saved every couple of seconds while it streams, and finished by the
worker's on_finish callback (complete / stopped / error), which runs even if the tab closed.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from chat.config import Settings
from chat.conversation import attachment_preview, context_used, engine_messages, mode_for, title_from
from chat.engine.types import ChatRequest, Delta, Done, EngineError, Failed
from chat.images import DEFAULT_DETAIL, DETAILS, ImageError, plan, sanitize, upright_size
from chat.store import NotFound, Store

log = logging.getLogger(__name__)

PROGRESS_SAVE_SECONDS = 2.0
STATUS_NOTE = {"stopped": "⏹ Stopped.", "interrupted": "⚠ Interrupted (the server restarted).", "pending": "…"}


@dataclass
class Ctx:
    """What the handlers need; built once by app.py."""

    store: Store
    engine: object  # chat.engine.worker.Engine (not imported: it pulls in torch)
    settings: Settings
    random_weights: bool = False
    model_name: str = ""
    exit_code: int = 0
    api: object = None  # the /v1 state (chat.api.ApiState), set by app.py
    status: object = None  # chat.engine.types.LoadStatus: start-up progress ("Loading the model, 43%")
    active: dict[str, object] = field(default_factory=dict)  # Gradio session -> engine Handle
    lock: threading.Lock = field(default_factory=threading.Lock)


# -- identity -------------------------------------------------------------------------------


def owner_of(secret: str | None, request: gr.Request | None) -> str:
    """The owner key: the logged-in user, else a hash of this browser's secret."""
    user = getattr(request, "username", None) if request is not None else None
    if user:
        return "user:" + user
    if not secret:
        raise gr.Error("This browser has no identity yet; reload the page.")
    return "browser:" + hashlib.sha256(secret.encode()).hexdigest()[:32]


def ensure_secret(secret: str | None) -> str:
    """A browser's secret, created on its first visit."""
    return secret if secret and len(secret) >= 32 else secrets.token_urlsafe(32)


# -- rendering ------------------------------------------------------------------------------


def chat_history(ctx: Ctx, rows: list[dict]) -> list[dict]:
    """Stored rows as Chatbot messages: user images inline, assistant Markdown, status notes."""
    out = []
    for row in rows:
        if row["role"] == "user":
            content: list[dict] = []
            for n, sha in enumerate(row["image_ids"], 1):
                try:
                    path = str(ctx.store.image_path(sha))
                except NotFound:
                    continue
                content.append({"type": "file", "file": {"path": path, "mime_type": "image/png"},
                                "alt_text": f"Attached image {n}"})
            if row["text"]:
                content.append({"type": "text", "text": row["text"]})
            out.append({"role": "user", "content": content})
        elif row["role"] == "assistant":
            out.append({"role": "assistant", "content": answer_markdown(row["text"], row["status"])})
    return out


def answer_markdown(text: str, status: str, error: str = "") -> str:
    """An answer with a visible note when it did not complete."""
    if status == "error":
        return (text + "\n\n" if text else "") + f"⚠ {error or 'The answer failed.'}"
    note = STATUS_NOTE.get(status)
    return f"{text}\n\n_{note}_" if note and text else (note or text if status != "complete" else text)


def conversation_choices(ctx: Ctx, owner: str) -> list[tuple[str, str]]:
    """(title, id) pairs for the sidebar, newest first."""
    return [(c["title"], c["id"]) for c in ctx.store.list_conversations(owner)]


# -- handlers -------------------------------------------------------------------------------


def on_load(ctx: Ctx, secret: str | None, request: gr.Request):
    """First paint: make sure the browser has an identity, list its conversations."""
    secret = ensure_secret(secret)
    owner = owner_of(secret, request)
    return secret, gr.update(choices=conversation_choices(ctx, owner), value=None)


def new_chat():
    """Clear the page for a new conversation (created on its first message)."""
    return None, [], "", gr.update(value=None), ""


def open_conversation(ctx: Ctx, secret: str | None, conv_id: str | None, request: gr.Request):
    """Show a stored conversation."""
    if not conv_id:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    owner = owner_of(secret, request)
    try:
        conv = ctx.store.get_conversation(owner, conv_id)
        rows = ctx.store.messages(owner, conv_id)
    except NotFound:
        raise gr.Error("That conversation does not exist (it may have been deleted).") from None
    return conv_id, chat_history(ctx, rows), conv["title"], conv["mode"]


def rename(ctx: Ctx, secret: str | None, conv_id: str | None, title: str, request: gr.Request):
    """Rename the open conversation."""
    owner = owner_of(secret, request)
    if not conv_id:
        raise gr.Error("Open or start a conversation first.")
    try:
        ctx.store.rename_conversation(owner, conv_id, title)
    except ValueError:
        raise gr.Error("A title cannot be empty.") from None
    except NotFound:
        raise gr.Error("That conversation no longer exists.") from None
    return gr.update(choices=conversation_choices(ctx, owner), value=conv_id), "Renamed."


def delete(ctx: Ctx, secret: str | None, conv_id: str | None, request: gr.Request):
    """Delete the open conversation and clear the page."""
    owner = owner_of(secret, request)
    stop(ctx, request)  # an answer still streaming into it ends first
    if conv_id:
        try:
            ctx.store.delete_conversation(owner, conv_id)
        except NotFound:
            pass
    return None, [], "", gr.update(choices=conversation_choices(ctx, owner), value=None), "Conversation deleted."


def change_mode(ctx: Ctx, secret: str | None, conv_id: str | None, mode: str, request: gr.Request):
    """Switch mode: its defaults go into the settings panel and the conversation remembers it."""
    m = mode_for(mode)
    if conv_id:
        try:
            ctx.store.update_conversation(owner_of(secret, request), conv_id, mode=m.key)
        except NotFound:
            pass
    return m.temperature, m.max_new_tokens


def _live(ctx: Ctx, request: gr.Request):
    """The engine handle of the answer this page is streaming now, if any."""
    with ctx.lock:
        return ctx.active.get(request.session_hash)


def _turn_settings(temperature, top_p, max_new_tokens, system, detail: str | None = None) -> dict:
    """The sampling settings stored with a message (detail only where images were attached)."""
    settings = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "system": system or ""}
    if detail is not None:
        settings["detail"] = detail if detail in DETAILS else DEFAULT_DETAIL
    return settings


def stop(ctx: Ctx, request: gr.Request) -> str:
    """Stop this page's running answer (the worker ends it within a decode step)."""
    handle = _live(ctx, request)
    if handle is None:
        return ""
    handle.cancel()
    return "Stopped."


def page_closed(ctx: Ctx, request: gr.Request) -> None:
    """A closed tab stops its answer; what was generated is kept."""
    stop(ctx, request)


@functools.lru_cache(maxsize=256)
def _upright_size(path: str, max_bytes: int, max_pixels: int) -> tuple[int, int]:
    # Upload paths are unique per upload, so the header is read once, not on every keystroke.
    return upright_size(Path(path).read_bytes(), max_bytes=max_bytes, max_pixels=max_pixels)


def preview(ctx: Ctx, secret, conv_id, box, detail, max_new_tokens, request: gr.Request) -> str:
    """Before sending: each attached image's size, what the model will see, its token cost, context left."""
    files = (box or {}).get("files") or []
    if not files:
        return ""
    names, plans = [], []
    for f in files:
        path = Path(f if isinstance(f, str) else f.get("path", ""))
        name = f.get("orig_name") if isinstance(f, dict) and f.get("orig_name") else path.name
        try:
            size = _upright_size(str(path), ctx.settings.max_image_bytes, ctx.settings.max_image_pixels)
            plans.append(plan(*size, detail or DEFAULT_DETAIL))
        except (ImageError, OSError) as exc:
            return f"**{name}**: {exc if isinstance(exc, ImageError) else 'could not be read.'}"
        names.append(name)
    used = 0
    if conv_id:
        try:
            used = context_used(ctx.store.messages(owner_of(secret, request), conv_id))
        except NotFound:
            pass
    return attachment_preview(names, plans, used, ctx.settings.context_tokens, int(max_new_tokens))


def _clean_uploads(ctx: Ctx, files: list) -> list[str]:
    """Sanitize and store attached images; their sha256 ids."""
    s = ctx.settings
    if len(files) > s.max_images_per_message:
        raise gr.Error(f"{len(files)} images attached; a message may carry {s.max_images_per_message}.")
    ids = []
    for f in files:
        path = Path(f if isinstance(f, str) else f.get("path", ""))
        try:
            data = path.read_bytes()
        except OSError:
            raise gr.Error("An attached file could not be read; attach it again.") from None
        try:
            clean = sanitize(data, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels)
        except ImageError as exc:
            raise gr.Error(f"{path.name}: {exc}") from None
        ids.append(ctx.store.put_image(clean.data, mime=clean.mime, width=clean.width, height=clean.height))
    return ids


def send(ctx: Ctx, secret, conv_id, box, mode, temperature, top_p, max_new_tokens, system, detail="auto",
         request: gr.Request = None):
    """Store the user's message (and images), then stream the answer into the chat."""
    owner = owner_of(secret, request)
    box = box or {}
    text = (box.get("text") or "").strip()
    files = box.get("files") or []
    if not text and not files:
        raise gr.Error("Type a question or attach an image.")
    image_ids = _clean_uploads(ctx, files)
    m = mode_for(mode)
    settings = _turn_settings(temperature, top_p, max_new_tokens, system, detail)
    try:
        if conv_id:
            ctx.store.get_conversation(owner, conv_id)
        else:
            conv_id = ctx.store.create_conversation(owner, title=title_from(text), mode=m.key, settings=settings)
        held = sum(len(r["image_ids"]) for r in ctx.store.messages(owner, conv_id))
        if held + len(image_ids) > ctx.settings.max_images_per_conversation:
            raise gr.Error(f"This conversation would hold {held + len(image_ids)} images; the limit is "
                           f"{ctx.settings.max_images_per_conversation}. Start a new chat.")
        question_id = ctx.store.add_message(owner, conv_id, role="user", text=text, image_ids=image_ids,
                                            mode=m.key, settings=settings)
    except NotFound:
        raise gr.Error("That conversation no longer exists; start a new chat.") from None
    choices = gr.update(choices=conversation_choices(ctx, owner), value=conv_id)
    yield from _answer(ctx, owner, conv_id, request.session_hash, settings, m.key, choices,
                       clear_box={"text": "", "files": []},
                       title=ctx.store.get_conversation(owner, conv_id)["title"], undo=(question_id, box))


def regenerate(ctx: Ctx, secret, conv_id, mode, temperature, top_p, max_new_tokens, system, request: gr.Request):
    """Answer the last user message again (the previous answer is replaced)."""
    owner = owner_of(secret, request)
    if not conv_id:
        raise gr.Error("Nothing to regenerate yet.")
    try:
        rows = ctx.store.messages(owner, conv_id)
    except NotFound:
        raise gr.Error("That conversation no longer exists.") from None
    if not rows or not any(r["role"] == "user" for r in rows):
        raise gr.Error("Nothing to regenerate yet.")
    live = _live(ctx, request)
    if live is not None:  # the answer still streaming is the one being replaced: end it first
        live.cancel()
        live.wait(10)
        rows = ctx.store.messages(owner, conv_id)
    while rows and rows[-1]["role"] == "assistant":
        ctx.store.delete_message(owner, rows.pop()["id"])
    settings = _turn_settings(temperature, top_p, max_new_tokens, system)
    yield from _answer(ctx, owner, conv_id, request.session_hash, settings, mode_for(mode).key, gr.skip(),
                       clear_box=gr.skip(), title=gr.skip())


def _answer(ctx: Ctx, owner, conv_id, session, settings, mode, choices, clear_box, title,
            undo: tuple[int, dict] | None = None) -> Iterator[tuple]:
    """Submit the conversation and stream the answer; yields (conv_id, chat, box, list, status, title).

    `undo` is the new question's message id and the input it came from: a question that does not
    fit the context is taken back (and put back in the input box), so it cannot block the chat.
    """
    rows = ctx.store.messages(owner, conv_id)
    history = chat_history(ctx, rows)
    system = settings["system"].strip() or mode_for(mode).system_prompt
    params = ctx.settings.clamp_params(settings["temperature"], settings["top_p"], settings["max_new_tokens"])
    request = ChatRequest(engine_messages(rows, system), params, session=conv_id)
    answer_id = ctx.store.add_message(owner, conv_id, role="assistant", text="", status="pending", mode=mode,
                                      settings=settings)
    write_lock = threading.Lock()
    finished = threading.Event()

    def on_finish(event) -> None:
        # Runs on the worker thread, even when this page is gone.
        with write_lock:
            finished.set()
            if isinstance(event, Done):
                status = "stopped" if event.finish_reason == "cancelled" else "complete"
                ctx.store.update_message(answer_id, text=event.text, status=status, usage=event.usage.as_dict())
            elif event.code == "context_length_exceeded":
                ctx.store.delete_message(owner, answer_id)
                if undo is not None:
                    ctx.store.delete_message(owner, undo[0])
            else:
                ctx.store.update_message(answer_id, text=event.text, status="error",
                                         usage={"error": event.message})

    try:
        handle = ctx.engine.submit(request, on_finish=on_finish)
    except EngineError as exc:
        ctx.store.update_message(answer_id, status="error", usage={"error": str(exc)})
        history.append({"role": "assistant", "content": answer_markdown("", "error", str(exc))})
        yield conv_id, history, clear_box, choices, str(exc), title
        return
    with ctx.lock:
        ctx.active[session] = handle
    history.append({"role": "assistant", "content": ""})
    yield conv_id, history, clear_box, choices, "Answering…", title
    text, saved_at = "", time.monotonic()
    try:
        for event in handle.events():
            if isinstance(event, Delta):
                text += event.text
                history[-1] = {"role": "assistant", "content": text}
                if time.monotonic() - saved_at > PROGRESS_SAVE_SECONDS:
                    with write_lock:  # crash safety: a kill -9 keeps what streamed so far
                        if not finished.is_set():
                            ctx.store.update_message(answer_id, text=text)
                    saved_at = time.monotonic()
                yield gr.skip(), history, gr.skip(), gr.skip(), gr.skip(), gr.skip()
            elif isinstance(event, Done):
                status = "stopped" if event.finish_reason == "cancelled" else "complete"
                history[-1] = {"role": "assistant", "content": answer_markdown(event.text, status)}
                note = {"stopped": "Stopped.", "complete": ""}[status]
                if event.finish_reason == "length":
                    note = "The answer reached the length limit (Settings → Max new tokens)."
                note = f"{event.notice} {note}".strip()
                yield gr.skip(), history, gr.skip(), gr.skip(), note, gr.skip()
            elif isinstance(event, Failed) and event.code == "context_length_exceeded":
                history = history[:-2] if undo is not None else history[:-1]
                box = undo[1] if undo is not None else gr.skip()
                yield gr.skip(), history, box, gr.skip(), f"⚠ {event.message}", gr.skip()
            elif isinstance(event, Failed):
                history[-1] = {"role": "assistant", "content": answer_markdown(event.text, "error", event.message)}
                yield gr.skip(), history, gr.skip(), gr.skip(), event.message, gr.skip()
    finally:
        # Reached on completion, on the stop button (cancels) and when the page goes away.
        if handle.result is None:
            handle.cancel()
        with ctx.lock:
            if ctx.active.get(session) is handle:
                del ctx.active[session]
