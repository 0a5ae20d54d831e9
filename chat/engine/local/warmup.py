"""Warm-up before the engine says ready: a two-turn conversation with an image runs through every path.

Turn 1 encodes an image and prefills; turn 2 reuses turn 1's blocks and prefills only its
suffix; both decode. Kernels load and allocator pools fill before the first real request, and
a model that cannot run fails here, before /health ever says ready. Warm-up counts in a
throwaway metrics registry and leaves no cached blocks, features or image sizes behind.
"""

from __future__ import annotations

import logging
import time

from PIL import Image

from chat.engine.handle import Handle
from chat.engine.metrics import Metrics
from chat.engine.types import ChatRequest, Done, GenParams

log = logging.getLogger(__name__)

FOLLOW_UP = "What else can you see in it, and where exactly is each thing in the picture? " * 3


def _add(engine, request: ChatRequest) -> Handle:
    handle = Handle(request, None)
    handle._state = "running"
    handle.prompt = engine.prompts.checked(request)
    engine.scheduler.add(engine._sequence(handle))
    return handle


def _run(engine, request: ChatRequest, decoding: ChatRequest | None = None) -> Done:
    """Serve `request` to its end; with `decoding`, that one is decoding already when `request` arrives, so
    the steps that mix a prefill chunk with decode rows run (and load their kernels) too."""
    other = None
    if decoding is not None:
        other = _add(engine, decoding)
        while other.result is None and not any(s.generated for s in engine.scheduler.running):
            engine._step(engine.metrics)  # its prefill, then it decodes
    handle = _add(engine, request)
    while handle.result is None or (other is not None and other.result is None):
        engine._step(engine.metrics)
    for h in (handle, other):
        if h is not None and not isinstance(h.result, Done):
            raise RuntimeError(h.result.message)
    return handle.result


def conversation(engine) -> None:
    """The warm-up conversation: an image and a question, then a follow-up on the cached prefix.

    Counted in a throwaway metrics registry; leaves no cached blocks, features or image sizes.
    """
    real_metrics, engine.metrics = engine.metrics, Metrics()
    # On a GPU a screenshot-sized picture, so the vision tower's kernels for real images are loaded too.
    size = (1280, 960) if engine.runner.device.type == "cuda" else (96, 64)
    image = {"warmup": Image.effect_mandelbrot(size, (-2, -1, 1, 1), 20).convert("RGB")}
    messages = [{"role": "user", "content": [{"type": "image", "image_id": "warmup"},
                                             {"type": "text", "text": "Describe."}]}]
    try:
        # Turn 1 arrives while another request decodes (a mixed step); turn 2 alone. With LoRA adapters loaded the
        # talker uses one, so steps with adapter rows (their prefill and mixed steps) are built here, not for the
        # first person who asks for an adapter; decode steps of both kinds are captured with the graphs.
        talker = ChatRequest([{"role": "user", "content": "Count."}], GenParams(temperature=0.0, max_new_tokens=24),
                             "warmup-talker", adapter=engine.adapters[0] if engine.adapters else "")
        for turn in range(2):
            done = _run(engine, ChatRequest(messages, GenParams(temperature=0.0, max_new_tokens=4), "warmup", image),
                        talker if turn == 0 else None)
            messages = messages + [{"role": "assistant", "content": done.text}, {"role": "user", "content": FOLLOW_UP}]
    finally:
        engine.metrics = real_metrics
        engine.pool.clear_cache()
        engine.vision.cache.clear()
        engine.prompts.clear()


def warm_up(engine) -> None:
    """Run the warm-up conversation (and on a GPU size the pool and capture); sets ready or warmup_error."""
    started = time.monotonic()
    try:
        conversation(engine)
    except Exception as exc:  # noqa: BLE001 - whatever broke, the engine must not report ready
        log.exception("warm-up failed")
        engine.warmup_error = f"{exc.__class__.__name__}: {exc}"
    if not engine.warmup_error and engine.runner.device.type == "cuda":
        _gpu_setup(engine)
    engine.warmup_seconds = time.monotonic() - started
    if not engine.warmup_error:
        log.info("warm-up done in %.1f s; ready", engine.warmup_seconds)
        engine.ready.set()
    engine.warmed.set()


def _gpu_setup(engine) -> None:
    """After the warm-up run: size the KV pool from the memory left, then capture the decode graphs.

    With compiled layer ops the conversation runs once more, so image and prompt steps have
    compiled too before anyone waits on them; if anything about the compiled ops fails, the plain
    ones are used (and if capturing fails as well, decode steps run eagerly).
    """
    import torch

    from chat.engine.local.graphs import DecodeGraphs
    from chat.engine.local.layer_ops import Ops

    if engine.auto_kv:
        engine.resize_pool(engine.auto_kv_bytes())
    step = engine.step_runner
    if step.offloaded:  # weights streamed in by accelerate's hooks mid-step cannot be replayed from a graph
        log.info("weights are partly offloaded (--max-gpu-memory): decode steps run without CUDA graphs")
        return
    max_blocks = -(-engine.max_context // engine.pool.block_size)
    for compiled in (True, False):  # compiled layer ops if this GPU's toolchain can build them
        started = time.monotonic()
        try:
            step.ops = Ops(compiled)
            graphs = DecodeGraphs(step, engine.scheduler.max_running, max_blocks)
            graphs.capture()
            engine.graphs = graphs
            if compiled:
                conversation(engine)
            log.info("captured decode graphs for batch sizes %s in %.1f s (layer ops %s)", graphs.sizes,
                     time.monotonic() - started, "compiled" if compiled else "plain")
            return
        except Exception:  # noqa: BLE001 - fall back: plain ops, then no graphs at all
            log.exception("decode graph capture failed with %s layer ops", "compiled" if compiled else "plain")
            engine.graphs = None
            torch.cuda.empty_cache()
    step.ops = Ops(False)
    log.warning("decode steps run eagerly (slower)")
