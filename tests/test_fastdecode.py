"""The fast decode path (static KV buffer, own decode step, on-device sampling), checked on the CPU.

On a GPU the same step is captured as CUDA graphs; the math checked here is what gets captured.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from chat.engine.fastdecode import FastDecoder, buckets
from chat.engine.prompt import split_visual, template_messages
from chat.engine.runner import Runner
from chat.engine.types import ChatRequest, Done, GenParams
from chat.engine.worker import Engine
from chat.images import detail_pixels

IMAGES = {"photo": Image.effect_mandelbrot((240, 160), (-2, -1, 1, 1), 50).convert("RGB")}


def user(text, *ids):
    return {"role": "user", "content": [*({"type": "image", "image_id": i} for i in ids),
                                        {"type": "text", "text": text}]}


@pytest.fixture
def engines(loaded):
    plain = Engine(Runner(loaded.model, loaded.processor), IMAGES.__getitem__, fast_decode=False, max_context=4096)
    fast = Engine(Runner(loaded.model, loaded.processor), IMAGES.__getitem__, fast_decode=True, max_context=4096)
    for e in (plain, fast):
        e.start(warmup=True)
        assert e.ready.wait(60)
    yield plain, fast
    for e in (plain, fast):
        e.shutdown()


def run(engine, messages, **params):
    handle = engine.submit(ChatRequest(messages, GenParams(**{"temperature": 0.0, "max_new_tokens": 40, **params}),
                                       session="s"))
    return handle.wait(60)


def test_buckets_cover_the_buffer_in_small_steps():
    b = buckets(32768)
    assert b[0] == 256 and b[-1] == 32768 and b == sorted(set(b))
    ratios = [y / x for x, y in zip(b, b[1:], strict=False)]
    assert max(ratios) <= 2 and all(r <= 1.5 for x, r in zip(b, ratios, strict=False) if x >= 2048)
    assert all(x % 256 == 0 for x in b)


def test_fast_greedy_equals_transformers_generate(engines, loaded):
    _, fast = engines
    # On the CPU the same math runs uncaptured; on a GPU it is the captured graphs that are checked.
    assert fast.fast is not None and fast.fast.use_graphs == (loaded.device.type == "cuda")
    messages = [user("Describe this picture.", "photo")]
    done = run(fast, messages, max_new_tokens=24)
    tmpl, vids = template_messages(messages)
    text = loaded.processor.apply_chat_template(tmpl, tokenize=False, add_generation_prompt=True)
    lo, hi = detail_pixels("auto")
    inputs = loaded.processor(text=[text], images=[IMAGES[split_visual(v)[0]] for v in vids], return_tensors="pt",
                              size={"shortest_edge": lo, "longest_edge": hi}).to(loaded.model.device)
    loaded.model.model.rope_deltas = None
    out = loaded.model.generate(**inputs, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    expected = loaded.processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert done.text == expected


def test_fast_and_plain_paths_agree_over_turns(engines):
    plain, fast = engines
    messages = [user("Describe this picture.", "photo")]
    for follow_up in ("More.", "And the colours?"):
        a, b = run(plain, messages), run(fast, messages)
        assert a.text == b.text and a.usage == b.usage
        messages = messages + [{"role": "assistant", "content": a.text}, user(follow_up)]
    # The fast path wrote its tokens' KV back: turn 3 reuses the whole of turn 2 on both.
    assert b.usage.cached_tokens == a.usage.cached_tokens > 0


def test_fast_sampling_respects_temperature_and_top_p(loaded):
    dec = FastDecoder(loaded.model, max_len=512, use_graphs=False)
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0], device=dec.device)
    dec.temperature.fill_(0.0)
    assert int(dec._sample(logits)) == 1  # greedy
    dec.temperature.fill_(1.0)
    dec.top_p.fill_(0.5)  # only the top token's mass is needed to reach 0.5
    assert {int(dec._sample(logits)) for _ in range(50)} == {1}
    dec.top_p.fill_(1.0)
    dec.temperature.fill_(100.0)  # nearly uniform: every token shows up
    assert {int(dec._sample(logits)) for _ in range(400)} == {0, 1, 2, 3}


def test_decode_past_the_buffer_is_refused(loaded):
    dec = FastDecoder(loaded.model, max_len=256, use_graphs=False)
    with pytest.raises(ValueError, match="past the decode buffer"):
        dec.step(65, 300, 300, 0.0, 1.0)


def test_fast_engine_stops_and_finishes_like_plain(engines):
    _, fast = engines
    handle = fast.submit(ChatRequest([user("Go on forever.")], GenParams(temperature=0.0, max_new_tokens=3000)))
    next(handle.events(timeout=60))  # the first text arrived
    handle.cancel()
    done = handle.wait(30)
    assert isinstance(done, Done) and done.finish_reason == "cancelled" and done.usage.completion_tokens < 10
    assert isinstance(run(fast, [user("hi")]), Done)
