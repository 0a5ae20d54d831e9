"""Token ids to streamed text: whole characters only, with stop strings cut before they are sent.

Qwen's tokenizer is byte-level BPE: every token stands for a fixed byte string. `token_bytes`
reads that table once from the tokenizer, and `ByteStream` then turns each new token into text
with an incremental UTF-8 decoder: a few microseconds a token, which matters when a step samples
64 tokens at once. A tokenizer that is not byte-level falls back to `TextStream`, which asks
the tokenizer to decode a small window of ids per token.
"""

from __future__ import annotations

import codecs


def _byte_chars() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table), as char -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes(tokenizer) -> list[bytes | None] | None:
    """The bytes each token id stands for (None: a special token, never shown), or None if not byte-level."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.decoder).__name__ != "ByteLevel":
        return None
    byte_of = _byte_chars()
    vocab = tokenizer.get_vocab()
    added = tokenizer.added_tokens_decoder
    table: list[bytes | None] = [b""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        if i in added:
            table[i] = None if added[i].special else added[i].content.encode()
            continue
        try:
            table[i] = bytes(byte_of[c] for c in token)
        except KeyError:
            return None
    return table


class ByteStream:
    """Incremental detokenizer for byte-level tokenizers: bytes in, whole characters out."""

    def __init__(self, table: list[bytes | None]) -> None:
        self.table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add a token; the new text it completes ('' while a character is still partial)."""
        piece = self.table[token_id] if 0 <= token_id < len(self.table) else b""
        if not piece:
            return ""
        delta = self._utf8.decode(piece)
        self.text += delta
        return delta


class TextStream:
    """Incremental detokenizer: emits only whole characters, never a split multi-byte sequence."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context
        self.read = 0  # end of what has been emitted
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add a token; return the new text it completes ('' while a character is still partial)."""
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
            self.text += delta
            return delta
        return ""


class OutputText:
    """An answer's text as it grows: what may be sent now, holding back what could begin a stop string."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = (), table: list[bytes | None] | None = None) -> None:
        self.stream = ByteStream(table) if table is not None else TextStream(tokenizer)
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.emitted = 0

    @property
    def text(self) -> str:
        """The answer so far (cut at a stop string once one appeared)."""
        return self.stream.text

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token: (text to send now, whether a stop string ended the answer)."""
        delta = self.stream.push(token)
        text = self.stream.text
        start = max(0, len(text) - len(delta) - self.hold)  # a stop string can only end in the new text
        cut = min((i for i in (text.find(s, start) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stream.text = text[:cut]
            return self.flush(), True
        if len(text) - self.hold > self.emitted:
            delta = text[self.emitted : len(text) - self.hold]
            self.emitted = len(text) - self.hold
            return delta, False
        return "", False

    def flush(self) -> str:
        """Whatever is left to send (at the end of the answer)."""
        delta = self.stream.text[self.emitted :]
        self.emitted = len(self.stream.text)
        return delta
