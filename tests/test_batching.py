"""Continuous batching on the tiny model: batched equals alone, chunked prefill, cancel, preemption, reuse."""

from __future__ import annotations

import time

import pytest
import torch

from chat.engine.local.engine import Engine
from chat.engine.local.kv import BlockPool, chain_hashes
from chat.engine.local.prompt import common_prefix
from chat.engine.local.runner import Runner
from chat.engine.types import Delta, Done, GenParams
from tests.engine_helpers import IMAGES, recorded_logits, request, run, user

LONG_HISTORY = [user("Describe the picture.", "red"), {"role": "assistant", "content": "A red rectangle, wide."},
                user("Is it darker at the edges?"), {"role": "assistant", "content": "No, it is flat red."},
                user("Then write me three lines about red.")]
MIXES = {
    "text": [user("Hello there.")],
    "long-text": [{"role": "system", "content": "Answer as a careful assistant. " * 12}, user("Why is the sky blue?")],
    "one-image": [user("What is this?", "red")],
    "two-sizes": [user("Compare these two.", "fractal", "wide")],
    "history": LONG_HISTORY,
    "short": [user("Hi")],
    "wide": [user("Read it.", "wide")],
}
LATE = [user("A late question about this one.", "fractal")]


def make(loaded, **kw) -> Engine:
    eng = Engine(Runner(loaded.model, loaded.processor), IMAGES.__getitem__, max_waiting=32, **kw)
    eng.start(warmup=False)
    return eng


@pytest.fixture
def engine(loaded):
    eng = make(loaded, max_batch_tokens=64)
    yield eng
    eng.shutdown()


def alone(eng, cases: dict, max_new_tokens=16) -> tuple[dict, dict]:
    """Each case by itself (its own owner, nothing cached): final texts and recorded logits by case."""
    texts, logits = {}, {}
    for name, messages in cases.items():
        eng.pool.clear_cache()
        req = request(messages, owner=f"solo-{name}", max_new_tokens=max_new_tokens)
        with recorded_logits() as seen:
            done = eng.submit(req).wait(120)
        assert isinstance(done, Done)
        texts[name], logits[name] = done.text, seen[id(req)]
    eng.pool.clear_cache()
    return texts, logits


def test_eight_requests_together_give_what_each_gives_alone(engine):
    cases = {**MIXES, "late": LATE}
    solo_texts, solo_logits = alone(engine, cases)
    reqs = {name: request(m, owner=f"batch-{name}", max_new_tokens=16) for name, m in MIXES.items()}
    with recorded_logits() as seen:
        handles = {name: engine.submit(r) for name, r in reqs.items()}
        first = handles["text"]
        deadline = time.monotonic() + 60
        while not first._emitted and time.monotonic() < deadline:  # the 8th arrives while others decode
            time.sleep(0.005)
        reqs["late"] = request(LATE, owner="batch-late", max_new_tokens=16)
        handles["late"] = engine.submit(reqs["late"])
        results = {name: h.wait(120) for name, h in handles.items()}
    assert engine.metrics.batch_tokens._sum.get() > 0
    for name, done in results.items():
        assert isinstance(done, Done), (name, done)
        assert done.text == solo_texts[name], name
        rows = seen[id(reqs[name])]
        assert len(rows) == len(solo_logits[name])
        for step, (batched, lone) in enumerate(zip(rows, solo_logits[name], strict=True)):
            assert (batched - lone).abs().max().item() < 1e-4, (name, step)
    assert engine.pool.used == 0  # everything went back; only named blocks stay cached


def test_a_long_prefill_is_chunked_while_others_keep_decoding(engine):
    plans = []
    schedule = engine.scheduler.schedule

    def recording():
        plan = schedule()
        plans.append([(id(c.seq.request), c.length) for c in plan.chunks])
        return plan

    engine.scheduler.schedule = recording
    try:
        talker = request([user("Keep talking.")], owner="a", max_new_tokens=60)
        h1 = engine.submit(talker)
        while not h1._emitted:
            time.sleep(0.005)
        big = request(LONG_HISTORY + [{"role": "assistant", "content": "ok"}, user("And this?", "fractal")],
                      owner="b", max_new_tokens=4)
        h2 = engine.submit(big)
        h2.wait(120), h1.wait(120)
    finally:
        del engine.scheduler.schedule
    prefill_steps = [p for p in plans if any(rid == id(big) and n > 1 for rid, n in p)]
    assert len(prefill_steps) >= 3  # the big prompt took several steps (64-token budget)
    for plan in prefill_steps:
        assert sum(n for _, n in plan) <= 64
        if h1.result.usage.completion_tokens == 60:  # the talker was still decoding: it got its token
            assert (id(talker), 1) in plan


def test_cancelling_one_leaves_the_others_unchanged_and_frees_its_blocks(engine):
    cases = {"one-image": MIXES["one-image"], "history": LONG_HISTORY}
    solo, _ = alone(engine, cases, max_new_tokens=30)
    victim = engine.submit(request([user("Talk for a long time.", "wide")], owner="v", max_new_tokens=400))
    others = {n: engine.submit(request(m, owner=f"o-{n}", max_new_tokens=30)) for n, m in cases.items()}
    for event in victim.events(timeout=60):
        if isinstance(event, Delta):
            victim.cancel()
    assert victim.result.finish_reason == "cancelled"
    for name, handle in others.items():
        assert handle.wait(120).text == solo[name]
    assert engine.pool.used == 0


def test_more_requests_than_the_pool_holds_all_complete_through_preemption(loaded):
    eng = make(loaded, max_batch_tokens=64, max_context=256, kv_cache_bytes=1)  # the smallest pool: 17 blocks
    try:
        assert eng.pool.total * eng.pool.block_size < 300
        cases = {f"q{i}": [user(f"Question number {i}: tell me about the colour red, please.")] for i in range(6)}
        solo, _ = alone(eng, cases, max_new_tokens=40)
        handles = {n: eng.submit(request(m, owner=f"p{n}", max_new_tokens=40)) for n, m in cases.items()}
        for name, handle in handles.items():
            done = handle.wait(180)
            assert isinstance(done, Done) and done.text == solo[name], name
        assert eng.metrics.preemptions._value.get() > 0
        assert eng.pool.used == 0
    finally:
        eng.shutdown()


def test_turn_two_reuses_its_own_blocks_and_never_another_owners(engine):
    finished = {}
    finish = Engine._finish

    def keep(self, seq, outcome):
        finished[id(seq.request)] = list(seq.prompt.keys) + seq.generated[:-1]
        return finish(self, seq, outcome)

    Engine._finish = keep
    try:
        turn1 = request([user("Describe the picture in detail.", "red")], owner="alice", max_new_tokens=20)
        done1 = engine.submit(turn1).wait(60)
        messages = turn1.messages + [{"role": "assistant", "content": done1.text}, user("And the colour?")]
        done2 = engine.submit(request(messages, owner="alice", max_new_tokens=4)).wait(60)
        other = engine.submit(request(messages, owner="mallory", max_new_tokens=4)).wait(60)
    finally:
        Engine._finish = finish
    keys2 = engine.build_prompt(messages).keys
    shared = min(common_prefix(finished[id(turn1)], keys2), len(keys2) - 1)
    bs = engine.pool.block_size
    assert done2.usage.cached_tokens == shared // bs * bs > 0
    assert done2.usage.images_encoded == 0
    assert other.usage.cached_tokens == 0  # the same text from another owner reuses nothing


def test_turn_two_runs_only_its_new_tokens(engine):
    fed = []
    forward = engine.step_runner.forward

    def counting(batch):
        fed.append(batch.ids.shape[0])
        return forward(batch)

    first = [user("What is in this picture?", "fractal")]
    done1 = run(engine, first, owner="x", max_new_tokens=32)[-1]
    messages = first + [{"role": "assistant", "content": done1.text}, user("Say more.")]
    engine.step_runner.forward = counting
    encoded = engine.metrics.images_encoded._value.get()
    try:
        done2 = run(engine, messages, owner="x", max_new_tokens=8)[-1]
    finally:
        engine.step_runner.forward = forward
    u = done2.usage
    # Everything the model ran in turn 2: the uncached prompt tail, then one token per further answer token.
    assert sum(fed) == (u.prompt_tokens - u.cached_tokens) + (u.completion_tokens - 1)
    assert engine.metrics.images_encoded._value.get() == encoded  # no image work at all


def test_one_owner_cannot_take_every_slot(loaded):
    eng = make(loaded, max_batch_tokens=512, max_running_per_owner=2)
    plans = []
    schedule = eng.scheduler.schedule

    def recording():
        plan = schedule()
        plans.append([c.seq.owner for c in plan.chunks])
        return plan

    eng.scheduler.schedule = recording
    try:
        greedy = [eng.submit(request([user(f"flood {i}")], owner="api:flood", max_new_tokens=12)) for i in range(5)]
        polite = eng.submit(request([user("my turn")], owner="api:polite", max_new_tokens=3))
        assert isinstance(polite.wait(60), Done)
        assert all(isinstance(h.wait(120), Done) for h in greedy)
    finally:
        eng.shutdown()
    assert max(p.count("api:flood") for p in plans) == 2
    first_polite = next(i for i, p in enumerate(plans) if "api:polite" in p)
    assert first_polite <= 2  # admitted at once, not behind the flood


def test_sampling_in_a_batch_depends_only_on_the_request(engine):
    seeded = [user("Tell me something random.")]
    lone = run(engine, seeded, owner="s", temperature=1.0, seed=42, max_new_tokens=20)[-1].text
    noise = [engine.submit(request([user(f"noise {i}")], owner=f"n{i}", temperature=1.3, max_new_tokens=20))
             for i in range(3)]
    together = run(engine, seeded, owner="s2", temperature=1.0, seed=42, max_new_tokens=20)[-1].text
    for h in noise:
        h.wait(60)
    assert together == lone
    greedy = run(engine, seeded, owner="g", max_new_tokens=10)[-1].text
    top1 = run(engine, seeded, owner="g2", temperature=1.0, top_p=1.0, top_k=1, max_new_tokens=10)[-1].text
    assert top1 == greedy


def test_presence_penalty_changes_what_repeats():
    from chat.engine.local.sampling import sample

    with torch.inference_mode():  # as the engine's forward hands them over
        logits = torch.tensor([[5.0, 4.9, 0.0]])
    plain = GenParams(temperature=0.0)
    assert sample(logits.clone(), [plain], [[0]], [None]) == [0]
    penalized = GenParams(temperature=0.0, presence_penalty=1.0)
    assert sample(logits.clone(), [penalized], [[0]], [None]) == [1]
    assert sample(logits.clone(), [penalized], [[]], [None]) == [0]  # nothing generated yet: nothing to penalize


def test_block_pool_reference_counts_names_and_evicts_least_recently_used():
    pool = BlockPool(6, 4)  # 5 usable
    a = pool.allocate(2)
    names = chain_hashes("o", list(range(8)), 4)
    for block, name in zip(a, names, strict=True):
        pool.name(block, name)
    pool.release(a)
    assert pool.used == 0 and pool.cached == 2
    again = pool.match(names)
    assert again == a and pool.used == 2  # found again by name
    pool.release(again)
    assert pool.match(chain_hashes("other", list(range(8)), 4)) == []  # another owner finds nothing
    b = pool.allocate(4)  # 3 free + 1 evicted (the chain's last block goes first)
    assert b is not None and pool.match(names) == [a[0]]
    assert pool.allocate(1) is None  # everything is referenced now
    pool.release(b + [a[0]])
    assert pool.available == pool.total


def test_while_answers_stream_a_step_encodes_at_most_one_new_image(loaded):
    engine = make(loaded, max_batch_tokens=1024)  # room for both images in one chunk
    solo, _ = alone(engine, {"pair": MIXES["two-sizes"]})
    engine.vision.cache.clear()
    per_step, current = [], {"encodes": 0, "decoding": False}
    encode, step = engine.runner.encode, engine._step

    def counting_encode(images, detail):
        current["encodes"] += len(images)
        return encode(images, detail)

    def recording_step(metrics):
        current.update(encodes=0, decoding=any(s.generated for s in engine.scheduler.running))
        step(metrics)
        per_step.append(dict(current))

    engine.runner.encode, engine._step = counting_encode, recording_step
    try:
        talkers = [engine.submit(request([user(f"Talk {i}.")], owner=f"t{i}", max_new_tokens=80)) for i in range(2)]
        while not all(t._emitted for t in talkers):
            time.sleep(0.005)
        pair = engine.submit(request(MIXES["two-sizes"], owner="pair", max_new_tokens=16))
        assert pair.wait(120).text == solo["pair"]  # cut before its second image, then continued: same answer
    finally:
        engine.runner.encode, engine._step = encode, step
        for t in talkers:
            t.wait(120)
        engine.shutdown()
    assert sum(s["encodes"] for s in per_step) == 2
    assert all(s["encodes"] <= 1 for s in per_step if s["decoding"])
