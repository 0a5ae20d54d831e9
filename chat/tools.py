"""Qwen's tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks in the answer.

Qwen3-VL's chat template puts the offered tools in the system prompt and asks the model to answer a
call as such a block. When tools were offered (and `tool_choice` is not "none"), the API turns each
well-formed block into an OpenAI `tool_calls` entry and the rest of the text into `content`; a block
that is not valid JSON, or one cut short by max_tokens, stays in the text as it was written.

`ToolCallStream` does the same for a stream: text is passed on at once, except what could be the
start of a `<tool_call>` tag (held back until it is clear), and a block is passed on whole once
its closing tag has arrived.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class Call:
    """One parsed call: the function's name and its arguments as a JSON string (OpenAI's shape)."""

    id: str
    name: str
    arguments: str

    def as_tool_call(self, index: int | None = None) -> dict:
        """As a `tool_calls` entry (with `index` in a stream's delta)."""
        entry = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return entry if index is None else {"index": index, **entry}


def new_call_id() -> str:
    """An id for a call, like OpenAI's."""
    return "call_" + uuid.uuid4().hex[:24]


def read_call(body: str) -> Call | None:
    """The inside of one block as a Call, or None when it is not a JSON object with a name."""
    try:
        data = json.loads(body.strip())
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return None
    args = data.get("arguments", data.get("parameters", {}))
    if isinstance(args, str):
        arguments = args
    else:
        arguments = json.dumps(args if args is not None else {}, ensure_ascii=False)
    return Call(new_call_id(), data["name"], arguments)


def split_calls(text: str) -> tuple[str, list[Call]]:
    """(the text outside well-formed blocks, the calls in order)."""
    out, calls, pos = [], [], 0
    while True:
        start = text.find(OPEN, pos)
        if start < 0:
            break
        end = text.find(CLOSE, start + len(OPEN))
        if end < 0:
            break
        call = read_call(text[start + len(OPEN):end])
        if call is None:
            out.append(text[pos:end + len(CLOSE)])
        else:
            out.append(text[pos:start])
            calls.append(call)
        pos = end + len(CLOSE)
    out.append(text[pos:])
    return "".join(out), calls


def content_and_calls(text: str) -> tuple[str | None, list[Call]]:
    """What an answer's `message` holds: content (None when only calls remain) and the calls."""
    rest, calls = split_calls(text)
    if calls and not rest.strip():
        return None, calls
    return (rest.strip() if calls else rest), calls


def _partial_open(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of '<tool_call>'."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0


class ToolCallStream:
    """Feeds deltas of an answer; yields ("text", str) and ("call", Call) pieces as soon as they are certain."""

    def __init__(self) -> None:
        self.pending = ""  # text not yet passed on
        self.in_block = False
        self.calls = 0

    def feed(self, delta: str) -> list[tuple[str, object]]:
        """The pieces this delta completes."""
        self.pending += delta
        out: list[tuple[str, object]] = []
        while True:
            if not self.in_block:
                start = self.pending.find(OPEN)
                if start < 0:
                    cut = len(self.pending) - _partial_open(self.pending)
                    text, self.pending = self.pending[:cut], self.pending[cut:]
                    if text:
                        out.append(("text", text))
                    return out
                if start:
                    out.append(("text", self.pending[:start]))
                self.pending = self.pending[start:]
                self.in_block = True
            end = self.pending.find(CLOSE)
            if end < 0:
                return out
            block = self.pending[:end + len(CLOSE)]
            self.pending = self.pending[end + len(CLOSE):]
            self.in_block = False
            call = read_call(block[len(OPEN):-len(CLOSE)])
            if call is None:
                out.append(("text", block))
            else:
                self.calls += 1
                out.append(("call", call))

    def finish(self) -> list[tuple[str, object]]:
        """What is left at the end (an unclosed block is text)."""
        rest, self.pending, self.in_block = self.pending, "", False
        return [("text", rest)] if rest else []
