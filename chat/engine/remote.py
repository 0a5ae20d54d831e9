"""The engine protocol served by OpenAI-compatible model servers (vLLM, SGLang, another vlchat).

With `--engine-url`, vlchat loads no model: `submit()` turns the request into a streamed chat
completion (`chat/engine/wire.py`) and sends it to the upstream that `chat/engine/upstreams.py`
picks for the conversation; the answer's chunks come back as the same Delta / Done / Failed events
the local engine emits, so the page, the API, the store and the metrics do not know the difference.

One thread runs an asyncio loop with one httpx client: every request is a task on it, and the probes
that mark upstreams up and down run there too. `cancel()` (Stop, a closed tab, an API client that went
away, shutdown) cancels the request's task, which closes its HTTP stream at once; the upstream sees the
disconnect and stops generating. A request that cannot connect marks its upstream down and tries the
next one; when none is up, `submit` refuses with "the model server is not reachable" (503) and the
page's input box says so until one comes back. A request that gets no first token within
`first_token_seconds` fails and is cancelled upstream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable

from prometheus_client import Gauge

from chat.engine.handle import Handle
from chat.engine.metrics import Metrics
from chat.engine.types import (
    Busy,
    ChatRequest,
    Done,
    EngineError,
    Event,
    Failed,
    GenerationFailed,
    NotReady,
    ShuttingDown,
    UnknownAdapter,
)
from chat.engine.upstreams import PROBE_SECONDS, Pool, Upstream, public_url
from chat.engine.wire import (
    UNREACHABLE,
    UNREACHABLE_CODE,
    add_call_deltas,
    calls_as_text,
    conversation_key,
    http_failure,
    owner_salt,
    request_body,
    stream_failure,
    unreachable,
    usage_of,
)

log = logging.getLogger("vlchat.remote")
WATCH_SECONDS = 3.0  # how often an open page asks whether the model server is still there
MAX_ERROR_BODY = 65536


class Unreachable(NotReady):
    """No model server is up: refused at once (503 with Retry-After; the page keeps the message)."""

    code = UNREACHABLE_CODE

    def __init__(self) -> None:
        EngineError.__init__(self, UNREACHABLE)


class RemoteHandle(Handle):
    """A Handle whose cancel() also ends the upstream request (its task, and so its HTTP stream)."""

    future = None  # the concurrent.futures.Future of the request's task
    counted = False  # in vlchat_requests_total already

    def cancel(self, shutting_down: bool = False) -> None:
        """Finish at once if no token came yet, else when the stream is closed; either way the stream closes now."""
        super().cancel(shutting_down)
        if self.future is not None:
            self.future.cancel()


class _Progress:
    """What one request has received so far."""

    def __init__(self) -> None:
        self.text, self.chunks, self.claimed = "", 0, False
        self.finish: str | None = None
        self.usage: dict | None = None
        self.calls: dict[int, dict] = {}  # tool calls by index, as the stream builds them
        self.first_at = self.last_at = 0.0


class RemoteEngine:
    """ChatEngine over one or more OpenAI-compatible upstreams."""

    def __init__(self, urls: tuple[str, ...], *, secret: bytes, load_image: Callable[[str], bytes], key: str = "",
                 model: str = "", session_header: str = "X-Session-Id", first_token_seconds: float = 120,
                 max_waiting: int = 16) -> None:
        self.metrics = Metrics()
        self._up_gauge = Gauge("vlchat_upstream_up", "1 while the model server answers its probe, else 0.",
                               ["upstream"], registry=self.metrics.registry)
        self.pool = Pool(urls, model, on_change=self._changed)
        for u in self.pool.upstreams:
            self._up_gauge.labels(public_url(u.url)).set(0)
        self.ready = self.pool.ready
        self.watch_seconds = WATCH_SECONDS
        self._secret, self._load_image, self._key = secret, load_image, key
        self._session_header = session_header
        self.first_token_seconds = first_token_seconds
        self._max_waiting = max_waiting * len(urls)
        self._lock = threading.Lock()
        self._open: set[RemoteHandle] = set()
        self._waiting = self._running = 0
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._client = None

    # -- the caller's side -----------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Requests sent and not yet answering (no first token)."""
        return self._waiting

    @property
    def model_name(self) -> str:
        """The model the upstreams serve ('' until one has answered)."""
        return self.pool.model

    @property
    def adapters(self) -> tuple[str, ...]:
        """Other models the live upstreams list (vLLM lists its --lora-modules so): a request may name one."""
        return self.pool.others()

    @property
    def changed_at(self) -> float:
        """When the upstreams last went from none up to some up, or back (time.monotonic)."""
        return self.pool.changed_at

    def state_line(self) -> str:
        """For the page: ready, connecting, or the model server is not reachable."""
        return self.pool.describe()

    def health(self) -> list[dict]:
        """Each upstream: url (no credentials), up, and the error when down."""
        return [u.public() for u in self.pool.upstreams]

    def start(self) -> None:
        """Start the loop thread (probes begin at once)."""
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), name="vlchat-remote", daemon=True)
        self._thread.start()
        started.wait()

    def submit(self, request: ChatRequest, on_finish: Callable[[Event], None] | None = None) -> RemoteHandle:
        """Send the request upstream; raises Unreachable, ShuttingDown or Busy."""
        if self._closing:
            raise ShuttingDown()
        if not self.ready.is_set():
            raise Unreachable()
        if request.adapter and request.adapter not in self.adapters:
            raise UnknownAdapter(request.adapter, self.adapters)
        with self._lock:
            if self._waiting >= self._max_waiting:
                raise Busy(self._waiting)
            self._waiting += 1
        self.metrics.waiting.set(self._waiting)
        handle = RemoteHandle(request, on_finish, release=self._release_waiting)
        try:  # encoded here, in the caller's thread: images make bodies of megabytes, not for the loop to encode
            body = json.dumps(request_body(request, self.pool.model, owner_salt(self._secret, request.cache_salt),
                                           self._load_image)).encode("ascii")
        except Exception:  # an image of the conversation is gone from the store, say
            log.exception("could not build the request for the model server")
            self._end(handle, Failed("An image of this conversation could not be read; start a new chat.",
                                     GenerationFailed.code))
            return handle
        with self._lock:
            self._open.add(handle)
        key = conversation_key(self._secret, request)
        handle.future = asyncio.run_coroutine_threadsafe(self._run(handle, body, key), self._loop)
        return handle

    def drain(self) -> int:
        """Stopping: every open request ends with ShuttingDown and its upstream stream is closed."""
        self._closing = True
        with self._lock:
            handles = list(self._open)
        for handle in handles:
            handle.cancel(shutting_down=True)
        for handle in handles:
            handle.wait(5)
        return len(handles)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop (open requests are cancelled) and close the HTTP client."""
        self._closing = True
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout)

    # -- bookkeeping ------------------------------------------------------------------------------

    def _release_waiting(self) -> None:
        with self._lock:
            self._waiting -= 1
        self.metrics.waiting.set(self._waiting)

    def _changed(self, upstream: Upstream) -> None:
        self._up_gauge.labels(public_url(upstream.url)).set(1 if upstream.up else 0)

    def _end(self, handle: RemoteHandle, event: Done | Failed | None) -> None:
        """Finish the handle once (a cancel while waiting may have finished it already) and count it."""
        with self._lock:
            self._open.discard(handle)
        with handle._lock:
            if handle._state == "finished":  # cancelled while it waited for its first token: count it once
                if not handle.counted and handle.result is not None:
                    handle.counted = True
                    r = handle.result
                    self.metrics.requests.labels(r.finish_reason if isinstance(r, Done) else "error").inc()
                return
            if event is None:
                return
            waited, handle._state = handle._state == "queued", "finished"
            handle.counted = True
        if waited:
            handle._release()
        else:
            with self._lock:
                self._running -= 1
            self.metrics.running.set(self._running)
        m = self.metrics
        m.requests.labels(event.finish_reason if isinstance(event, Done) else "error").inc()
        if isinstance(event, Done):
            u = event.usage
            m.prompt_tokens.inc(u.prompt_tokens)
            m.cached_prompt_tokens.inc(u.cached_tokens)
            m.generated_tokens.inc(u.completion_tokens)
        handle._finish(event)

    def _claim(self, handle: RemoteHandle, progress: _Progress) -> bool:
        """The first token came: the request is running (False: it was cancelled while waiting)."""
        if not handle._claim():
            return False
        progress.claimed, progress.first_at = True, time.monotonic()
        with self._lock:
            self._running += 1
        self.metrics.running.set(self._running)
        self.metrics.ttft.observe(progress.first_at - handle.enqueued)
        self.metrics.queue_wait.observe(progress.first_at - handle.enqueued)
        return True

    # -- the loop's side --------------------------------------------------------------------------

    def _serve(self, started: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main(started))
        finally:
            self._loop.close()

    async def _main(self, started: threading.Event) -> None:
        import httpx

        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line for every probe and request
        self._stop = asyncio.Event()
        read = self.first_token_seconds + 5
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=5.0, read=read, write=60.0, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64), trust_env=False,
        )
        started.set()
        try:
            while not self._stop.is_set():
                await asyncio.gather(*(self.pool.probe(self._client, u, self._headers())
                                       for u in self.pool.upstreams))
                try:
                    await asyncio.wait_for(self._stop.wait(), PROBE_SECONDS)
                except TimeoutError:
                    pass
        finally:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._client.aclose()

    def _headers(self, key: str = "") -> dict:
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        if key and self._session_header:
            headers[self._session_header] = key
        return headers

    async def _run(self, handle: RemoteHandle, body: bytes, key: str) -> None:
        """One request: pick an upstream, stream from it (the next one if it cannot connect), finish."""
        import httpx

        progress, tried = _Progress(), []
        try:
            while True:
                upstream = self.pool.pick(key, tuple(tried))
                if upstream is None:
                    self._end(handle, unreachable(progress.text))
                    return
                tried.append(upstream)
                try:
                    event = await self._exchange(handle, upstream, body, key, progress)
                except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                    self.pool.mark(upstream, False, f"not reachable ({type(exc).__name__})")
                    continue
                self._end(handle, event)
                return
        except asyncio.CancelledError:
            if handle.shutting_down:
                self._end(handle, Failed(str(ShuttingDown()), ShuttingDown.code, progress.text))
            else:
                self._end(handle, Done("cancelled", progress.text, usage_of(None, progress.chunks)))
        except Exception:  # a bug or a garbled answer must not leave the request open
            log.exception("reading the model server's answer failed")
            self._end(handle, unreachable(progress.text, "The model server's answer could not be read; try again.",
                                          GenerationFailed.code))

    async def _exchange(self, handle: RemoteHandle, upstream: Upstream, body: bytes, key: str,
                        progress: _Progress) -> Done | Failed | None:
        """Stream one answer from `upstream` into the handle; the final event (None: cancelled while waiting)."""
        import httpx

        url = upstream.url + "/chat/completions"
        deadline = asyncio.timeout(self.first_token_seconds)
        try:
            async with deadline:
                headers = {**self._headers(key), "Content-Type": "application/json"}
                async with self._client.stream("POST", url, content=body, headers=headers) as response:
                    if response.status_code >= 400:
                        raw = b""
                        async for piece in response.aiter_bytes():
                            raw += piece
                            if len(raw) > MAX_ERROR_BODY:
                                break
                        log.warning("model server %s answered HTTP %d", public_url(upstream.url),
                                    response.status_code)
                        return http_failure(response.status_code, raw[:MAX_ERROR_BODY], progress.text)
                    async for line in response.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        chunk = json.loads(data)
                        if not isinstance(chunk, dict):
                            continue
                        if "error" in chunk or chunk.get("object") == "error":
                            return stream_failure(chunk, progress.text)
                        if chunk.get("usage"):
                            progress.usage = chunk["usage"]
                        for choice in chunk.get("choices") or []:
                            delta = choice.get("delta") or {}
                            text, calls = delta.get("content"), delta.get("tool_calls")
                            if text or calls:
                                deadline.reschedule(None)  # it answers (tool calls count; they come as a whole)
                            if text:
                                if not progress.claimed and not self._claim(handle, progress):
                                    return None
                                progress.text += text
                                progress.chunks += 1
                                progress.last_at = time.monotonic()
                                handle._emit_text(text)
                            add_call_deltas(progress.calls, calls)
                            if choice.get("finish_reason"):
                                progress.finish = choice["finish_reason"]
        except TimeoutError:
            log.warning("model server %s gave no first token within %s s", public_url(upstream.url),
                        self.first_token_seconds)
            return unreachable(progress.text, f"The model server did not start answering within "
                                              f"{self.first_token_seconds:g} seconds; try again in a moment.",
                               "upstream_timeout")
        except (httpx.ConnectError, httpx.ConnectTimeout):
            raise
        except httpx.HTTPError as exc:
            log.warning("model server %s: %s", public_url(upstream.url), type(exc).__name__)
            return unreachable(progress.text)
        if progress.finish is None:
            log.warning("model server %s ended a stream without a finish reason", public_url(upstream.url))
            return unreachable(progress.text)
        if progress.calls:  # tool calls the server parsed: back to the text the API reads them from
            blocks = ("\n" if progress.text else "") + calls_as_text(progress.calls)
            if progress.claimed or self._claim(handle, progress):
                progress.text += blocks
                handle._emit_text(blocks)
        usage = usage_of(progress.usage, progress.chunks)
        if progress.chunks > 1 and progress.last_at > progress.first_at:
            span = progress.last_at - progress.first_at
            self.metrics.token_latency.observe(span / (progress.chunks - 1))
            self.metrics.decode_rate.observe((progress.chunks - 1) / span)
        return Done("length" if progress.finish == "length" else "stop", progress.text, usage)
