"""Export a conversation (Markdown with its images as a ZIP, or JSON) and import the JSON back (issue 13).

Export: the owner's conversation only (chat.store checks the owner). The files are written under
Gradio's upload folder in a fresh directory named by 128 random bits; Gradio serves a copy from its
cache under a content hash (delete_cache clears it) and the originals go at a later export. Nobody
can name another owner's file. The ZIP holds `conversation.md` (the path on screen, as Markdown) and
`images/<sha256>.<ext>`; the JSON holds every version, with the
images inline (base64).

Import never trusts the file: it must be at most IMPORT_MAX_BYTES, nest at most MAX_DEPTH deep
(checked before parsing), carry only the keys an export has, and stay within the page's limits
(messages, text length, images per message and per conversation). Each image goes through
chat.images.sanitize exactly as an upload does (decoded, checked, re-encoded without metadata;
PNGs come back byte for byte, JPEGs are re-encoded). Ids and owners in the file are never used: the
conversation gets a new id, owned by whoever imports it. It is all or nothing: a refusal is a
Notice and stores nothing.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import shutil
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import gradio as gr

from chat import ui
from chat.conversation import DEFAULT_MODE, MODES, md_escape, mode_for
from chat.i18n_text import say  # issue 13: status lines in the page's language
from chat.images import ImageError, check_size, sanitize
from chat.notices import Notice
from chat.render import chat_history
from chat.store import IMAGE_EXTENSIONS, NotFound
from chat.store_base import ROLES, SHA_RE, STATUSES
from chat.stream import switch_view
from chat.uploads import upload_root

FORMAT = "vlchat.conversation"
FORMAT_VERSION = 1
IMPORT_MAX_BYTES = 16_000_000
EXPORT_KEEP_SECONDS = 600  # Gradio copies a returned file into its cache at once; the original can go after
MAX_DEPTH = 8
MAX_MESSAGES = 2_000
MAX_SETTING_KEYS = 32
_TOP_KEYS = {"format", "version", "id", "title", "mode", "settings", "exported", "current", "messages", "images"}
_MESSAGE_KEYS = {"id", "parent", "role", "text", "status", "mode", "settings", "usage", "created", "image_ids",
                 "image_names"}
_IMAGE_KEYS = {"sha256", "mime", "data"}
_STRINGS = re.compile(r'"(?:[^"\\]+|\\.)*"', re.S)
_BRACKETS = re.compile(r"[^\[\]{}]+")


# -- export -----------------------------------------------------------------------------------


def conversation_dict(store, owner: str, conv_id: str) -> dict:
    """The whole conversation (every version) as the JSON export's dict; NotFound for another owner's."""
    conv = store.get_conversation(owner, conv_id)
    rows, leaf = store.message_tree(owner, conv_id)
    index = {row["id"]: n for n, row in enumerate(rows)}
    images: dict[str, dict] = {}
    messages = []
    for n, row in enumerate(rows):
        for sha in row["image_ids"]:
            if sha not in images:
                images[sha] = {"sha256": sha, "mime": store.image_row(sha)["mime"],
                               "data": base64.b64encode(store.image_bytes(sha)).decode("ascii")}
        messages.append({"id": n, "parent": index.get(row["parent_id"]), "role": row["role"], "text": row["text"],
                         "status": row["status"], "mode": row["mode"], "settings": row["settings"],
                         "usage": row["usage"], "created": row["created"], "image_ids": row["image_ids"],
                         "image_names": row["image_names"] or []})
    return {"format": FORMAT, "version": FORMAT_VERSION, "title": conv["title"], "mode": conv["mode"],
            "settings": conv["settings"], "exported": datetime.now(UTC).isoformat(timespec="seconds"),
            "current": index.get(leaf), "messages": messages, "images": list(images.values())}


def markdown(store, owner: str, conv_id: str) -> tuple[str, dict[str, bytes]]:
    """The conversation on screen as Markdown, and the image files it links ({zip path: bytes})."""
    conv = store.get_conversation(owner, conv_id)
    rows = store.messages(owner, conv_id)
    files: dict[str, bytes] = {}
    lines = [f"# {conv['title']}", "", f"Exported from vlchat on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. "
             f"Mode: {mode_for(conv['mode']).label}.", ""]
    for row in rows:
        if row["role"] == "system":
            continue
        lines += ["## You" if row["role"] == "user" else "## Assistant", ""]
        if row.get("versions", 1) > 1:
            lines += [f"*Version {row['version']} of {row['versions']}*", ""]
        names = row["image_names"] or []
        for n, sha in enumerate(row["image_ids"]):
            path = f"images/{sha}.{IMAGE_EXTENSIONS[store.image_row(sha)['mime']]}"
            files[path] = store.image_bytes(sha)
            alt = (names[n] if n < len(names) else f"image {n + 1}").replace("]", "").replace("[", "")
            lines += [f"![{alt}]({path})", ""]
        lines += [row["text"], ""]
        if row["status"] not in ("complete",):
            lines += [f"*({row['status']})*", ""]
    return "\n".join(lines).rstrip() + "\n", files


def _slug(title: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", title).strip("-")[:60] or "conversation"


def _export_dir() -> Path:
    """A new private folder for one export; earlier ones (Gradio served copies of them long ago) go."""
    root = upload_root() / "vlchat-exports"
    cutoff = time.time() - EXPORT_KEEP_SECONDS
    for old in root.glob("*") if root.is_dir() else ():
        try:
            if old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    folder = root / secrets.token_hex(16)
    folder.mkdir(parents=True, mode=0o700)
    return folder


def export(ctx: ui.Ctx, conv_id: str | None, request: gr.Request) -> tuple:
    """"Export": the ZIP (Markdown + images) and the JSON, offered as two download buttons."""
    if not conv_id:
        raise Notice("Open or start a conversation first; then it can be exported.")
    owner = ui.owner_of(request)
    try:
        data = conversation_dict(ctx.store, owner, conv_id)
        text, files = markdown(ctx.store, owner, conv_id)
    except NotFound:
        raise Notice("That conversation no longer exists.") from None
    folder, name = _export_dir(), _slug(data["title"])
    json_path = folder / f"{name}.json"
    json_path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    zip_path = folder / f"{name}.zip"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("conversation.md", text)
        for path, blob in files.items():
            z.writestr(path, blob)
    return (gr.update(value=str(zip_path), visible=True), gr.update(value=str(json_path), visible=True),
            say("Ready: download the Markdown (ZIP, with images) or the JSON (every version; it can be imported)."))


# -- import -----------------------------------------------------------------------------------


def _refuse(why: str) -> Notice:
    return Notice(f"This file cannot be imported: {why} Nothing was imported.")


def nesting_depth(text: str, stop: int = MAX_DEPTH) -> int:
    """How deep [ and { nest in JSON text (strings skipped), without parsing it; counting ends past `stop`."""
    depth = deepest = 0
    for ch in _BRACKETS.sub("", _STRINGS.sub("", text)):
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > stop:
                break
        else:
            depth -= 1
    return deepest


def _no_constant(name: str):
    raise ValueError(name)


def parse(raw: bytes) -> dict:
    """The file's JSON object after the size and depth checks."""
    if len(raw) > IMPORT_MAX_BYTES:
        raise _refuse(f"it is {len(raw) / 1e6:.1f} MB; the limit is {IMPORT_MAX_BYTES / 1e6:g} MB.")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _refuse("it is not UTF-8 text (a vlchat JSON export is).") from None
    if nesting_depth(text) > MAX_DEPTH:
        raise _refuse(f"it nests deeper than {MAX_DEPTH} levels; a vlchat export does not.")
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise _refuse("it is not valid JSON.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _refuse("it is not a vlchat conversation export (its \"format\" is not \"vlchat.conversation\").")
    if data.get("version") != FORMAT_VERSION:
        raise _refuse(f"its format version is {data.get('version')!r}; this server reads version {FORMAT_VERSION}.")
    return data


def _keys(obj, allowed: set[str], what: str) -> dict:
    if not isinstance(obj, dict):
        raise _refuse(f"{what} is not an object.")
    extra = sorted(set(obj) - allowed)
    if extra:
        raise _refuse(f"{what} has fields an export does not have ({', '.join(map(str, extra))[:200]}).")
    return obj


def _string(value, what: str, limit: int, default: str | None = None) -> str:
    if value is None and default is not None:
        return default
    if not isinstance(value, str):
        raise _refuse(f"{what} is not text.")
    if len(value) > limit:
        raise _refuse(f"{what} is {len(value):,} characters; the limit is {limit:,}.")
    return value


def _flat(value, what: str, limit: int) -> dict | None:
    """Settings/usage: a flat object of short scalars (or null)."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_SETTING_KEYS:
        raise _refuse(f"{what} is not a small object.")
    for key, item in value.items():
        if not (item is None or isinstance(item, (bool, int, float)) or (isinstance(item, str) and len(item) <= limit)):
            raise _refuse(f"{what}: {str(key)[:40]!r} is not a plain value.")
    return value


def _images(data: dict, settings) -> dict[str, object]:
    """old sha -> CleanImage, each through the sanitizer as an upload."""
    entries = data.get("images") or []
    if not isinstance(entries, list):
        raise _refuse("\"images\" is not a list.")
    if len(entries) > settings.max_images_per_conversation:
        raise _refuse(f"it holds {len(entries)} images; a conversation may hold "
                      f"{settings.max_images_per_conversation}.")
    out = {}
    for n, entry in enumerate(entries, 1):
        entry = _keys(entry, _IMAGE_KEYS, f"image {n}")
        sha, payload = entry.get("sha256"), entry.get("data")
        if not isinstance(sha, str) or not SHA_RE.fullmatch(sha) or not isinstance(payload, str):
            raise _refuse(f"image {n} has no valid sha256 or data.")
        try:
            check_size(len(payload) * 3 // 4, settings.max_image_bytes)
            raw = base64.b64decode(payload, validate=True)
            out[sha] = sanitize(raw, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
        except binascii.Error:
            raise _refuse(f"image {n} is not valid base64.") from None
        except ImageError as exc:
            raise _refuse(f"image {n}: {exc}") from None
    return out


def checked(data: dict, settings, max_chars: int) -> dict:
    """The import's title, mode, settings and messages, every field checked; images sanitized."""
    data = _keys(data, _TOP_KEYS, "the file")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _refuse("it has no messages.")
    if len(messages) > MAX_MESSAGES:
        raise _refuse(f"it has {len(messages):,} messages; the limit is {MAX_MESSAGES:,}.")
    title = _string(data.get("title"), "the title", 1000, "Imported chat").strip() or "Imported chat"
    mode = data.get("mode") if data.get("mode") in MODES else DEFAULT_MODE
    current = data.get("current")
    if current is not None and not (type(current) is int and 0 <= current < len(messages)):
        raise _refuse("\"current\" does not name one of its messages.")
    images = _images(data, settings)
    out, used = [], set()
    for n, m in enumerate(messages):
        what = f"message {n + 1}"
        m = _keys(m, _MESSAGE_KEYS, what)
        parent = m.get("parent")
        if parent is not None and not (type(parent) is int and 0 <= parent < n):
            raise _refuse(f"{what}'s parent is not an earlier message.")
        if m.get("role") not in ROLES:
            raise _refuse(f"{what} has no valid role.")
        ids, names = m.get("image_ids") or [], m.get("image_names") or []
        if not isinstance(ids, list) or not isinstance(names, list):
            raise _refuse(f"{what}'s images are not lists.")
        if len(ids) > settings.max_images_per_message:
            raise _refuse(f"{what} carries {len(ids)} images; a message may carry {settings.max_images_per_message}.")
        if any(sha not in images for sha in ids):
            raise _refuse(f"{what} names an image the file does not hold.")
        used.update(ids)
        status = m.get("status") if m.get("status") in STATUSES else "complete"
        out.append({"parent": parent, "role": m["role"], "text": _string(m.get("text"), f"{what}'s text", max_chars),
                    "status": "interrupted" if status == "pending" else status,
                    "mode": m.get("mode") if m.get("mode") in MODES else None,
                    "settings": _flat(m.get("settings"), f"{what}'s settings", max_chars),
                    "usage": _flat(m.get("usage"), f"{what}'s usage", max_chars),
                    "image_ids": [images[sha] for sha in ids],
                    "image_names": [_string(x, f"{what}'s file name", 255) for x in names][:len(ids)]})
    return {"title": title, "mode": mode, "settings": _flat(data.get("settings"), "the settings", max_chars) or {},
            "current": current, "messages": out, "images": [images[sha] for sha in sorted(used)]}


def import_file(ctx: ui.Ctx, path: str | Path, owner: str) -> str:
    """Check everything, then store the images and the conversation at once; returns the new id."""
    try:
        with open(path, "rb") as f:
            raw = f.read(IMPORT_MAX_BYTES + 1)
    except OSError:
        raise Notice("The file could not be read; choose it again.") from None
    plan = checked(parse(raw), ctx.settings, max(ui.max_message_chars(ctx), 100_000))
    stored = [ctx.store.put_image(i.data, mime=i.mime, width=i.width, height=i.height) for i in plan["images"]]
    for m in plan["messages"]:
        m["image_ids"] = [clean.sha256 for clean in m["image_ids"]]
    try:
        return ctx.store.import_conversation(owner, title=plan["title"], mode=plan["mode"],
                                             settings=plan["settings"], messages=plan["messages"],
                                             leaf=plan["current"])
    except (ValueError, TypeError, NotFound):
        ctx.store.delete_unused_images(stored)
        raise _refuse("its messages do not fit together.") from None


def import_conversation(ctx: ui.Ctx, upload, request: gr.Request) -> tuple:
    """"Import a conversation (.json)": the new conversation opened; (conv_id, chat, title, mode, list, status)."""
    owner = ui.owner_of(request)
    path = upload if isinstance(upload, (str, Path)) else getattr(upload, "name", None)
    if not path:
        raise Notice("Choose a vlchat JSON export to import.")
    try:
        conv_id = import_file(ctx, path, owner)
    finally:
        Path(path).unlink(missing_ok=True)  # the uploaded copy is not kept
    switch_view(ctx, request.session_hash)
    conv = ctx.store.get_conversation(owner, conv_id)
    rows = ctx.store.messages(owner, conv_id)
    return (conv_id, chat_history(ctx.store, rows), conv["title"], conv["mode"],
            gr.update(choices=ui.conversation_choices(ctx, owner), value=conv_id),
            say("Imported “{title}” ({n} messages shown).", title=md_escape(conv["title"]), n=len(rows)))


def hide_downloads() -> tuple:
    """Another conversation on screen: the previous one's download buttons go."""
    return gr.update(visible=False), gr.update(visible=False)
