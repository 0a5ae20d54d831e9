"""The messages half of `chat.store.Store` (a mixin): messages as a tree of versions, and search.

Versions (issue 13): every message has a parent (`parent_id`, None for the first), and a
conversation keeps the leaf of the path on screen (`conversations.leaf_id`). Editing a question
adds a sibling of it (same parent) with a fresh answer; Regenerate adds a sibling answer. Nothing
is overwritten, so earlier answers stay as versions. `messages()` returns only the selected path,
root to leaf, so everything that reads a conversation in order (the engine's prompt, the page)
sees one linear chat; each row says which version it is (`version` of `versions`).

`seq` still counts every message of a conversation in the order it was added (unique with the
conversation id): siblings are ordered by it, and "newest" means the highest seq.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from sqlite_utils.db import NotFoundError

from chat.store_base import ROLES, STATUSES, NotFound, decoded, dumps, valid_sha

MESSAGE_COLUMNS = "id, seq, parent_id, role, text, image_ids, image_names, status, mode, settings, usage, created"
LEAF = object()  # add_message's default parent: the conversation's current leaf (append to the path)
SEARCH_LIMIT = 100


def like_pattern(query: str) -> str:
    """`query` as a LIKE pattern matching it anywhere, its own % _ and \\ taken literally (ESCAPE '\\')."""
    escaped = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class MessagesMixin:
    """Messages, versions and search; mixed into `Store` (which supplies db, _lock, _conversation, _stamp)."""

    # -- helpers (caller holds the lock) --------------------------------------------------

    def _newest_child(self, conv_id: str, parent_id: int | None) -> int | None:
        row = self.db.execute(
            "SELECT id FROM messages WHERE conversation_id = ? AND parent_id IS ? ORDER BY seq DESC LIMIT 1",
            [conv_id, parent_id]).fetchone()
        return row[0] if row else None

    def _descend(self, conv_id: str, message_id: int | None) -> int | None:
        """The leaf reached from `message_id` by always taking the newest child (None: from the roots)."""
        current = message_id
        while (child := self._newest_child(conv_id, current)) is not None:
            current = child
        return current

    def _rows(self, conv_id: str) -> list[dict]:
        rows = self.db.execute_returning_dicts(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? ORDER BY seq", [conv_id])
        return [decoded(row, "image_ids", "image_names", "settings", "usage") for row in rows]

    def _leaf(self, conv_id: str) -> int | None:
        row = self.db.execute("SELECT leaf_id FROM conversations WHERE id = ?", [conv_id]).fetchone()
        return row[0] if row else None

    def _set_leaf(self, conv_id: str, leaf_id: int | None) -> None:
        self.db.execute("UPDATE conversations SET leaf_id = ? WHERE id = ?", [leaf_id, conv_id])

    # -- messages -------------------------------------------------------------------------

    def add_message(self, owner: str, conv_id: str, *, role: str, text: str,
                    image_ids: Sequence[str] = (), status: str = "complete",
                    mode: str | None = None, settings: dict | None = None,
                    usage: dict | None = None, image_names: Sequence[str] = (),
                    parent_id: int | None | object = LEAF) -> int:
        """Add a message to the owner's conversation and return its id; it becomes the path's leaf.

        `parent_id`: by default the current leaf (the message follows the path on screen); a message id
        of this conversation (a new version of that message's child), or None (a version of the first).
        `image_names`: the attached files' names.
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}")
        if not isinstance(text, str):
            raise TypeError("text must be a string")
        if isinstance(image_ids, str):  # a lone sha would be read as 64 one-letter ids
            raise TypeError("image_ids must be a sequence of sha256 strings")
        image_ids = [valid_sha(sha) for sha in image_ids]
        row = {"conversation_id": conv_id, "role": role, "text": text,
               "image_ids": json.dumps(image_ids), "status": status, "mode": mode,
               "image_names": json.dumps([str(n)[:255] for n in image_names][:len(image_ids)]),
               "settings": dumps(settings), "usage": dumps(usage)}
        with self._lock, self.db.atomic():
            self._conversation(owner, conv_id)
            for sha in set(image_ids):
                if not self.db.table("images").count_where("sha256 = ?", [sha]):
                    raise NotFound(f"image {sha}")
            if parent_id is LEAF:
                parent_id = self._leaf(conv_id)
            elif parent_id is not None and (type(parent_id) is not int or not self.db.execute(
                    "SELECT 1 FROM messages WHERE id = ? AND conversation_id = ?", [parent_id, conv_id]).fetchone()):
                raise NotFound(f"message {parent_id!r}")
            row["parent_id"] = parent_id
            # No retry loop needed: under the lock this read-then-insert has no rival
            # writer, and the unique (conversation_id, seq) index would catch one.
            row["seq"] = self.db.execute(
                "SELECT coalesce(max(seq), -1) + 1 FROM messages WHERE conversation_id = ?",
                [conv_id]).fetchone()[0]
            row["created"] = self._stamp()
            messages = self.db.table("messages").insert(row)
            message_id = int(messages.last_pk)
            self.db.execute("UPDATE conversations SET updated = ?, leaf_id = ? WHERE id = ?",
                            [row["created"], message_id, conv_id])
        return message_id

    def update_message(self, message_id: int, *, text: str | None = None,
                       status: str | None = None, usage: dict | None = None) -> None:
        """Server-side update of a message's text, status or usage (no owner check)."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}")
        if text is not None and not isinstance(text, str):
            raise TypeError("text must be a string")
        updates = {"text": text, "status": status, "usage": dumps(usage)}
        updates = {key: value for key, value in updates.items() if value is not None}
        with self._lock:
            try:
                self.db.table("messages").update(message_id, updates)
            except NotFoundError:
                raise NotFound(f"message {message_id!r}") from None

    def messages(self, owner: str, conv_id: str) -> list[dict]:
        """The conversation's selected path, first message to leaf; each row has `version` of `versions`."""
        with self._lock:
            self._conversation(owner, conv_id)
            rows = self._rows(conv_id)
            leaf = self._leaf(conv_id)
        by_id = {row["id"]: row for row in rows}
        siblings: dict[int | None, list[int]] = {}
        for row in rows:  # seq order, so each list is oldest first
            siblings.setdefault(row["parent_id"], []).append(row["id"])
        path = []
        current = by_id.get(leaf)
        while current is not None and len(path) <= len(rows):  # the bound: a tampered cycle ends
            path.append(current)
            current = by_id.get(current["parent_id"])
        path.reverse()
        for row in path:
            versions = siblings[row["parent_id"]]
            row["version"], row["versions"] = versions.index(row["id"]) + 1, len(versions)
        return path

    def message_tree(self, owner: str, conv_id: str) -> tuple[list[dict], int | None]:
        """Every message of the conversation (all versions) in the order added, and the selected leaf's id."""
        with self._lock:
            self._conversation(owner, conv_id)
            return self._rows(conv_id), self._leaf(conv_id)

    def switch_version(self, owner: str, conv_id: str, message_id: int, step: int) -> int:
        """Show the version `step` away from this message (-1 previous, +1 next); returns that version's id.

        The path then follows that version down its newest replies.
        """
        with self._lock, self.db.atomic():
            self._conversation(owner, conv_id)
            row = self.db.execute("SELECT parent_id FROM messages WHERE id = ? AND conversation_id = ?",
                                  [message_id if type(message_id) is int else None, conv_id]).fetchone()
            if row is None:
                raise NotFound(f"message {message_id!r}")
            ids = [r[0] for r in self.db.execute(
                "SELECT id FROM messages WHERE conversation_id = ? AND parent_id IS ? ORDER BY seq",
                [conv_id, row[0]]).fetchall()]
            chosen = ids[max(0, min(len(ids) - 1, ids.index(message_id) + step))]
            self._set_leaf(conv_id, self._descend(conv_id, chosen))
        return chosen

    def delete_message(self, owner: str, message_id: int) -> None:
        """Delete one of the owner's messages (its replies move up to its parent; the path stays whole)."""
        found = None
        if type(message_id) is int:
            with self._lock, self.db.atomic():
                # One query checks the owner and finds the row; the writes follow under the same lock.
                found = self.db.execute(
                    "SELECT conversation_id, parent_id FROM messages WHERE id = ? AND conversation_id IN"
                    " (SELECT id FROM conversations WHERE owner = ?)", [message_id, owner]).fetchone()
                if found is not None:
                    conv_id, parent_id = found
                    self.db.execute("UPDATE messages SET parent_id = ? WHERE parent_id = ? AND conversation_id = ?",
                                    [parent_id, message_id, conv_id])
                    self.db.execute("DELETE FROM messages WHERE id = ?", [message_id])
                    if self._leaf(conv_id) == message_id:
                        self._set_leaf(conv_id, self._descend(conv_id, parent_id))
        if found is None:
            raise NotFound(f"message {message_id!r}")

    def recover_interrupted(self) -> int:
        """Turn messages left "pending" by a dead server into "interrupted"; return how many."""
        with self._lock:
            return self.db.execute(
                "UPDATE messages SET status = 'interrupted' WHERE status = 'pending'").rowcount

    # -- search ---------------------------------------------------------------------------

    def search_conversations(self, owner: str, query: str, limit: int = SEARCH_LIMIT) -> list[dict]:
        """The owner's conversations whose title or any message (any version) contains `query`, newest first.

        Case-insensitive for ASCII letters (SQLite's LIKE); % and _ in the query are plain characters.
        """
        query = " ".join(str(query).split())
        if not query:
            return self.list_conversations(owner)
        pattern = like_pattern(query)
        with self._lock:
            return list(self.db.query(
                "SELECT id, title, mode, created, updated FROM conversations AS c WHERE owner = :owner AND ("
                "title LIKE :pattern ESCAPE '\\' OR EXISTS (SELECT 1 FROM messages AS m WHERE m.conversation_id = c.id"
                " AND m.text LIKE :pattern ESCAPE '\\')) ORDER BY updated DESC, created DESC, rowid DESC LIMIT :limit",
                {"owner": owner, "pattern": pattern, "limit": int(limit)}))

    # -- import ---------------------------------------------------------------------------

    def import_conversation(self, owner: str, *, title: str, mode: str, settings: dict,
                            messages: Sequence[dict], leaf: int | None) -> str:
        """A whole conversation at once (all or nothing): a new id, owned by `owner`.

        `messages` in order, each with role, text, image_ids (stored already), image_names, status, mode,
        settings, usage and `parent`: the index of an earlier message or None. `leaf`: the index shown.
        """
        # One transaction: a bad message rolls the conversation back with it.
        with self._lock, self.db.atomic():
            conv_id = self.create_conversation(owner, title=title, mode=mode, settings=settings)
            ids: list[int] = []
            for n, m in enumerate(messages):
                parent = m.get("parent")
                if parent is not None and not (type(parent) is int and 0 <= parent < n):
                    raise ValueError(f"message {n}: its parent must be an earlier message")
                ids.append(self.add_message(
                    owner, conv_id, role=m["role"], text=m["text"], image_ids=m.get("image_ids") or (),
                    status=m.get("status", "complete"), mode=m.get("mode"), settings=m.get("settings"),
                    usage=m.get("usage"), image_names=m.get("image_names") or (),
                    parent_id=None if parent is None else ids[parent]))
            if ids:
                self._set_leaf(conv_id, self._descend(conv_id, ids[leaf] if leaf is not None else None))
        return conv_id
