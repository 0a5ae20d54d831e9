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
        parts.append(f"(?P<{name}>.+?)" if name not in names else f"(?P={name})")
        names.append(name)
        at = m.end()
    parts.append(re.escape(template[at:]))
    return re.compile("".join(parts) + r"\Z", re.S)


_PATTERNS: dict[str, list[tuple[re.Pattern, str]]] = {
    lang: [(_pattern(en), text) for en, text in table.items() if _FIELD.search(en)]
    for lang, table in CATALOG.items()
}


def translate(message: str, lang: str | None = None) -> str:
    """A finished English sentence (or several, each from the catalog) in the page's language.

    Values in it (numbers, names) are carried over as they are. Unknown text stays English.
    """
    lang = lang or current()
    table = CATALOG.get(lang)
    if not table or not message:
        return message
    if message in table:
        return table[message]
    for pattern, text in _PATTERNS[lang]:
        m = pattern.match(message)
        if m:
            return _FIELD.sub(lambda f, m=m: m.group(f.group(1)), text)
    # Sentences joined by the caller ("<loading line> The model is not ready yet, ..."): each on its own.
    head, sep, tail = message.partition(". ")
    if sep and tail:
        first, rest = translate(head + ".", lang), translate(tail, lang)
        if first != head + "." or rest != tail:
            return f"{first}{'' if lang.startswith('zh') else ' '}{rest}"
    return message
