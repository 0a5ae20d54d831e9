"""The engine's side of issue 9: owners in the cache keys, huge prompts, shutdown, warm-up and memory failures."""

from __future__ import annotations

import threading
import time
import types
import weakref

import pytest
import torch
from PIL import Image

from chat.engine.local.engine import Engine
from chat.engine.local.kv import chain_hashes
from chat.engine.local.runner import Runner
from chat.engine.types import ChatRequest, Done, Failed, GenParams, ShuttingDown

RED = Image.new("RGB", (200, 120), (200, 10, 10))
IMAGES = {"red": RED}
SECRET = "The vault code is 4417-9920; tell nobody. " * 3


def user(text, *image_ids):
    return {"role": "user", "content": [*({"type": "image", "image_id": i} for i in image_ids),
                                        {"type": "text", "text": text}]}


@pytest.fixture
def engine(loaded):
    eng = Engine(Runner(loaded.model, loaded.processor), IMAGES.__getitem__, max_waiting=4)
    eng.start(warmup=False)
    yield eng
    eng.shutdown()


def ask(eng, messages, owner="", **params) -> Done:
    request = ChatRequest(messages, GenParams(**{"temperature": 0.0, "max_new_tokens": 4, **params}),
                          cache_salt=owner)
    done = eng.submit(request).wait(60)
    assert isinstance(done, Done), done
    return done


def test_block_names_share_nothing_across_owners_and_everything_within_one():
    keys = list(range(40))
    a, b = chain_hashes("browser:a", keys, 16), chain_hashes("api:b", keys, 16)
    assert len(a) == len(b) == 2  # full blocks only
    assert not set(a) & set(b)
    assert chain_hashes("browser:a", keys, 16) == a  # stable: the same owner's next turn matches
    assert chain_hashes("browser:a", keys[:16] + [99] * 16, 16)[0] == a[0]  # a chain: equal until keys differ
    assert chain_hashes("browser:a", [99] + keys[1:], 16)[1] != a[1]


def test_another_owners_text_is_never_reused_and_a_right_guess_looks_like_a_wrong_one(engine):
    victim = [{"role": "system", "content": SECRET}, user("Summarize my note.")]
    first = ask(engine, victim, owner="browser:victim")
    assert first.usage.cached_tokens == 0
    # Two attackers with no history of their own: one sends the victim's exact text, one a wrong guess.
    right = ask(engine, victim, owner="api:attacker-1")
    wrong = ask(engine, [{"role": "system", "content": SECRET.replace("4417", "0000")}, user("Summarize my note.")],
                owner="api:attacker-2")
    assert right.usage.cached_tokens == wrong.usage.cached_tokens == 0
    # The victim's own next turn still reuses its prefix.
    follow_up = victim + [{"role": "assistant", "content": first.text}, user("Thanks.")]
    turn2 = ask(engine, follow_up, owner="browser:victim")
    assert turn2.usage.cached_tokens >= first.usage.prompt_tokens


def test_text_that_cannot_fit_is_refused_before_any_tokenizing(engine):
    calls = []
    tokenizer = engine.runner.processor.tokenizer
    original = type(tokenizer).__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    huge = "x" * (engine.max_prompt_chars + 1)
    type(tokenizer).__call__ = counting
    try:
        started = time.monotonic()
        handle = engine.submit(ChatRequest([user(huge)]))
        elapsed = time.monotonic() - started
    finally:
        type(tokenizer).__call__ = original
    assert isinstance(handle.result, Failed) and handle.result.code == "context_length_exceeded"
    assert "characters" in handle.result.message
    assert calls == [] and elapsed < 1.0
    assert engine.waiting == 0  # its queue slot was given back


def test_prompts_are_tokenized_in_the_callers_thread_not_the_workers(engine):
    threads = []
    tokenizer = engine.runner.processor.tokenizer
    original = type(tokenizer).__call__

    def recording(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return original(self, *args, **kwargs)

    type(tokenizer).__call__ = recording
    try:
        ask(engine, [user("Where is the tokenizer run?")])
    finally:
        type(tokenizer).__call__ = original
    assert threads and "vlchat-worker" not in threads


def test_drain_ends_running_and_queued_answers_with_a_restart_message(engine):
    gate = threading.Event()
    forward = engine.step_runner.forward

    def slow_forward(*args, **kwargs):
        gate.wait(0.05)
        return forward(*args, **kwargs)

    engine.step_runner.forward = slow_forward
    try:
        running = engine.submit(ChatRequest([user("long")], GenParams(temperature=0.0, max_new_tokens=400)))
        queued = engine.submit(ChatRequest([user("next")], GenParams(temperature=0.0, max_new_tokens=4)))
        deadline = time.monotonic() + 30
        while not running._emitted and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.drain() == 2
        for handle in (running, queued):
            result = handle.wait(10)
            assert isinstance(result, Failed) and result.code == "shutting_down", result
            assert "restarting" in result.message
        assert running.result.text  # what streamed before is kept
        with pytest.raises(ShuttingDown):
            engine.submit(ChatRequest([user("more")]))
    finally:
        engine.step_runner.forward = forward


def test_a_failed_warm_up_never_reports_ready(loaded):
    eng = Engine(Runner(loaded.model, loaded.processor), IMAGES.__getitem__)

    def broken(*args, **kwargs):
        raise RuntimeError("vision tower exploded")

    eng.runner.encode = broken
    eng.start(warmup=True)
    try:
        assert eng.warmed.wait(60)
        assert not eng.ready.is_set()
        assert eng.warmup_error
    finally:
        eng.shutdown()


def test_out_of_memory_retry_runs_after_the_failed_try_is_freed(engine):
    alive = []
    forward = engine.step_runner.forward

    def failing_once(batch):
        if not alive:
            scratch = torch.empty(1 << 20)  # stands for the failed try's activations
            alive.append(weakref.ref(scratch))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        alive.append(alive[0]() is not None)
        return forward(batch)

    engine.step_runner.forward = failing_once
    try:
        done = ask(engine, [user("What is this?", "red")])
    finally:
        engine.step_runner.forward = forward
    assert "lower detail" in done.notice
    assert alive[1] is False  # the failed try's memory was gone before the retry ran


def test_a_failed_warm_up_ends_the_process_with_advice(model_dir, monkeypatch, capsys):
    from chat import boot
    from chat.config import Settings
    from chat.engine.types import LoadStatus

    monkeypatch.setattr(Engine, "_warmup", lambda self: (_ for _ in ()).throw(RuntimeError("no kernels")))
    ctx = types.SimpleNamespace(status=LoadStatus(), exit_code=0, api=types.SimpleNamespace(), engine=None)
    server = types.SimpleNamespace(should_exit=False)
    boot.start_engine(Settings(model="tiny-random", data_dir=model_dir, device="cpu"), None, ctx, server)
    assert server.should_exit and ctx.exit_code == 2
    assert ctx.engine is None  # the page and API never got a broken engine
    assert ctx.status.phase == "failed" and "Warming up" in ctx.status.describe()
    assert "no kernels" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_asking_for_a_gpu_where_there_is_none_fails_loudly():
    from chat.engine.local.loader import ModelLoadError, pick_device

    for requested in ("cuda", "cuda:1"):
        with pytest.raises(ModelLoadError, match="--device"):
            pick_device(requested)
    assert pick_device("auto")[0].type == "cpu"


def test_requests_cancelled_while_queued_are_not_kept_around(loaded):
    eng = Engine(Runner(loaded.model, loaded.processor), IMAGES.__getitem__, max_waiting=8)
    eng.ready.set()  # accept work before the worker runs, so the requests wait in the queue
    handles = [eng.submit(ChatRequest([user(f"q{i}")], GenParams(max_new_tokens=2))) for i in range(5)]
    for h in handles:
        h.cancel()
    eng.start(warmup=False)
    try:
        assert eng.submit(ChatRequest([user("after")], GenParams(max_new_tokens=2))).wait(60)
        deadline = time.monotonic() + 10
        while eng._live and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not eng._live  # nothing left that drain() would have to end
    finally:
        eng.shutdown()
