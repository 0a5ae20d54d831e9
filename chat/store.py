"""Persistence: conversations, messages and images in one SQLite file, via sqlite-utils.

Design:
- One process, one connection, one writer. Every database access holds one RLock,
  because the web handlers and the generation worker call in from different threads;
  multi-statement writes run in `db.atomic()`, so they commit or vanish together.
- Images are content-addressed: the id is the sha256 of the bytes and the file lives at
  `images/<sha[:2]>/<sha>.<ext>`, written once, atomically (temp file, fsync, rename).
  File paths are built only from a validated 64-hex sha and a fixed mime table.
- Ownership is enforced here, not by callers: a method that takes `owner` sees only that
  owner's rows, and another owner's id is indistinguishable from a missing one.
- Schema changes are ordered, named migrations (`m001_initial`, ...) recorded in
  `_migrations`, each in its own transaction; reopening a database applies only new ones.
- JSON columns (settings, usage, image_ids) are stored as JSON text and decoded on read.
- Messages are a tree of versions (edit, regenerate); `messages()` gives the selected path.
  They live in `chat.store_messages` (a mixin), the shared helpers in `chat.store_base`.

It knows nothing of the model, the engine or the web framework.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlite_utils
from sqlite_utils.db import NotFoundError

from chat.store_base import ROLES, STATUSES, NotFound, decoded, dumps, valid_sha
from chat.store_messages import MessagesMixin

__all__ = ["ROLES", "STATUSES", "NotFound", "Store", "migrate"]
TITLE_MAX = 120
IMAGE_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}

_BUSY_TIMEOUT_MS = 5000


Migration = Callable[[sqlite_utils.Database], None]
# Filled once at import time by @_migration, then only read: ordered and append-only.
# Never rename or reorder an entry (its name is its record); add a new one instead.
_MIGRATIONS: list[Migration] = []


def _migration(fn: Migration) -> Migration:
    _MIGRATIONS.append(fn)
    return fn


@_migration
def m001_initial(db: sqlite_utils.Database) -> None:
    """Create conversations, messages and images."""
    text_columns = ("id", "owner", "title", "mode", "settings", "created", "updated")
    conversations = db.table("conversations")
    conversations.create(dict.fromkeys(text_columns, str), pk="id",
                         not_null=set(text_columns) - {"id"})
    conversations.create_index(["owner"])
    # Hand SQL only because sqlite-utils has no public AUTOINCREMENT option: a message id
    # held by the worker must never name a different message later, and a plain INTEGER
    # PRIMARY KEY hands a deleted last row's id to the next insert.
    db.execute("""CREATE TABLE [messages] (
        [id] INTEGER PRIMARY KEY AUTOINCREMENT,
        [conversation_id] TEXT NOT NULL REFERENCES [conversations]([id]),
        [seq] INTEGER NOT NULL, [role] TEXT NOT NULL, [text] TEXT NOT NULL,
        [image_ids] TEXT NOT NULL, [status] TEXT NOT NULL, [mode] TEXT,
        [settings] TEXT, [usage] TEXT, [created] TEXT NOT NULL)""")
    messages = db.table("messages")
    messages.create_index(["conversation_id", "seq"], unique=True)
    messages.create_index(["status"])  # recover_interrupted at every start
    image_columns = {"sha256": str, "bytes": int, "width": int, "height": int,
                     "mime": str, "path": str, "created": str}
    db.table("images").create(image_columns, pk="sha256",
                              not_null=set(image_columns) - {"sha256"})


@_migration
def m002_image_names(db: sqlite_utils.Database) -> None:
    """The file name each attached image had (a JSON list beside image_ids; null before this)."""
    db.table("messages").add_column("image_names", str)


@_migration
def m003_versions(db: sqlite_utils.Database) -> None:
    """Messages form a tree of versions (issue 13): each has a parent, each conversation a selected leaf.

    Existing conversations become one path: each message's parent is the one before it (by seq), and
    the leaf is the last one.
    """
    db.table("messages").add_column("parent_id", int)
    db.table("conversations").add_column("leaf_id", int)
    db.execute("""UPDATE messages SET parent_id = (SELECT m.id FROM messages AS m
        WHERE m.conversation_id = messages.conversation_id AND m.seq < messages.seq ORDER BY m.seq DESC LIMIT 1)""")
    db.execute("""UPDATE conversations SET leaf_id = (SELECT m.id FROM messages AS m
        WHERE m.conversation_id = conversations.id ORDER BY m.seq DESC LIMIT 1)""")
    db.table("messages").create_index(["conversation_id", "parent_id"])


def migrate(db: sqlite_utils.Database) -> list[str]:
    """Apply the migrations not yet recorded in `_migrations`, in order; return their names."""
    records = db.table("_migrations")
    records.create({"name": str, "applied_at": str}, pk="name", if_not_exists=True)
    done = {row["name"] for row in records.rows}
    applied = []
    for fn in _MIGRATIONS:
        if fn.__name__ not in done:
            # The change and its record commit together: a crash leaves it pending.
            with db.atomic():
                fn(db)
                records.insert({"name": fn.__name__, "applied_at": _utcnow()})
            applied.append(fn.__name__)
    return applied


def _utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _clean_title(title: str) -> str:
    cleaned = " ".join(str(title).split())[:TITLE_MAX].rstrip()
    if not cleaned:
        raise ValueError("title must not be empty")
    return cleaned


def _atomic_write(path: Path, data: bytes) -> None:
    # Temp file in the same directory so os.replace is a rename within one filesystem:
    # a reader sees no file or the whole file, never a torn one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename durable before the row commits
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class Store(MessagesMixin):
    """Conversations, messages and content-addressed images under one data directory.

    Messages, their versions and search are in `chat.store_messages.MessagesMixin`.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.images_dir = self.data_dir / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._last_stamp = datetime.min.replace(tzinfo=UTC)
        conn = sqlite3.connect(self.data_dir / "vlchat.db", check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        with self._lock:
            # WAL: readers (backups, the sqlite3 CLI) never block our writer, and with
            # synchronous=NORMAL a crash can lose only the last commits, never corrupt.
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS:d}")
            migrate(self.db)

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self.db.close()

    def _stamp(self) -> str:
        # Strictly increasing within this Store (caller holds the lock), so two bumps in
        # one clock tick still list newest-first deterministically.
        now = max(datetime.now(UTC), self._last_stamp + timedelta(microseconds=1))
        self._last_stamp = now
        return now.isoformat(timespec="microseconds")

    # Images ------------------------------------------------------------------------

    def _image_file(self, sha: str, mime: str) -> Path:
        return self.images_dir / sha[:2] / f"{sha}.{IMAGE_EXTENSIONS[mime]}"

    def put_image(self, data: bytes, *, mime: str, width: int, height: int) -> str:
        """Store image bytes once under their sha256 and return the sha."""
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise ValueError("image data must be non-empty bytes")
        if mime not in IMAGE_EXTENSIONS:
            raise ValueError(f"unsupported image type {mime!r}")
        if not all(type(v) is int and v > 0 for v in (width, height)):
            raise ValueError("width and height must be positive integers")
        sha = hashlib.sha256(data).hexdigest()
        path = self._image_file(sha, mime)
        # The lock covers the file write too: images are written rarely, and it keeps
        # "row exists => file exists" true without a second protocol.
        with self._lock:
            if self.db.table("images").count_where("sha256 = ?", [sha]):
                return sha
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                _atomic_write(path, bytes(data))
            self.db.table("images").insert(
                {"sha256": sha, "bytes": len(data), "width": width, "height": height,
                 "mime": mime, "path": path.relative_to(self.data_dir).as_posix(),
                 "created": _utcnow()},
                ignore=True)
        return sha

    def has_image(self, sha: str) -> bool:
        """True when an image with this sha is stored."""
        try:
            self.image_row(sha)
        except NotFound:
            return False
        return True

    def image_row(self, sha: str) -> dict:
        """The images row for a sha: sha256, bytes, width, height, mime, path, created."""
        with self._lock:
            try:
                return self.db.table("images").get(valid_sha(sha))
            except NotFoundError:
                raise NotFound(f"image {sha}") from None

    def image_path(self, sha: str) -> Path:
        """Absolute path of a stored image file."""
        # Rebuilt from the validated sha and the fixed mime table; the stored `path`
        # column is for people reading the database, never trusted as a file name.
        return self._image_file(sha, self.image_row(sha)["mime"])

    def image_bytes(self, sha: str) -> bytes:
        """The stored bytes of an image."""
        try:
            return self.image_path(sha).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"image file {sha}") from None

    def delete_unused_images(self, shas: Sequence[str]) -> list[str]:
        """Delete images (row, then file) that no message references; the shas deleted."""
        deleted = []
        with self._lock:
            for sha in sorted(set(shas)):
                try:
                    mime = self.image_row(sha)["mime"]
                except NotFound:
                    continue
                used = self.db.execute(
                    "SELECT 1 FROM messages, json_each(messages.image_ids) WHERE json_each.value = ? LIMIT 1",
                    [sha]).fetchone()
                if used:
                    continue
                # Row first: "row exists => file exists" stays true if the unlink fails.
                self.db.execute("DELETE FROM images WHERE sha256 = ?", [sha])
                self._image_file(sha, mime).unlink(missing_ok=True)
                deleted.append(sha)
        return deleted

    # Conversations -----------------------------------------------------------------

    def _conversation(self, owner: str, conv_id: str) -> dict:
        # One query answers both "exists" and "is yours", so they look alike outside.
        row = None
        if isinstance(conv_id, str) and isinstance(owner, str):
            row = next(self.db.query("SELECT * FROM conversations WHERE id = ? AND owner = ?",
                                     [conv_id, owner]), None)
        if row is None:
            raise NotFound(f"conversation {conv_id!r}")
        return row

    def create_conversation(self, owner: str, *, title: str = "New chat",
                            mode: str = "general", settings: dict | None = None) -> str:
        """Create a conversation for `owner` and return its id."""
        if not isinstance(owner, str) or not owner:
            raise ValueError("owner must be a non-empty string")
        if not isinstance(mode, str) or not mode:
            raise ValueError("mode must be a non-empty string")
        conv_id = uuid.uuid4().hex
        row = {"id": conv_id, "owner": owner, "title": _clean_title(title), "mode": mode,
               "settings": dumps(settings or {})}
        with self._lock:
            row["created"] = row["updated"] = self._stamp()
            self.db.table("conversations").insert(row)
        return conv_id

    def list_conversations(self, owner: str) -> list[dict]:
        """The owner's conversations, most recently active first."""
        with self._lock:
            return list(self.db.table("conversations").rows_where(
                "owner = ?", [owner], select="id, title, mode, created, updated",
                order_by="updated DESC, created DESC, rowid DESC"))

    def get_conversation(self, owner: str, conv_id: str) -> dict:
        """One conversation: id, title, mode, settings, created, updated."""
        with self._lock:
            row = self._conversation(owner, conv_id)
        del row["owner"], row["leaf_id"]
        return decoded(row, "settings")

    def rename_conversation(self, owner: str, conv_id: str, title: str) -> None:
        """Set a conversation's title (whitespace collapsed, at most 120 characters)."""
        title = _clean_title(title)
        with self._lock:
            self._conversation(owner, conv_id)
            self.db.table("conversations").update(conv_id, {"title": title})

    def update_conversation(self, owner: str, conv_id: str, *, mode: str | None = None,
                            settings: dict | None = None) -> None:
        """Change a conversation's mode and/or replace its settings wholesale."""
        if mode is not None and (not isinstance(mode, str) or not mode):
            raise ValueError("mode must be a non-empty string")
        updates = {"mode": mode, "settings": dumps(settings)}
        updates = {key: value for key, value in updates.items() if value is not None}
        with self._lock:
            self._conversation(owner, conv_id)
            if updates:
                self.db.table("conversations").update(conv_id, updates)

    def delete_conversation(self, owner: str, conv_id: str) -> None:
        """Delete a conversation and its messages; images stay (shared by content)."""
        with self._lock, self.db.atomic():
            self._conversation(owner, conv_id)
            self.db.execute("DELETE FROM messages WHERE conversation_id = ?", [conv_id])
            self.db.execute("DELETE FROM conversations WHERE id = ?", [conv_id])

    def applied_migrations(self) -> list[str]:
        """Names of the applied migrations, in the order they were applied."""
        with self._lock:
            rows = self.db.query("SELECT name FROM _migrations ORDER BY applied_at, rowid")
            return [row["name"] for row in rows]
