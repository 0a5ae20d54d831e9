"""Sentences the server writes on the page (status lines, notices, notes), in the page's language (issue 13).

The English sentence is the key, gettext style: `say("Answering…")` and
`say("{n} conversations match.", n=3)` give the sentence in the language of the page being served, which
`chat.page.bind` sets for each handler call from the request (`chat.i18n.lang_of`: the person's choice,
else the browser's). A notice raised anywhere as `Notice(f"...")` is translated where it is shown
(`translate`), by matching the finished English sentence against the catalog's templates, so the modules
that raise them stay as they are. A sentence missing from the catalog stays English.

The catalog itself is in chat/i18n_catalog.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from chat.i18n_catalog import CATALOG

DEFAULT = "en"
_LANG: ContextVar[str] = ContextVar("vlchat_page_lang", default=DEFAULT)
_FIELD = re.compile(r"\{(\w+)(?::[^}]*)?\}")
# Fields that may hold any text; the others are numbers.
_FREE = ("name", "title", "why", "error", "what", "listed", "fields", "key", "found", "labels")
# Fields that hold a sentence or a phrase of the server's own ("This file cannot be imported: {why} ..."; "{what} is
# not text.", what = "message 3's text"): translated in turn when the catalog knows them.
_NESTED = ("why", "what")


def current() -> str:
    """The language of the page this handler call serves ("en" outside one)."""
    return _LANG.get()


@contextmanager
def speaking(lang: str | None) -> Iterator[None]:
    """Within: `say` and `translate` use `lang`."""
    token = _LANG.set(lang or DEFAULT)
    try:
        yield
    finally:
        _LANG.reset(token)


def in_language(lang: str | None, gen):
    """Drive the generator `gen` with `lang` set around each of its steps.

    Gradio runs each step of a handler's generator in a worker thread of its own choosing, so a language
    set once at the start would not be there at the next step.
    """
    try:
        while True:
            with speaking(lang):
                try:
                    out = next(gen)
                except StopIteration:
                    return
            yield out
    finally:
        gen.close()


def say(english: str, lang: str | None = None, **values) -> str:
    """`english` (a str.format template) in the page's language, with `values` filled in."""
    table = CATALOG.get(lang or current(), {})
    text = table.get(english, english)
    return text.format(**values) if values else text


def _pattern(template: str) -> re.Pattern:
    parts, names, at = [], [], 0
    for m in _FIELD.finditer(template):
        parts.append(re.escape(template[at:m.start()]))
        name = m.group(1)
        value = r".+?" if name in _FREE else r"\S+?"  # numbers have no spaces; names and reasons may
        parts.append(f"(?P<{name}>{value})" if name not in names else f"(?P={name})")
        names.append(name)
        at = m.end()
    parts.append(re.escape(template[at:]))
    return re.compile("".join(parts) + r"\Z", re.S)


_PATTERNS: dict[str, list[tuple[re.Pattern, str]]] = {
    lang: [(_pattern(en), text) for en, text in table.items() if _FIELD.search(en)]
    for lang, table in CATALOG.items()
}


def _one(message: str, lang: str) -> str | None:
    """`message` as one catalog entry in `lang`, or None."""
    table = CATALOG[lang]
    if message in table:
        return table[message]
    for pattern, text in _PATTERNS[lang]:
        m = pattern.match(message)
        if m:
            return _FIELD.sub(lambda f, m=m: _value(m, f.group(1), lang), text)
    return None


def _value(m: re.Match, name: str, lang: str) -> str:
    """A field's value as matched, or (a nested field) its own translation where the catalog has one."""
    value = m.group(name)
    if name in _NESTED:
        found = _one(value, lang)
        return value if found is None else found
    return value


_SENTENCE_END = re.compile(r"(?<=[.…!?])\s+")


def translate(message: str, lang: str | None = None) -> str:
    """A finished English message in the page's language: as one entry, else sentence by sentence.

    Values in it (numbers, names) are carried over as they are. What the catalog does not know stays English.
    """
    lang = lang or current()
    if lang not in CATALOG or not message:
        return message
    whole = _one(message, lang)
    if whole is not None:
        return whole
    # Sentences joined by the caller ("<loading line> The model is not ready yet, ..."): the longest runs of
    # them that the catalog knows, left to right.
    sentences = _SENTENCE_END.split(message)
    out, at = [], 0
    while at < len(sentences):
        for end in range(len(sentences), at, -1):
            found = _one(" ".join(sentences[at:end]), lang)
            if found is not None:
                out.append(found)
                at = end
                break
        else:
            out.append(sentences[at])
            at += 1
    return ("" if lang.startswith("zh") else " ").join(out)


def page_lang(args: tuple, kwargs: dict) -> str:
    """The page's language for a handler call, from the gr.Request among its arguments ("en" without one)."""
    import gradio as gr

    from chat.i18n import lang_of

    request = kwargs.get("request")
    if request is None:
        request = next((a for a in args if isinstance(a, gr.Request)), None)
    return lang_of(request) if request is not None else DEFAULT
