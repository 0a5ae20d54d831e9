"""The one thread that owns the model.

Callers `submit()` a ChatRequest and get a Handle (handle.py): an iterator of events (Delta,
then Done or Failed) and a `cancel()` that the worker honours between two decode steps. The
queue is bounded; a full queue raises Busy at once instead of hanging the caller.

`submit()` renders and tokenizes the prompt in the caller's thread, after refusing text that
cannot fit the context by its length in characters alone, so a huge prompt never stalls the
worker (and everyone's streams) and never gets tokenized at all.

Everything that touches the model happens on this thread: prefix and feature caches need no
locks and CUDA sees one stream of work. Prefix-cache keys are salted with the request's owner
(`ChatRequest.cache_salt`), so one owner's KV state never serves another.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from PIL import Image

from chat.engine.cache import FeatureCache, ImageFeatures, PrefixCache
from chat.engine.fastdecode import FastDecoder
from chat.engine.handle import Handle
from chat.engine.metrics import Metrics
from chat.engine.prompt import Prompt, render, salted, split_visual, template_messages
from chat.engine.runner import Runner, TextStream, sample
from chat.engine.types import (
    Busy,
    ChatRequest,
    ContextTooLong,
    Delta,
    Done,
    Event,
    Failed,
    GenerationFailed,
    GenParams,
    NotReady,
    ShuttingDown,
    Usage,
)
from chat.images import lower_detail, open_clean

log = logging.getLogger(__name__)

_STOP = object()
GENERIC_FAILURE = "The model failed while answering; the error is in the server log."
MAX_KNOWN_GRIDS = 4096


def auto_prefix_budget(free_bytes: int, reserve: int = 3 << 30) -> int:
    """KV budget from free GPU memory after warm-up: half of what is left once a working reserve
    (prefill activations, the vision tower on a large image) is set aside; at least 256 MiB."""
    return max(256 << 20, (free_bytes - reserve) // 2)


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


class Engine:
    """The shared model worker used by both the page and the API."""

    def __init__(
        self,
        runner: Runner,
        fetch_image: Callable[[str], Image.Image],
        *,
        max_waiting: int = 16,
        max_context: int = 32768,
        prefix_entries: int = 8,
        prefix_bytes: int = 0,
        feature_bytes: int = 1 << 30,
        fast_decode: bool | None = None,
    ) -> None:
        self.runner = runner
        self.fetch_image = fetch_image
        self.metrics = Metrics()
        self.max_context = min(max_context, runner.max_context)
        self.prefix = PrefixCache(prefix_entries, prefix_bytes or (2 << 30))  # 0: sized after warm-up
        self.features = FeatureCache(feature_bytes)
        # CUDA graphs for decode on a GPU (None: when there is one); the CPU keeps the plain path.
        if fast_decode is None:
            fast_decode = runner.device.type == "cuda"
        self.fast = None
        if fast_decode:
            try:
                self.fast = FastDecoder(runner.model, self.max_context)
            except torch.cuda.OutOfMemoryError:  # no room for the decode buffer: slower, but serving
                log.warning("no GPU memory for a %d-token decode buffer; using the plain decode path (lower "
                            "--context-tokens to get the fast one)", self.max_context)
                torch.cuda.empty_cache()
        self.ready = threading.Event()  # set once warm-up succeeded: submit() accepts work
        self.warmed = threading.Event()  # set when warm-up ended, well or not
        self.warmup_error = ""  # why warm-up failed; the engine then never becomes ready
        self.warmup_seconds: float | None = None
        # Text longer than this many characters cannot fit the context whatever it tokenizes to.
        self.max_prompt_chars = self.max_context * runner.max_token_chars
        self._draining = False
        self._live: set[Handle] = set()  # submitted and not finished, for drain()
        self._grids_lock = threading.Lock()
        # Admission counts live waiting requests (a cancelled one frees its slot at once); the
        # transport queue itself is unbounded and the worker skips cancelled entries.
        self.max_waiting = max_waiting
        self._waiting = 0
        self._admit = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._auto_prefix_budget = prefix_bytes <= 0
        self._grids: dict[str, tuple[int, int, int]] = {}
        self._thread = threading.Thread(target=self._loop, name="vlchat-worker", daemon=True)

    # -- caller side -------------------------------------------------------------------------

    def start(self, warmup: bool = True) -> None:
        """Start the worker thread; it warms up, then reports ready."""
        self._thread.start()
        if not warmup:
            self.warmed.set()
            self.ready.set()
        else:
            self._queue.put(("warmup", None))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the worker after the request in hand."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    @property
    def waiting(self) -> int:
        """Requests queued and not yet started."""
        return self._waiting

    def submit(self, request: ChatRequest, on_finish: Callable[[Event], None] | None = None) -> Handle:
        """Render the prompt (in the caller's thread) and queue the request.

        Raises NotReady before warm-up ends, ShuttingDown while stopping and Busy when the queue
        is full. A prompt that cannot fit comes back as a handle already finished with a Failed
        event (code context_length_exceeded), as if the worker had refused it.
        """
        if self._draining:
            raise ShuttingDown()
        if not self.ready.is_set():
            raise NotReady()
        with self._admit:
            if self._waiting >= self.max_waiting:
                raise Busy(self._waiting)
            self._waiting += 1
            self.metrics.waiting.set(self._waiting)
        handle = Handle(request, on_finish, self._release)
        try:
            handle.prompt = self._checked_prompt(request)
        except ContextTooLong as exc:
            handle._claim()  # frees the slot; the request never reaches the worker
            handle._finish(Failed(str(exc), exc.code))
            return handle
        except Exception:  # a missing image, a template error: the same failure as in the worker
            log.exception("rendering the prompt failed")
            handle._claim()
            handle._finish(Failed(GENERIC_FAILURE, GenerationFailed.code))
            return handle
        with self._admit:
            self._live.add(handle)
        self._queue.put(handle)
        return handle

    def _checked_prompt(self, request: ChatRequest) -> Prompt:
        """The rendered prompt, or ContextTooLong, refused on characters before any tokenizing."""
        chars = sum(len(m["content"]) if isinstance(m["content"], str)
                    else sum(len(p.get("text") or "") for p in m["content"]) for m in request.messages)
        if chars > self.max_prompt_chars:
            raise ContextTooLong(
                f"This conversation's text is {chars:,} characters, more than the {self.max_context:,}-token context "
                "can hold. Send a shorter text (or attach it in parts) or start a new chat."
            )
        prompt, _ = self.build_prompt(request.messages, request.images)
        self._check_room(len(prompt.ids), request.params)
        return prompt

    def _check_room(self, n_prompt: int, params: GenParams) -> None:
        room = self.max_context - n_prompt
        if room < 1 or (params.max_new_tokens > room and not params.fit_to_context):
            over = n_prompt + params.max_new_tokens - self.max_context
            raise ContextTooLong(
                f"This conversation is {n_prompt} tokens and the answer may take {params.max_new_tokens}; together "
                f"that is {over} over the {self.max_context}-token limit. Choose a lower image detail, remove an "
                "image, ask for a shorter answer (Max new tokens) or start a new chat."
            )

    def drain(self) -> int:
        """Stopping: refuse new work and end every open request with a ShuttingDown failure; how many."""
        self._draining = True
        with self._admit:
            live = list(self._live)
        for handle in live:
            handle.cancel(shutting_down=True)
        return len(live)

    def _release(self) -> None:
        with self._admit:
            self._waiting -= 1
            self.metrics.waiting.set(self._waiting)

    # -- worker side -------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if isinstance(item, tuple):
                try:
                    self._warmup()
                except Exception as exc:
                    log.exception("warm-up failed")
                    self.warmup_error = self.warmup_error or f"{exc.__class__.__name__}: {exc}"
                if not self.warmup_error:
                    self.ready.set()
                self.warmed.set()  # never leave the starter waiting on a warm-up that broke
                continue
            self.metrics.running.set(1)
            try:
                self._serve(item, self.metrics)
            except Exception:  # last line of defence: the thread must outlive any one request
                log.exception("request failed outside generation")
                if item.result is None:
                    item._finish(Failed(GENERIC_FAILURE, GenerationFailed.code, item._text))
            finally:
                self.metrics.running.set(0)

    def _warmup(self) -> None:
        started = time.monotonic()
        if self.fast is not None:
            try:
                self.fast.warm_up()
                log.info("captured %d decode graphs in %.1f s", len(self.fast.graphs), time.monotonic() - started)
            except Exception:  # a GPU or driver that cannot capture: serve on the plain path, slower but right
                log.exception("decode graph capture failed; using the plain decode path")
                self.fast = None
                self._free_memory()
        warm_image = {"warmup": Image.new("RGB", (96, 64), (120, 160, 200))}
        try:
            # Two turns: a first one with an image, then a follow-up on the cached prefix, so both
            # paths have run (and loaded their kernels) before the first real request.
            messages = [{"role": "user", "content": [{"type": "image", "image_id": "warmup"},
                                                     {"type": "text", "text": "Describe."}]}]
            for _ in range(2):
                request = ChatRequest(messages, GenParams(temperature=0.0, max_new_tokens=4), "warmup", warm_image)
                handle = Handle(request, None)
                handle.prompt = self._checked_prompt(request)
                self._serve(handle, Metrics())  # a throwaway registry: warm-up is not traffic
                if isinstance(handle.result, Failed):
                    log.error("warm-up failed: %s", handle.result.message)
                    self.warmup_error = handle.result.message
                    break
                # A follow-up of ordinary length: the suffix-prefill shapes a real turn 2 uses.
                follow_up = "What else can you see in it, and where exactly is each thing in the picture? " * 3
                messages = messages + [{"role": "assistant", "content": handle.result.text},
                                       {"role": "user", "content": follow_up}]
        finally:
            self._grids.clear()
            self.prefix.clear()
            self.features.clear()
        if self._auto_prefix_budget and torch.cuda.is_available() and self.runner.device.type == "cuda":
            self.prefix.max_bytes = auto_prefix_budget(torch.cuda.mem_get_info(self.runner.device)[0])
        log.info("prefix cache budget %.1f GiB, feature cache %.1f GiB", self.prefix.max_bytes / 2**30,
                 self.features.max_bytes / 2**30)
        self.warmup_seconds = time.monotonic() - started
        if not self.warmup_error:
            log.info("warm-up done in %.1f s; ready", self.warmup_seconds)  # _loop then sets `ready`

    def _image(self, image_id: str, inline: dict) -> Image.Image:
        data = inline.get(image_id)
        if data is None:
            return self.fetch_image(image_id)
        return data if isinstance(data, Image.Image) else open_clean(data)

    def build_prompt(self, messages: list[dict], inline: dict | None = None) -> tuple[Prompt, dict[str, Image.Image]]:
        """Render messages; images whose grid is unknown are opened once (and returned, by sha, for encoding)."""
        opened: dict[str, Image.Image] = {}
        grids = {}
        with self._grids_lock:  # callers' threads render side by side
            if len(self._grids) > MAX_KNOWN_GRIDS:  # only a cache of image sizes; keep it bounded
                self._grids.clear()
            known = {vid: self._grids.get(vid) for vid in template_messages(messages)[1]}
        for vid, grid in known.items():
            if grid is None:
                image_id, detail = split_visual(vid)
                img = opened.get(image_id) or self._image(image_id, inline or {})
                opened[image_id] = img
                grid = self.runner.grid(img.width, img.height, detail)
                with self._grids_lock:
                    self._grids[vid] = grid
            grids[vid] = grid
        return render(self.runner.processor, messages, grids, self.runner.merge), opened

    def _features(
        self, vids: list[str], opened: dict[str, Image.Image], inline: dict
    ) -> tuple[dict[str, ImageFeatures], int]:
        """Vision features for each visual id: from the cache, else one encoder run per detail level."""
        found = {vid: self.features.get(vid) for vid in dict.fromkeys(vids)}
        missing = [vid for vid, feats in found.items() if feats is None]
        by_detail: dict[str, list[str]] = {}
        for vid in missing:
            by_detail.setdefault(split_visual(vid)[1], []).append(vid)
        for detail, group in by_detail.items():
            images = []
            for vid in group:
                image_id = split_visual(vid)[0]
                images.append(opened.get(image_id) or self._image(image_id, inline))
            for vid, feats in zip(group, self.runner.encode(images, detail), strict=True):
                self.features.put(vid, feats)
                found[vid] = feats  # held here even if the LRU had no room for them
        return found, len(missing)

    def _serve(self, handle: Handle, metrics: Metrics) -> None:
        metrics.queue_wait.observe(time.monotonic() - handle.enqueued)
        if not handle._claim():  # cancelled while it waited: already finished for its caller
            metrics.requests.labels("cancelled").inc()
            self._forget(handle)
            return
        out_of_memory = False
        try:
            result = self._generate(handle, handle.request, metrics, handle.prompt)
        except ContextTooLong as exc:
            result = Failed(str(exc), exc.code)
        except torch.cuda.OutOfMemoryError as exc:
            # No exc_info: a log record that keeps the traceback (a capturing handler does) would keep
            # the failed try's frames, and its KV, alive.
            log.warning("out of GPU memory (%s); freeing caches and retrying at lower detail", str(exc))
            out_of_memory = True
        except Exception:
            log.exception("generation failed")
            result = Failed(GENERIC_FAILURE, GenerationFailed.code)
        # Handled out here, not inside `except`: there the exception's traceback still holds the
        # failed try's frames and with them its KV tensors, so freeing memory would free nothing.
        if out_of_memory:
            result = self._retry_lower(handle, metrics)
        if handle.request.params.seed is not None and self.fast is not None:
            torch.cuda.seed()  # a client's seed must not fix the sampling of the requests after it
        if isinstance(result, Failed) and not result.text:
            result = replace(result, text=handle._text)  # keep what was already streamed
        if handle.shutting_down and isinstance(result, Done) and result.finish_reason == "cancelled":
            result = Failed(str(ShuttingDown()), ShuttingDown.code, result.text)
        outcome = result.finish_reason if isinstance(result, Done) else "error"
        metrics.requests.labels(outcome).inc()
        self._forget(handle)
        handle._finish(result)

    def _forget(self, handle: Handle) -> None:
        with self._admit:
            self._live.discard(handle)

    def _retry_lower(self, handle: Handle, metrics: Metrics) -> Done | Failed:
        """After running out of GPU memory: free the caches and try once more with lower image detail."""
        self._free_memory()
        failed = Failed("The GPU ran out of memory for this request. Try fewer images, lower detail or a "
                        "shorter conversation.", GenerationFailed.code)
        lowered = lower_detail_request(handle.request)
        if lowered is None or handle._emitted:  # retry once, only if nothing was streamed yet
            return failed
        again = False
        try:
            done = self._generate(handle, lowered, metrics)
            return replace(done, notice="The GPU ran out of memory, so the images were read at lower detail.")
        except torch.cuda.OutOfMemoryError:
            log.warning("out of GPU memory again at lower detail")
            again = True
        except ContextTooLong as exc:
            return Failed(str(exc), exc.code)
        except Exception:  # keeps the out-of-memory message: that is what the person can act on
            log.exception("retry at lower detail failed")
        if again:
            self._free_memory()
        return failed

    def _free_memory(self) -> None:
        self.prefix.clear()
        self.features.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _generate(self, handle: Handle, request: ChatRequest, metrics: Metrics, prompt: Prompt | None = None) -> Done:
        started = time.monotonic()
        runner = self.runner
        params = request.params
        opened: dict[str, Image.Image] = {}
        if prompt is None:  # a retry at lower detail renders again
            prompt, opened = self.build_prompt(request.messages, request.images)
        n_prompt = len(prompt.ids)
        self._check_room(n_prompt, params)
        max_new = min(params.max_new_tokens, self.max_context - n_prompt)

        # Reuse up to the last prompt token (one must run to give logits), never splitting an image.
        limit = n_prompt - 1
        for span in prompt.images:
            if span.start < limit < span.start + span.length:
                limit = span.start
        session = request.session
        keys = salted(prompt.keys, request.cache_salt)  # the owner is part of every cache key
        kv, reuse = self.prefix.take(keys, session, limit, runner.new_cache)
        if kv is None:
            kv = runner.new_cache()

        new_spans = [s for s in prompt.images if s.start >= reuse]
        feats, encoded = self._features([s.image_id for s in new_spans], opened, request.images)
        metrics.images_encoded.inc(encoded)
        visual = [(span.start - reuse, feats[span.image_id]) for span in new_spans]

        metrics.prompt_tokens.inc(n_prompt)
        metrics.cached_prompt_tokens.inc(reuse)
        logits = runner.forward(prompt.ids[reuse:], prompt.positions[:, reuse:], reuse, kv, visual)

        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
            if self.fast is not None:
                torch.cuda.manual_seed(params.seed)
        fast = self.fast
        if fast is not None:
            fast.load(kv, n_prompt)
        stream = TextStream(runner.processor.tokenizer)
        stops = [s for s in params.stop if s]
        hold = max((len(s) for s in stops), default=1) - 1
        emitted = 0
        generated: list[int] = []
        finish = "length"
        position, seq = prompt.next_position, n_prompt
        first_at = last_at = None
        token = sample(logits, params.temperature, params.top_p, generator)
        while True:
            generated.append(token)
            now = time.monotonic()
            if first_at is None:
                first_at = now
                metrics.ttft.observe(now - started)
            else:
                metrics.token_latency.observe(now - last_at)
            last_at = now
            if token in runner.eos_ids:
                finish = "stop"
                break
            stream.push(token)
            text = stream.text
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                stream.text = text[:cut]
                finish = "stop"
                break
            if len(text) - hold > emitted:
                handle._emit(Delta(text[emitted : len(text) - hold]))
                emitted = len(text) - hold
            if handle.cancelled:
                finish = "cancelled"
                break
            if len(generated) >= max_new:
                break
            if fast is not None:
                token = int(fast.step(token, position, seq, params.temperature, params.top_p).item())
            else:
                logits = runner.forward([token], torch.full((3, 1), position, dtype=torch.long), seq, kv)
                token = sample(logits, params.temperature, params.top_p, generator)
            position += 1
            seq += 1
        if fast is not None:  # the prefix cache keeps one format: copy the new tokens' KV back
            fast.store(kv, n_prompt, n_prompt + len(generated) - 1)
        if len(stream.text) > emitted:
            handle._emit(Delta(stream.text[emitted:]))
        metrics.generated_tokens.inc(len(generated))
        if len(generated) > 1 and last_at > first_at:
            metrics.decode_rate.observe((len(generated) - 1) / (last_at - first_at))

        # The last sampled token was never fed, so the cache holds prompt + generated[:-1].
        keys = keys + generated[:-1]
        if kv.get_seq_length() == len(keys):
            self.prefix.put(keys, kv, session)
        else:  # should not happen; never keep a cache whose keys we cannot vouch for
            log.warning("prefix cache length mismatch (%d vs %d); dropped", kv.get_seq_length(), len(keys))
        usage = Usage(n_prompt, reuse, len(generated), encoded)
        return Done(finish, stream.text, usage)
