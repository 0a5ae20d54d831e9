"""What chat/store.py and chat/store_messages.py share: the error, the allowed values, JSON and sha helpers."""

from __future__ import annotations

import json
import re

STATUSES = ("pending", "complete", "stopped", "error", "interrupted", "filtered")  # filtered: content filter
ROLES = ("system", "user", "assistant")
SHA_RE = re.compile(r"[0-9a-f]{64}")


class NotFound(Exception):
    """A conversation/message does not exist or belongs to another owner."""


def valid_sha(sha: object) -> str:
    """The sha itself when it is 64 lowercase hex digits, else NotFound."""
    # fullmatch on a str: "../x", uppercase, or a trailing newline all fail here, so
    # nothing but 64 lowercase hex digits ever reaches a file path.
    if not isinstance(sha, str) or not SHA_RE.fullmatch(sha):
        raise NotFound(f"image {sha!r}")
    return sha


def dumps(value: dict | None) -> str | None:
    """A dict as JSON text (None stays None)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError(f"expected a dict, got {type(value).__name__}")
    return json.dumps(value, ensure_ascii=False)


def decoded(row: dict, *columns: str) -> dict:
    """The row with its JSON columns decoded in place."""
    for column in columns:
        if row[column] is not None:
            row[column] = json.loads(row[column])
    return row
