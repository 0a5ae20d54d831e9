"""After the GPU ran out of memory: the same request once more, with its images one detail level lower."""

from __future__ import annotations

from dataclasses import replace

from chat.engine.types import ChatRequest
from chat.images import lower_detail

LOWERED_NOTICE = "The GPU ran out of memory, so the images were read at lower detail."


def lower_detail_request(request: ChatRequest) -> ChatRequest | None:
    """The same request with every image one detail level lower; None if none can go lower."""
    changed = False
    messages = []
    for msg in request.messages:
        if isinstance(msg["content"], str):
            messages.append(msg)
            continue
        parts = []
        for part in msg["content"]:
            lower = lower_detail(part.get("detail") or "auto") if part["type"] == "image" else None
            if lower is not None:
                part, changed = {**part, "detail": lower}, True
            parts.append(part)
        messages.append({**msg, "content": parts})
    return replace(request, messages=messages) if changed else None


def lowered_sequence(engine, seq):
    """A fresh sequence for `seq`'s handle at lower detail (None if it cannot go lower or was tried)."""
    if seq.notice:  # already lowered once
        return None
    lowered = lower_detail_request(seq.request)
    if lowered is None:
        return None
    handle = seq.handle
    try:
        handle.request = lowered
        handle.prompt = engine.build_prompt(lowered.messages, lowered.images)
    except Exception:  # noqa: BLE001 - the out-of-memory message is what the person can act on
        return None
    retry = engine._sequence(handle)
    retry.notice = LOWERED_NOTICE
    return retry
