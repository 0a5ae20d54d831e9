"""Start-up of the engine: load the model and warm it up (local), or connect to model servers (remote).

Runs on a background thread while the server already listens. Progress goes into the shared
`LoadStatus` (the page shows it, /health reports it). Any failure, in loading or in warm-up,
ends the process with one paragraph of advice instead of leaving it at "loading" or, worse,
reporting ready with a broken engine.
"""

from __future__ import annotations

import logging
import sys

from chat.config import Settings

log = logging.getLogger("vlchat")


def cpu_threads(asked: int) -> int:
    """Torch threads on the CPU: as asked, else one per core but one (left to the web server and the
    tokenizer, so they never wait on the model), at least 1 and at most 8 (more only adds contention)."""
    import os

    return asked if asked > 0 else max(1, min(8, len(os.sched_getaffinity(0)) - 1))


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _fail(ctx, server, message: str) -> None:
    ctx.status.fail(message)
    print(f"\nvlchat could not start: {message}\n", file=sys.stderr, flush=True)
    ctx.exit_code = 2
    server.should_exit = True


def start_engine(settings: Settings, store, ctx, server) -> None:
    """Load the model, start the worker and hand it to the page; on failure stop the server."""
    from chat.engine.adapters import LoraError, parse_specs
    from chat.engine.local.engine import Engine
    from chat.engine.local.loader import ModelLoadError, load
    from chat.engine.local.lora import load_adapters
    from chat.engine.local.runner import Runner
    from chat.images import open_clean

    status = ctx.status
    try:
        threads = cpu_threads(settings.cpu_threads)
        if settings.device == "cpu" or not _has_gpu():
            import torch

            torch.set_num_threads(threads)
            log.info("the model runs on the CPU with %d threads (--cpu-threads)", threads)
        status.set("loading")
        loaded = load(settings.model, settings.data_dir, settings.device, progress=status.set,
                      quantize=settings.quantize, max_gpu_memory=settings.max_gpu_memory)
        lora = load_adapters(parse_specs(settings.lora), loaded.model, loaded.name)
        engine = Engine(
            Runner(loaded.model, loaded.processor),
            lambda image_id: open_clean(store.image_bytes(image_id)),
            max_waiting=settings.max_waiting,
            max_context=settings.context_tokens,
            kv_cache_bytes=settings.kv_cache_mb << 20,
            feature_bytes=settings.feature_cache_mb << 20,
            max_batch_tokens=settings.max_batch_tokens,
            max_running=settings.max_running,
            max_running_per_owner=settings.max_running_per_owner,
            lora=lora,
        )
    except Exception as exc:  # whatever it is, the server must not sit at "loading" forever
        first = (str(exc).strip().splitlines() or [""])[0]
        message = str(exc) if isinstance(exc, ModelLoadError | LoraError) else (
            f"Starting the model failed ({exc.__class__.__name__}: {first}). Check --device and the GPU "
            "(nvidia-smi), or lower --context-tokens if the GPU is short of memory."
        )
        log.error("%s", message, exc_info=not isinstance(exc, ModelLoadError | LoraError))
        _fail(ctx, server, message)
        return
    ctx.model_name = ctx.api.model_name = loaded.name
    engine.sampling_defaults = loaded.sampling_defaults  # issue 14: page and API fill missing values from it
    status.set("warming-up")
    engine.start(warmup=True)
    engine.warmed.wait()
    if engine.warmup_error:
        engine.shutdown()
        _fail(ctx, server, f"Warming up the model failed: {engine.warmup_error} The details are in the log above.")
        return
    status.set("ready")
    placeholder = ctx.engine
    ctx.engine = ctx.api.engine = content_filtered(engine, settings)  # issue 14: --blocklist
    if placeholder is not None and hasattr(placeholder, "ready"):
        placeholder.ready.set()  # whoever waits on the stand-in learns the engine is ready


def content_filtered(engine, settings: Settings):
    """The engine behind the content filter (chat/engine/filtered.py), or itself without --blocklist."""
    if not settings.blocklist:
        return engine
    from chat.engine.filtered import FilteredEngine
    from chat.moderation import Blocklist

    blocklist = Blocklist.from_file(settings.blocklist)
    log.info("content filter: %d blocklist entries from %s", blocklist.size, settings.blocklist)
    return FilteredEngine(engine, blocklist)


def salt_secret(data_dir) -> bytes:
    """The key the remote engine's cache salts and conversation ids are HMACs under (from cookie.key, own label)."""
    import hashlib
    import hmac

    from chat.security import secret_file

    return hmac.new(secret_file(data_dir / "cookie.key"), b"vlchat upstream salts", hashlib.sha256).digest()


def start_remote_engine(settings: Settings, store, ctx) -> None:
    """--engine-url: no model here; answer with the model servers, and name the model once one is up."""
    from chat.engine.remote import RemoteEngine

    engine = RemoteEngine(
        settings.engine_urls, secret=salt_secret(settings.data_dir), load_image=store.image_bytes,
        key=settings.engine_key, model=settings.engine_model, session_header=settings.engine_session_header,
        first_token_seconds=settings.engine_first_token_seconds, max_waiting=settings.max_waiting,
    )
    engine.start()
    ctx.status.set("ready")
    placeholder = ctx.engine
    ctx.engine = ctx.api.engine = content_filtered(engine, settings)  # issue 14: --blocklist
    if placeholder is not None and hasattr(placeholder, "ready"):
        placeholder.ready.set()
    log.info("no model is loaded here: answers come from %s", ", ".join(u["url"] for u in engine.health()))
    engine.ready.wait()
    if engine.model_name:
        ctx.model_name = ctx.api.model_name = engine.model_name
