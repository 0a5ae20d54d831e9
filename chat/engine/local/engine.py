"""The local engine: one thread that owns the model and serves every request in one running batch.

Callers `submit()` a ChatRequest and get a Handle (handle.py): events (Delta, then Done or
Failed) and `cancel()`. `submit()` renders and tokenizes the prompt in the caller's thread,
after refusing text too long for the context by its length alone, so a huge prompt never
stalls the worker. The queue of requests not yet running is bounded (Busy at once when full).

The loop, one step at a time (continuous batching):
    take new requests -> drop cancelled ones (their blocks go back at once) -> the scheduler
    plans the step (every decoding sequence's next token plus prefill chunks, under a token
    budget) -> images reached by a prefill chunk are encoded (or found in the features cache)
    -> one packed forward over the paged KV pool -> one batched sample -> tokens become text
    -> events; finished sequences give their blocks back (full ones stay cached by name).
Nobody waits for another answer to finish. Prefix reuse is block-level and owner-salted
(kv.py), so turn 2 of a conversation computes only its new tokens, and only for its owner.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import torch
from PIL import Image

from chat.engine.handle import Handle
from chat.engine.local.batch import pack
from chat.engine.local.features import Vision
from chat.engine.local.intake import PromptBuilder
from chat.engine.local.kv import BlockPool, KVTensors, pool_blocks
from chat.engine.local.prompt import Prompt
from chat.engine.local.retry import OUT_OF_MEMORY
from chat.engine.local.sampling import sample
from chat.engine.local.scheduler import Scheduler, StepPlan
from chat.engine.local.sequence import Sequence
from chat.engine.local.step import ModelStep
from chat.engine.metrics import Metrics
from chat.engine.types import (
    Busy,
    ChatRequest,
    ContextTooLong,
    Done,
    Event,
    Failed,
    GenerationFailed,
    NotReady,
    ShuttingDown,
    UnknownAdapter,
    Usage,
)

log = logging.getLogger(__name__)

_STOP = object()
_WARMUP = object()
GENERIC_FAILURE = "The model failed while answering; the error is in the server log."
BLOCK_SIZE = 16


class Engine:
    """The shared model worker used by both the page and the API."""

    def __init__(
        self,
        runner,
        fetch_image: Callable[[str], Image.Image],
        *,
        max_waiting: int = 16,
        max_context: int = 32768,
        kv_cache_bytes: int = 0,
        feature_bytes: int = 1 << 30,
        max_batch_tokens: int = 1024,
        max_running: int = 64,
        max_running_per_owner: int = 16,
        block_size: int = BLOCK_SIZE,
        lora=None,
    ) -> None:
        self.runner = runner
        self.metrics = Metrics()
        self.max_context = min(max_context, runner.max_context)
        self.vision = Vision(runner, fetch_image, feature_bytes)
        model = runner.model
        cfg = model.config.get_text_config()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dtype = next(model.parameters()).dtype
        shape = (cfg.num_hidden_layers, block_size, cfg.num_key_value_heads, head_dim)
        block_bytes = KVTensors.block_bytes(*shape, dtype)
        self._kv_shape, self._kv_dtype, self._block_bytes = shape, dtype, block_bytes
        # On a GPU with no size given, the pool is sized after warm-up from what is free then (the
        # warm-up runs on a small one); anywhere else it is allocated at its final size now.
        self.auto_kv = kv_cache_bytes <= 0 and runner.device.type == "cuda"
        if kv_cache_bytes <= 0:
            kv_cache_bytes = 1 << 30 if not self.auto_kv else 0
        blocks = pool_blocks(kv_cache_bytes, block_bytes, self.max_context, block_size)
        self.kv = KVTensors(shape[0], blocks, block_size, shape[2], shape[3], dtype, runner.device)
        self.pool = BlockPool(blocks, block_size)
        self.scheduler = Scheduler(self.pool, max_batch_tokens, max_running, max_running_per_owner)
        self.lora = lora  # LoRA adapters served side by side (lora.py), or None
        self.adapters: tuple[str, ...] = lora.names if lora is not None else ()
        self.step_runner = ModelStep(model, self.kv, lora=lora)
        self.graphs = None  # CUDA graphs for decode-only steps, captured by warm-up on a GPU
        if runner.device.type == "cuda":
            from chat.engine.local.graphs import TritonAttention

            self.step_runner.attention = TritonAttention(self.kv, self.step_runner.layers[0].self_attn.scaling)
        self.feature_bytes = feature_bytes
        self.metrics.kv_blocks_total.set(self.pool.total)
        self._log_pool()
        self.ready = threading.Event()  # set once warm-up succeeded: submit() accepts work
        self.warmed = threading.Event()  # set when warm-up ended, well or not
        self.warmup_error = ""
        self.warmup_seconds: float | None = None
        self.max_waiting = max_waiting
        self._waiting = 0
        self._admit = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._draining = False
        self._live: set[Handle] = set()
        self.prompts = PromptBuilder(runner, self.vision, self.max_context)
        self._thread = threading.Thread(target=self._loop, name="vlchat-worker", daemon=True)

    def _log_pool(self) -> None:
        s = self.scheduler
        log.info("KV pool: %d blocks of %d tokens (%.2f GiB, %d tokens); up to %d tokens per step, %d running "
                 "(%d per owner)", self.pool.total, self.pool.block_size, self.kv.nbytes / 2**30,
                 self.pool.total * self.pool.block_size, s.max_batch_tokens, s.max_running, s.max_per_owner)

    def resize_pool(self, kv_bytes: int) -> None:
        """Reallocate the (empty) KV pool at `kv_bytes`; only between requests (warm-up does it)."""
        layers, bs, heads, dim = self._kv_shape
        blocks = pool_blocks(kv_bytes, self._block_bytes, self.max_context, bs)
        self.kv.k = self.kv.v = None
        if self.runner.device.type == "cuda":
            torch.cuda.empty_cache()
        fresh = KVTensors(layers, blocks, bs, heads, dim, self._kv_dtype, self.runner.device)
        self.kv.k, self.kv.v = fresh.k, fresh.v  # the same object: the runner and kernels keep theirs
        self.pool = BlockPool(blocks, bs)
        self.scheduler.pool = self.pool
        self.metrics.kv_blocks_total.set(self.pool.total)
        self._log_pool()

    def auto_kv_bytes(self) -> int:
        """The pool size from free GPU memory: what is left after a working reserve and the features cache."""
        free = torch.cuda.mem_get_info(self.runner.device)[0] + self.kv.nbytes
        reserve = (3 << 30) + self.feature_bytes
        return max(256 << 20, int((free - reserve) * 0.95))

    # -- caller side ------------------------------------------------------------------------------

    def start(self, warmup: bool = True) -> None:
        """Start the worker thread; it warms up, then reports ready."""
        self._thread.start()
        if warmup:
            self._queue.put(_WARMUP)
        else:
            self.warmed.set()
            self.ready.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the worker after the step in hand."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet in the running batch."""
        return self._waiting

    def submit(self, request: ChatRequest, on_finish: Callable[[Event], None] | None = None) -> Handle:
        """Render the prompt (in the caller's thread) and queue the request.

        Raises NotReady before warm-up ends, ShuttingDown while stopping and Busy when the queue
        is full. A prompt that cannot fit comes back as a handle already finished with a Failed
        event (code context_length_exceeded).
        """
        if self._draining:
            raise ShuttingDown()
        if not self.ready.is_set():
            raise NotReady()
        if request.adapter and request.adapter not in self.adapters:
            raise UnknownAdapter(request.adapter, self.adapters)
        return self._enqueue(request, on_finish)

    def _enqueue(self, request: ChatRequest, on_finish) -> Handle:
        with self._admit:
            if self._waiting >= self.max_waiting:
                raise Busy(self._waiting)
            self._waiting += 1
            self.metrics.waiting.set(self._waiting)
        handle = Handle(request, on_finish, self._release)
        try:
            handle.prompt = self.prompts.checked(request)
        except ContextTooLong as exc:
            handle._claim()  # frees the slot; the request never reaches the worker
            handle._finish(Failed(str(exc), exc.code))
            return handle
        except Exception:  # a missing image, a template error
            log.exception("rendering the prompt failed")
            handle._claim()
            handle._finish(Failed(GENERIC_FAILURE, GenerationFailed.code))
            return handle
        with self._admit:
            self._live.add(handle)
        self._queue.put(handle)
        return handle

    def _release(self) -> None:
        with self._admit:
            self._waiting -= 1
            self.metrics.waiting.set(self._waiting)

    def drain(self) -> int:
        """Stopping: refuse new work and end every open request with a ShuttingDown failure; how many."""
        self._draining = True
        with self._admit:
            live = list(self._live)
        for handle in live:
            handle.cancel(shutting_down=True)
        return len(live)

    def build_prompt(self, messages: list[dict], inline: dict | None = None) -> Prompt:
        """Render messages to a Prompt (see intake.py)."""
        return self.prompts.build(messages, inline)

    # -- worker side ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            if not self._take(block=len(self.scheduler) == 0):
                return
            try:
                self._drop_cancelled()
                if len(self.scheduler):
                    self._step(self.metrics)
            except Exception:  # last line of defence: the thread must outlive any one step
                log.exception("engine step failed outside generation")
                for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
                    self._finish(seq, Failed(GENERIC_FAILURE, GenerationFailed.code, seq.output.text))

    def _take(self, block: bool) -> bool:
        """Move submitted requests into the scheduler; False when told to stop."""
        while True:
            try:
                item = self._queue.get(timeout=None) if block else self._queue.get_nowait()
            except queue.Empty:
                return True
            block = False
            if item is _STOP:
                return False
            if item is _WARMUP:
                self._run_warmup()
                continue
            if item.result is not None:  # cancelled while queued: already finished
                with self._admit:
                    self._live.discard(item)
                continue
            self.scheduler.add(self._sequence(item))

    def _sequence(self, handle: Handle) -> Sequence:
        seq = Sequence(handle, handle.prompt, self.pool.block_size, self.max_context, self.runner.eos_ids,
                       self.runner.processor.tokenizer, self.runner.token_table)
        if self.lora is not None:
            seq.adapter_index = self.lora.index.get(handle.request.adapter, 0)
        if seq.params.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device).manual_seed(seq.params.seed)
        return seq

    def _drop_cancelled(self) -> None:
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            if seq.handle.cancelled:
                self._finish(seq, "cancelled")

    def _step(self, metrics: Metrics) -> None:
        plan = self.scheduler.schedule()
        metrics.preemptions.inc(len(plan.preempted))
        for position, seq in enumerate(self.scheduler.waiting):  # queue positions, for the page's status line
            seq.handle.ahead = position
        for chunk in list(plan.chunks):  # newly admitted: claim them (a cancel may have won the race)
            handle = chunk.seq.handle
            handle.ahead = None
            if handle._state == "queued":
                if not handle._claim():
                    plan.chunks.remove(chunk)
                    self.scheduler.finish(chunk.seq)
                    continue
                metrics.queue_wait.observe(time.monotonic() - handle.enqueued)
        try:
            if not plan.decode_only:
                self.vision.prepare(plan, self.metrics)
            if not plan.chunks:
                self._unblock()
                return
            metrics.running.set(len(self.scheduler.running))
            metrics.batch_tokens.observe(plan.tokens)
            if self.graphs is not None and self.graphs.fits(plan):
                logits = self.graphs.run(plan)
            else:
                logits = self.step_runner.forward(pack(plan, self.pool.block_size, self.runner.device))
        except torch.cuda.OutOfMemoryError as exc:
            log.warning("out of GPU memory in a step of %d tokens (%s)", plan.tokens, str(exc))
            self._out_of_memory(plan)
            return
        except Exception:
            log.exception("generation failed")
            for chunk in plan.chunks:  # a retry after running out of memory keeps that message: it is actionable
                message = OUT_OF_MEMORY if chunk.seq.notice else GENERIC_FAILURE
                self._finish(chunk.seq, Failed(message, GenerationFailed.code, chunk.seq.output.text))
            return
        sampled = [c.seq for c in plan.chunks if c.samples]
        tokens = sample(logits, [s.params for s in sampled], [s.generated for s in sampled],
                        [s.generator for s in sampled]) if sampled else []
        for chunk in plan.chunks:
            seq = chunk.seq
            seq.computed += chunk.length
            names = seq.block_names(seq.computed)
            for i in range(seq.named, len(names)):
                self.pool.name(seq.blocks[i], names[i])
            seq.named = len(names)
            if seq.computed >= seq.n_prompt:
                seq.features = {}  # prefill done: let the features cache decide what stays
        for seq, token in zip(sampled, tokens, strict=True):
            self._advance(seq, token, metrics)
        metrics.kv_blocks_used.set(self.pool.used)
        metrics.kv_blocks_cached.set(self.pool.cached)
        metrics.running.set(len(self.scheduler.running))

    def _advance(self, seq: Sequence, token: int, metrics: Metrics) -> None:
        first = seq.first_token_at is None
        before = seq.last_token_at
        delta = seq.append(token)
        if first:
            metrics.ttft.observe(seq.first_token_at - seq.handle.enqueued)
        elif before is not None:
            metrics.token_latency.observe(seq.last_token_at - before)
        if delta:
            seq.handle._emit_text(delta)
        if seq.finish_reason is not None:
            self._finish(seq, seq.finish_reason)
        elif seq.handle.cancelled:
            self._finish(seq, "cancelled")

    def _finish(self, seq: Sequence, outcome: str | Failed) -> None:
        """End a sequence: blocks back to the pool, usage and metrics, the final event."""
        self.scheduler.finish(seq)
        handle = seq.handle
        with self._admit:
            self._live.discard(handle)
        if handle.result is not None:  # cancelled while it waited: its caller already has the answer
            return
        if handle._state == "queued":
            handle._claim()
        if seq.output.emitted < len(seq.output.text):
            handle._emit_text(seq.output.flush())
        usage = Usage(seq.n_prompt, max(seq.cached_tokens, 0), len(seq.generated), seq.images_encoded)
        if isinstance(outcome, Failed):
            result: Done | Failed = outcome if outcome.text else Failed(outcome.message, outcome.code, handle._text)
        elif outcome == "cancelled" and handle.shutting_down:
            result = Failed(str(ShuttingDown()), ShuttingDown.code, seq.output.text)
        else:
            result = Done(outcome, seq.output.text, usage, notice=seq.notice)
        decoding = seq.last_token_at - seq.first_token_at if len(seq.generated) > 1 else 0.0
        self.metrics.finished(result.finish_reason if isinstance(result, Done) else "error", seq.n_prompt,
                              seq.cached_tokens, len(seq.generated), decoding)
        handle._finish(result)

    def _unblock(self) -> None:
        """Nothing could run: a waiting request that can never fit the pool is refused (else wait a moment)."""
        for seq in list(self.scheduler.waiting):
            if not self.scheduler.fits_pool(len(seq.tokens) + seq.max_new):
                self._finish(seq, Failed("This conversation needs more KV memory than the server has; start a new "
                                         "chat or ask for a shorter answer.", ContextTooLong.code))
                return
        time.sleep(0.001)

    def _out_of_memory(self, plan: StepPlan) -> None:
        from chat.engine.local.retry import after_out_of_memory

        after_out_of_memory(self, plan)

    def _warmup(self) -> None:
        from chat.engine.local.warmup import warm_up

        warm_up(self)

    def _run_warmup(self) -> None:
        try:
            self._warmup()
        except Exception as exc:  # noqa: BLE001 - the starter must hear of it, and the thread must live
            log.exception("warm-up failed")
            self.warmup_error = self.warmup_error or f"{exc.__class__.__name__}: {exc}"
        finally:
            self.warmed.set()

    @property
    def max_prompt_chars(self) -> int:
        """Text longer than this many characters cannot fit the context, whatever it tokenizes to."""
        return self.prompts.max_chars
