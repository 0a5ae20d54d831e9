"""After the GPU ran out of memory: the same request once more, with its images one detail level lower."""

from __future__ import annotations

from dataclasses import replace

from chat.engine.types import ChatRequest
from chat.images import lower_detail

LOWERED_NOTICE = "The GPU ran out of memory, so the images were read at lower detail."
OUT_OF_MEMORY = "The GPU ran out of memory for this request. Try fewer images, lower detail or a shorter conversation."


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


def after_out_of_memory(engine, plan) -> None:
    """Free what can be freed; the step's prefilling requests retry once at lower image detail, others fail."""
    import torch

    from chat.engine.types import Failed, GenerationFailed

    engine.vision.cache.clear()
    engine.pool.clear_cache()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    for chunk in plan.chunks:
        seq = chunk.seq
        retry = None if seq.generated else lowered_sequence(engine, seq)
        engine.scheduler.finish(seq)
        if retry is None:
            engine._finish(seq, Failed(OUT_OF_MEMORY, GenerationFailed.code, seq.output.text))
        else:
            engine.scheduler.waiting.appendleft(retry)
