"""Content filters (issue 14): a `Moderator` checks what a person sends and what the model answers.

The engine wrapper in `chat/engine/filtered.py` asks a moderator about every request's text
(`check_input`) and, while an answer streams, about the answer so far (`check_output`). The
blocklist below is the first moderator; a moderation model can be plugged in later by writing
another class with the same two methods.

How the blocklist matches (`--blocklist FILE`, one word or phrase a line, `#` starts a comment):
- Text and entries are compared after compatibility normalization and case folding (NFKC/NFKD
  equivalence + `str.casefold`): "ＢＡＤ", "Bad" and "bad" are the same, so are a composed "é"
  and "e" + a combining accent, and ligatures such as "ﬁ" and "fi". Zero-width and other
  invisible format characters are ignored, and any run of white space counts as one space.
- In scripts written with spaces (Latin, Cyrillic, Greek, Hangul, ...) an entry matches whole
  words only: "ass" blocks "ass" and "Ass!" but not "class". An entry that starts or ends with
  a character of a script written without spaces (Chinese, Japanese kana, Thai, Lao, Khmer,
  Myanmar, Tibetan) matches anywhere at that end: "敏感词" is found inside "这是敏感词吗".
- Many entries are searched at once with an Aho-Corasick automaton (pyahocorasick), so a list
  of thousands of words costs about as much as one.

Streaming: `check_output(text, final, start)` says where the first match starts (`cut`: the
kept text ends there) and how much of the text is `safe` to send now. A match may still be
forming at the end of the text, so the tail that could be the start of an entry (at most the
longest entry's length) is held back until the next text shows it is not one.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

MAX_ENTRY_CHARS = 256  # a longer line is refused: the stream holds back up to an entry's length


class BlocklistError(ValueError):
    """The blocklist file cannot be used; the text says why (shown at start-up)."""


@dataclass(frozen=True)
class OutputCheck:
    """What a moderator says about an answer so far.

    cut: where the kept text ends (the first match starts there); None when nothing matched.
    safe: how many characters from the start may be sent now (no match can start before).
    reason: what matched, for the log (never shown to the person).
    """

    cut: int | None
    safe: int
    reason: str = ""


class Moderator(Protocol):
    """Checks text going into and coming out of the model; the blocklist is one, a moderation model can be another."""

    def check_input(self, text: str) -> str | None:
        """None when `text` may be sent to the model, else the reason (for the log)."""

    def check_output(self, text: str, final: bool = False, start: int = 0) -> OutputCheck:
        """The answer so far (`final`: it is complete); `text[:start]` was found safe before."""


# -- normalization --------------------------------------------------------------------------

_UNSPACED = (  # scripts written without spaces between words: entries match inside longer text there
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x0F00, 0x0FFF),  # Tibetan
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x2E80, 0x2FDF),  # CJK radicals
    (0x3005, 0x3007),  # 々 〆 〇
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x31F0, 0x31FF),  # Katakana extensions
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0x20000, 0x3FFFF),  # CJK extensions B and later
)


@lru_cache(maxsize=65536)
def fold(char: str) -> str:
    """One character as it is compared: case-folded, compatibility-decomposed; '' for invisible ones."""
    if char.isspace():
        return " "
    if unicodedata.category(char) == "Cf":  # zero-width space and joiner, soft hyphen, direction marks
        return ""
    return unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", char).casefold())


@lru_cache(maxsize=65536)
def is_word(char: str) -> bool:
    """A letter, digit or mark of a script written with spaces: a word goes on across it."""
    if char == "_" or unicodedata.category(char)[0] == "M":
        return True
    if not char.isalnum():
        return False
    code = ord(char)
    return not any(lo <= code <= hi for lo, hi in _UNSPACED)


def normalize(text: str, lo: int = 0) -> tuple[str, list[int]]:
    """`text[lo:]` as compared, and for each of its characters the index in `text` it came from."""
    out: list[str] = []
    owner: list[int] = []
    space = lo > 0 and text[lo - 1].isspace()
    for i in range(lo, len(text)):
        char = text[i]
        if char.isspace():
            if space:
                continue  # a run of white space is one space
            space = True
        else:
            space = False
        folded = fold(char)
        out.append(folded)
        owner.extend([i] * len(folded))
    return "".join(out), owner


def entry_key(line: str) -> str:
    """A blocklist line as it is compared (white space at the ends dropped, runs of it one space)."""
    key, _ = normalize(" ".join(line.split()))
    return key.strip()


# -- the blocklist --------------------------------------------------------------------------


def read_blocklist(path: str | Path) -> list[str]:
    """The entries of a blocklist file (blank lines and '#' comments left out); BlocklistError says what is wrong."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BlocklistError(f"the file {str(path)!r} does not exist.") from None
    except IsADirectoryError:
        raise BlocklistError(f"{str(path)!r} is a folder, not a file.") from None
    except OSError as exc:
        raise BlocklistError(f"the file {str(path)!r} cannot be read ({exc.strerror or exc}).") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise BlocklistError(f"{str(path)!r} is not UTF-8 text (line {line}); save it as UTF-8.") from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) > MAX_ENTRY_CHARS:
            raise BlocklistError(f"{str(path)!r} line {number} has {len(line)} characters; an entry may have at "
                                 f"most {MAX_ENTRY_CHARS}.")
        entries.append(line)
    return entries


class Blocklist:
    """Words and phrases that may appear neither in what people send nor in what the model answers."""

    def __init__(self, entries: list[str]) -> None:
        import ahocorasick

        self.automaton = ahocorasick.Automaton()
        self.longest = 0
        for line in entries:
            key = entry_key(line)
            if not key:
                continue
            # Word edges: where the entry starts or ends with a letter of a spaced script, the text must not
            # go on with another letter there.
            self.automaton.add_word(key, (len(key), is_word(key[0]), is_word(key[-1]), line))
            self.longest = max(self.longest, len(key))
        self.size = len(self.automaton)
        if self.size:
            self.automaton.make_automaton()

    @classmethod
    def from_file(cls, path: str | Path) -> Blocklist:
        """The blocklist of a file (see `read_blocklist`)."""
        return cls(read_blocklist(path))

    def _scan(self, text: str, final: bool, start: int) -> OutputCheck:
        if not self.size or start >= len(text):
            return OutputCheck(None, len(text))
        lo = max(0, start - 1)  # one character before: is a match's left edge the start of a word?
        norm, owner = normalize(text, lo)
        cut, reason = None, ""
        for end, (length, word_start, word_end, line) in self.automaton.iter(norm):
            first = end - length + 1
            if owner[first] < start or (cut is not None and owner[first] >= cut):
                continue
            if word_start and first > 0 and is_word(norm[first - 1]):
                continue
            if word_end and end + 1 < len(norm) and is_word(norm[end + 1]):
                continue
            if word_end and end + 1 == len(norm) and not final:
                continue  # the next text may go on with the word: decided later (held back below)
            cut, reason = owner[first], line
        if cut is not None:
            return OutputCheck(cut, cut, reason)
        if final:
            return OutputCheck(None, len(text))
        # Hold back the earliest tail that could still become a match.
        for j in range(max(0, len(norm) - self.longest), len(norm)):
            if owner[j] < start or (j > 0 and is_word(norm[j]) and is_word(norm[j - 1])):
                continue
            if self.automaton.match(norm[j:]):
                return OutputCheck(None, owner[j])
        return OutputCheck(None, len(text))

    def check_input(self, text: str) -> str | None:
        """The first entry found in `text`, or None."""
        found = self._scan(text, True, 0)
        return found.reason if found.cut is not None else None

    def check_output(self, text: str, final: bool = False, start: int = 0) -> OutputCheck:
        """Where the first match in the answer so far starts, and how much of it may be sent now."""
        return self._scan(text, final, start)


def load_moderator(blocklist: str) -> Moderator | None:
    """The moderator the settings ask for (None: no content filter)."""
    return Blocklist.from_file(blocklist) if blocklist else None
