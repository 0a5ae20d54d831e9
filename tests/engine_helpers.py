"""Shared pieces of the engine tests: images, message builders, a transformers reference, a logits recorder."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from PIL import Image

from chat.engine.local import engine as engine_module
from chat.engine.local.prompt import split_visual, template_messages
from chat.engine.types import ChatRequest, GenParams
from chat.images import detail_pixels

RED = Image.new("RGB", (200, 120), (200, 10, 10))
FRACTAL = Image.effect_mandelbrot((96, 288), (-2, -1, 1, 1), 60).convert("RGB")
WIDE = Image.effect_mandelbrot((320, 96), (-2, -1, 1, 1), 30).convert("RGB")
IMAGES = {"red": RED, "fractal": FRACTAL, "wide": WIDE}


def user(text, *image_ids, detail=None):
    """A user message with images first, then text."""
    parts = [{"type": "image", "image_id": i, **({"detail": detail} if detail else {})} for i in image_ids]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def request(messages, owner="", **params) -> ChatRequest:
    """A greedy request unless told otherwise."""
    return ChatRequest(messages, GenParams(**{"temperature": 0.0, "max_new_tokens": 12, **params}), cache_salt=owner)


def run(eng, messages, **params):
    """Submit and collect every event."""
    owner = params.pop("owner", "")
    return list(eng.submit(request(messages, owner, **params)).events(timeout=120))


def reference_logits(loaded, messages, images=IMAGES):
    """Token ids and last-position logits of a full, uncached forward through transformers' own model class."""
    tmpl, ids = template_messages(messages)
    text = loaded.processor.apply_chat_template(tmpl, tokenize=False, add_generation_prompt=True)
    lo, hi = detail_pixels("auto")
    inputs = loaded.processor(text=[text], images=[images[split_visual(i)[0]] for i in ids] or None,
                              return_tensors="pt", size={"shortest_edge": lo, "longest_edge": hi})
    inputs = inputs.to(loaded.model.device)
    loaded.model.model.rope_deltas = None
    with torch.no_grad():
        out = loaded.model(**inputs)
    return inputs["input_ids"][0].tolist(), out.logits[0, -1]


@contextmanager
def recorded_logits():
    """Record, per request, the logits row each sampled token came from: {id(handle.request): [rows]}."""
    seen: dict[int, list[torch.Tensor]] = {}
    original = engine_module.sample
    holder = {}

    def recording(logits, params, generated, generators):
        for i, row in enumerate(logits):
            seen.setdefault(holder["ids"][i], []).append(row.detach().clone().cpu())
        return original(logits, params, generated, generators)

    step = engine_module.Engine._step

    def step_with_ids(self, metrics):
        plan_ids = []
        original_schedule = self.scheduler.schedule

        def schedule():
            plan = original_schedule()
            plan_ids.clear()
            plan_ids.extend(id(c.seq.request) for c in plan.chunks if c.samples)
            return plan

        self.scheduler.schedule = schedule
        holder["ids"] = plan_ids
        try:
            return step(self, metrics)
        finally:
            del self.scheduler.schedule

    engine_module.sample = recording
    engine_module.Engine._step = step_with_ids
    try:
        yield seen
    finally:
        engine_module.sample = original
        engine_module.Engine._step = step
