"""Token ids to streamed text: whole characters only, with stop strings cut before they are sent."""

from __future__ import annotations


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

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()) -> None:
        self.stream = TextStream(tokenizer)
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.emitted = 0

    @property
    def text(self) -> str:
        """The answer so far (cut at a stop string once one appeared)."""
        return self.stream.text

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token: (text to send now, whether a stop string ended the answer)."""
        self.stream.push(token)
        text = self.stream.text
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
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
