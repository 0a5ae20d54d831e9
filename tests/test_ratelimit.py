"""Rate limits (issue 14): token buckets with a fake clock, the settings, the page's refusal, and a real server.

The server tests use the official `openai` client with retries off (it would otherwise wait out
Retry-After and try again, as a client should).
"""

from __future__ import annotations

import asyncio
import threading

import openai
import pytest

from chat import ui
from chat.config import SettingsError, load_settings
from chat.notices import Notice
from chat.ratelimit import Rate, RateLimiter, parse_rates
from chat.ratelimit_gate import Gate, duration, limit_headers
from tests.servers import Server, data_dir, metric, running
from tests.test_ui import OTHER, OWNER, Req, drain, real_ctx, send


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- rates and settings ---------------------------------------------------------------------------


def test_rates_parse_units_plurals_and_several():
    assert parse_rates("") == ()
    assert parse_rates("60/minute") == (Rate(60, 60.0, "60/minute"),)
    assert [(r.amount, r.seconds) for r in parse_rates("10/second, 600 per hours;5/s,2/d")] == [
        (10, 1.0), (600, 3600.0), (5, 1.0), (2, 86400.0)]
    for bad in ("60", "60/fortnight", "x/minute", "0/minute", "60/ms", "-1/second", "60/minute/2"):
        with pytest.raises(ValueError):
            parse_rates(bad)


def test_bad_limits_end_start_up_with_one_line_naming_the_setting():
    assert load_settings(["--rate-limit", "10/second,60/minute"], {}).rate_limit == "10/second,60/minute"
    with pytest.raises(SettingsError, match=r"--rate-limit \(VLCHAT_RATE_LIMIT\) must be .*60/minute.*got '60'"):
        load_settings(["--rate-limit", "60"], {}, exit_on_error=False)
    with pytest.raises(SettingsError, match=r"--token-limit \(VLCHAT_TOKEN_LIMIT\).*got 'lots/minute'"):
        load_settings([], {"VLCHAT_TOKEN_LIMIT": "lots/minute"}, exit_on_error=False)


# -- buckets ---------------------------------------------------------------------------------------


def test_request_bucket_refuses_past_the_burst_and_refills():
    clock = Clock()
    limiter = RateLimiter(parse_rates("2/minute"), clock=clock)
    first, second, third = (limiter.admit("a") for _ in range(3))
    assert first.admitted and second.admitted and not third.admitted
    assert (first.requests.limit, first.requests.remaining, second.requests.remaining) == (2, 1, 0)
    assert third.refusal.what == "requests" and third.refusal.retry_after_seconds == 30
    assert limiter.admit("b").admitted  # another subject has its own buckets
    clock.now += 29
    refused = limiter.admit("a")
    assert not refused.admitted and refused.refusal.retry_after_seconds == 1
    clock.now += 1
    assert limiter.admit("a").admitted
    assert not limiter.admit("a").admitted


def test_every_rate_of_several_must_allow_and_the_wait_is_the_longest():
    clock = Clock()
    limiter = RateLimiter(parse_rates("2/second,3/minute"), clock=clock)
    assert limiter.admit("a").admitted and limiter.admit("a").admitted
    refused = limiter.admit("a")
    assert refused.refusal.retry_after_seconds == 1  # the per-second bucket
    clock.now += 1
    ticket = limiter.admit("a")
    assert ticket.admitted
    # Headers speak of the most depleted bucket: the minute's (0 of 3 left), full in a minute.
    assert (ticket.requests.limit, ticket.requests.remaining) == (3, 0)
    clock.now += 1
    refused = limiter.admit("a")
    assert not refused.admitted and 18 <= refused.refusal.retry_after_seconds <= 19  # 1 of 3/minute back at 20 s


def test_token_bucket_admits_while_positive_and_real_usage_delays_the_next():
    clock = Clock()
    limiter = RateLimiter(tokens=parse_rates("600/minute"), clock=clock)  # 10 tokens a second
    ticket = limiter.admit("a")
    assert ticket.admitted and (ticket.tokens.limit, ticket.tokens.remaining) == (600, 600)
    assert ticket.requests is None
    ticket.on_finish()(type("Done", (), {"usage": type("U", (), {"prompt_tokens": 500, "completion_tokens": 200})})())
    ticket.charge(10_000)  # charged once only
    refused = limiter.admit("a")  # 600 - 700 = -100: refused until one token is back (10.1 s)
    assert refused.refusal.what == "tokens" and refused.refusal.retry_after_seconds == 11
    assert refused.tokens.remaining == 0
    clock.now += 10.5
    ticket = limiter.admit("a")
    assert ticket.admitted and ticket.tokens.remaining == 5


def test_a_refund_gives_the_request_back():
    limiter = RateLimiter(parse_rates("1/hour"), clock=Clock())
    ticket = limiter.admit("a")
    ticket.refund()
    ticket.refund()  # once
    assert limiter.admit("a").admitted and not limiter.admit("a").admitted


def test_idle_subjects_are_dropped_and_memory_is_bounded():
    clock = Clock()
    limiter = RateLimiter(parse_rates("10/minute"), clock=clock, max_subjects=50, sweep_seconds=60)
    for i in range(20):
        limiter.admit(f"s{i}")
    assert len(limiter) == 20
    clock.now += 61  # every bucket is full again: the same as new
    limiter.admit("new")
    assert len(limiter) == 1
    for i in range(200):  # a flood of new subjects never holds more than max_subjects
        limiter.admit(f"flood{i}")
    assert len(limiter) <= 50
    # A subject still in debt is not forgotten by the sweep.
    limiter = RateLimiter(parse_rates("1/minute"), clock=clock, sweep_seconds=1)
    limiter.admit("busy")
    clock.now += 30
    limiter.admit("other")
    assert not limiter.admit("busy").admitted


def test_admissions_from_many_threads_never_exceed_the_limit():
    limiter = RateLimiter(parse_rates("100/hour"), clock=Clock())
    admitted = []
    lock = threading.Lock()

    def work():
        for _ in range(50):
            ok = limiter.admit("shared").admitted
            with lock:
                admitted.append(ok)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert admitted.count(True) == 100 and len(admitted) == 400


def test_headers_in_openai_form():
    assert [duration(s) for s in (0.02, 1, 29.5, 360, 3600)] == ["20ms", "1s", "29.5s", "6m0s", "1h0m0s"]
    clock = Clock()
    gate = Gate("2/minute", "1000/minute", clock=clock)
    ok = gate.limiter.admit("a")
    assert limit_headers(ok) == {
        "x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "1", "x-ratelimit-reset-requests": "30s",
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "1000", "x-ratelimit-reset-tokens": "0ms"}
    gate.limiter.admit("a")
    refused = limit_headers(gate.limiter.admit("a"))
    assert refused["Retry-After"] == "30" and refused["x-ratelimit-remaining-requests"] == "0"
    assert limit_headers(Gate().limiter.admit("a")) == {}  # no limits: no headers


def test_an_api_request_the_server_turns_away_does_not_count():
    from chat.api_run import Generation
    from chat.engine.types import Busy, ContextTooLong
    from chat.openai_parse import ApiError

    class Refusing:
        def __init__(self, exc):
            self.exc = exc

        def submit(self, request, on_finish=None):
            raise self.exc

    limiter = RateLimiter(parse_rates("1/hour"), clock=Clock())
    ticket = limiter.admit("key")
    with pytest.raises(ApiError) as busy:
        asyncio.run(Generation.start(None, Refusing(Busy(3)), None, ticket.on_finish(), ticket.refund))
    assert busy.value.status == 503
    ticket = limiter.admit("key")  # given back: admitted again
    assert ticket.admitted
    with pytest.raises(ApiError) as too_long:  # the client's own fault still counts
        asyncio.run(Generation.start(None, Refusing(ContextTooLong("too long")), None, ticket.on_finish(),
                                     ticket.refund))
    assert too_long.value.status == 400
    assert not limiter.admit("key").admitted


# -- the page ---------------------------------------------------------------------------------------


@pytest.fixture
def ctx(tmp_path, loaded):
    yield from real_ctx(tmp_path, loaded)


def test_page_refuses_a_message_over_the_limit_says_when_and_stores_nothing(ctx):
    clock = Clock()
    ctx.limits = Gate("2/minute", clock=clock)
    conv_id = send(ctx, None, "first")[0][0]
    ctx.engine.max_waiting = 0  # a busy server's refusal does not count against the limit
    with pytest.raises(Notice, match="busy"):
        send(ctx, conv_id, "refused as busy")
    ctx.engine.max_waiting = 16
    send(ctx, conv_id, "second")
    with pytest.raises(Notice) as refused:
        send(ctx, conv_id, "third")
    assert refused.value.message == "Too many messages; try again in 30 seconds. Your message is still in the box."
    with pytest.raises(Notice, match="Too many messages"):  # Regenerate goes through the same check
        drain(ui.regenerate(ctx, conv_id, "general", 0.0, 0.9, 8, "", Req()))
    assert [r["text"] for r in ctx.store.messages(OWNER, conv_id) if r["role"] == "user"] == ["first", "second"]
    assert len(ctx.store.list_conversations(OWNER)) == 1
    send(ctx, None, "another browser", req=Req(browser=OTHER))  # not affected
    assert b'vlchat_rate_limited_total{kind="browser",limit="requests"} 2.0' in ctx.limits.render()
    clock.now += 30
    send(ctx, conv_id, "after the wait")


def test_page_token_limit_counts_the_answers_real_usage(ctx):
    clock = Clock()
    ctx.limits = Gate(token_limit="60/minute", clock=clock)
    conv_id = send(ctx, None, "a question long enough to use some tokens", max_new=8)[0][0]
    used = sum(r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
               for r in ctx.store.messages(OWNER, conv_id) if r["role"] == "assistant")
    assert used > 60
    with pytest.raises(Notice, match=r"^Too much text asked and answered; try again in \d+ (second|minute)"):
        send(ctx, conv_id, "more")
    clock.now += used - 60 + 1  # one token a second: back above zero
    send(ctx, conv_id, "more", max_new=8)


def test_address_limit_counts_everyone_from_one_address_and_refunds_a_refusal():
    clock = Clock()
    gate = Gate("5/minute", address_rate_limit="2/minute", clock=clock)
    assert gate.page("browser:a", "10.0.0.1").admitted
    assert gate.page("browser:b", "10.0.0.1").admitted  # another browser (a script that dropped its cookie)
    with pytest.raises(Notice, match="Too many messages"):
        gate.page("browser:c", "10.0.0.1")
    moved = gate.page("browser:c", "10.0.0.2")  # another address is not affected
    # The refusal by address took nothing from browser c's own bucket: this admission leaves 4 of 5.
    assert moved.admitted and moved.parts[0].requests.remaining == 4
    assert moved.requests.remaining == 1  # the headers show the tighter of the two: the address's
    assert b'vlchat_rate_limited_total{kind="all-address",limit="requests"} 1.0' in gate.render()
    clock.now += 30
    assert gate.page("browser:d", "10.0.0.1").admitted


def test_page_address_limit_reaches_the_handlers(ctx):
    from types import SimpleNamespace

    ctx.limits = Gate(address_rate_limit="1/minute", clock=Clock())
    here = SimpleNamespace(host="10.9.9.9")
    first, second = Req(), Req(browser=OTHER)
    first.client = second.client = here
    send(ctx, None, "first", req=first)
    with pytest.raises(Notice, match="Too many messages"):
        send(ctx, None, "from another browser on the same machine", req=second)
    assert ctx.store.list_conversations(OTHER) == []


# -- a real server, the openai client -------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(tmp_path_factory, model_dir):
    group = {
        "keys": Server(data_dir(tmp_path_factory, model_dir, "rl-keys"), "--api-key", "k1,k2",
                       "--rate-limit", "2/minute", "--token-limit", "1000000/minute"),
        "open": Server(data_dir(tmp_path_factory, model_dir, "rl-open"), "--token-limit", "5/minute"),
        "address": Server(data_dir(tmp_path_factory, model_dir, "rl-address"), "--api-key", "k1,k2",
                          "--address-rate-limit", "3/minute"),
    }
    with running(group):
        yield group


def client(srv: Server, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base + "/v1", api_key=key, max_retries=0, timeout=60)


CHAT = {"model": "vlchat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_third_call_gets_429_with_retry_after_and_headers_and_other_keys_go_on(servers):
    srv = servers["keys"]
    k1 = client(srv, "k1")
    raw = k1.chat.completions.with_raw_response.create(**CHAT)
    assert raw.parse().choices[0].message.content is not None
    h = raw.headers
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("2", "1")
    assert h["x-ratelimit-reset-requests"].endswith("s")
    assert h["x-ratelimit-limit-tokens"] == "1000000" and int(h["x-ratelimit-remaining-tokens"]) > 0
    raw = k1.chat.completions.with_raw_response.create(**CHAT, stream=True)  # a stream has them too
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"
    assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices) is not None
    with pytest.raises(openai.RateLimitError) as refused:
        k1.chat.completions.create(**CHAT)
    err = refused.value
    assert err.status_code == 429 and err.code == "rate_limit_exceeded" and err.type == "requests"
    assert 1 <= int(err.response.headers["retry-after"]) <= 30
    assert err.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert "Try again in" in err.message

    k2 = client(srv, "k2")  # another key has its own limit; /v1/responses is limited the same way
    for _ in range(2):
        assert k2.responses.create(model="vlchat", input="hi", max_output_tokens=4).status in ("completed",
                                                                                               "incomplete")
    with pytest.raises(openai.RateLimitError):
        k2.responses.create(model="vlchat", input="hi", max_output_tokens=4)
    assert metric(srv.base, 'vlchat_rate_limited_total{kind="key",limit="requests"}') == 2


def test_keyless_api_is_limited_per_address_by_tokens(servers):
    srv = servers["open"]
    c = client(srv)
    raw = c.chat.completions.with_raw_response.create(**CHAT)
    assert raw.headers["x-ratelimit-limit-tokens"] == "5" and "x-ratelimit-limit-requests" not in raw.headers
    assert raw.parse().usage.total_tokens > 5  # charged when it ended: the bucket is now below zero
    with pytest.raises(openai.RateLimitError) as refused:
        c.chat.completions.create(**CHAT)
    assert refused.value.type == "tokens" and refused.value.response.headers["x-ratelimit-remaining-tokens"] == "0"
    assert int(refused.value.response.headers["retry-after"]) >= 1
    assert metric(srv.base, 'vlchat_rate_limited_total{kind="address",limit="tokens"}') == 1


# -- the page in a browser --------------------------------------------------------------------------


def test_page_in_a_browser_says_when_to_try_again_and_keeps_the_message(tmp_path_factory, model_dir, browser):
    from tests.test_e2e_browser import send as type_and_send
    from tests.test_e2e_browser import wait_idle, wait_ready

    srv = Server(data_dir(tmp_path_factory, model_dir, "rl-page"), "--rate-limit", "1/hour").start()
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.goto(srv.base + "/")
        wait_ready(page)
        type_and_send(page, "first question")
        page.locator("#chat .user-row").first.wait_for(timeout=20_000)
        wait_idle(page)
        type_and_send(page, "second question")
        alert = page.locator("#notice [role=alert]")
        alert.wait_for(timeout=10_000)
        assert "Too many messages; try again in 60 minutes. Your message is still in the box." in alert.inner_text()
        assert page.locator("#input textarea").input_value() == "second question"
        assert page.locator("#chat .user-row").count() == 1  # nothing stored or shown
        assert metric(srv.base, 'vlchat_rate_limited_total{kind="browser",limit="requests"}') == 1
    finally:
        context.close()
        srv.stop()


def test_address_limit_counts_every_key_from_one_address(servers):
    srv = servers["address"]
    k1, k2 = client(srv, "k1"), client(srv, "k2")
    k1.chat.completions.create(**CHAT)
    k1.chat.completions.create(**CHAT)
    raw = k2.chat.completions.with_raw_response.create(**CHAT)  # k2's own bucket is full; the address's is not
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError) as refused:
        k2.chat.completions.create(**CHAT)
    assert refused.value.code == "rate_limit_exceeded" and int(refused.value.response.headers["retry-after"]) >= 1
    assert metric(srv.base, 'vlchat_rate_limited_total{kind="all-address",limit="requests"}') == 1
