"""LoRA adapter names as the settings give them (torch-free: the settings check them before any model loads)."""

from __future__ import annotations

import re

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


class LoraError(ValueError):
    """An adapter that cannot be served; the text says which and why."""


def parse_specs(text: str) -> dict[str, str]:
    """'name=path,name2=path2' -> {name: path}; names are what `model` asks for."""
    specs: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, path = part.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise LoraError(f"'{part}' is not NAME=PATH (a PEFT adapter folder or hub id)")
        if not NAME.match(name):
            raise LoraError(f"adapter name '{name}' may hold only letters, digits and . _ : - (at most 64)")
        if name in specs:
            raise LoraError(f"adapter name '{name}' is given twice")
        specs[name] = path
    return specs
