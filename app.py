"""vlchat entry point: settings -> store + engine -> one FastAPI app (page at /, /health, /metrics) -> uvicorn.

The server listens at once; the model loads and warms up in the background, and /health says
503 until it is ready. A model that cannot be loaded ends the process with one paragraph that
says what to do.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import sys
import threading
from pathlib import Path

from chat.boot import start_engine
from chat.config import Settings, load_settings

log = logging.getLogger("vlchat")


class _NotLoaded:
    """Stands in for the engine until the model is ready."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.waiting = 0

    def submit(self, *args, **kwargs):
        from chat.engine.types import NotReady

        raise NotReady()


class NoSideDoors:
    """ASGI middleware closing Gradio's direct-call routes.

    The page talks to Gradio through its queue (/gradio_api/queue/...; every page event is
    queued, none uses queue=False). Gradio's other ways to call an event directly are closed:
    programs use /v1, with its keys and limits. Pure ASGI (not BaseHTTPMiddleware), so streaming
    and client-disconnect detection pass through untouched.
    """

    CLOSED = ("/gradio_api/call/", "/gradio_api/run/", "/gradio_api/api/")

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.CLOSED):
            body = b'{"error": "Not available; use the page, or the /v1 API."}'
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 404, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def browser_key(data_dir: Path) -> str:
    """The key that encrypts browser identities; kept in the data folder so it survives restarts."""
    path = data_dir / "browser.key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def api_policy(settings: Settings) -> tuple[bool, str]:
    """Whether /v1 may serve, and why not: without a key it is open only on loopback (or by --api-open)."""
    if settings.api_keys or settings.api_open:
        return True, ""
    host = settings.host.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return True, ""
    return False, (f"The API is off: this server listens on {settings.host} and has no API key. Restart it with "
                   "--api-key KEY (or VLCHAT_API_KEY), or with --api-open to serve /v1 to anyone who can reach it.")


def create_app(settings: Settings):
    """The FastAPI app with the page mounted; returns (app, ctx, store)."""
    os.environ.setdefault("GRADIO_TEMP_DIR", str((settings.data_dir / "gradio").resolve()))
    import gradio as gr
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    from chat import page, ui
    from chat.api import ApiError, ApiState, router
    from chat.engine.types import LoadStatus
    from chat.store import Store

    store = Store(settings.data_dir)
    recovered = store.recover_interrupted()
    if recovered:
        log.info("marked %d answers interrupted by the last shutdown", recovered)
    ctx = ui.Ctx(store=store, engine=_NotLoaded(), settings=settings, random_weights=settings.model == "tiny-random",
                 model_name=settings.model, status=LoadStatus())
    app = FastAPI(title="vlchat", docs_url=None, redoc_url=None, openapi_url=None)
    is_open, reason = api_policy(settings)
    if not is_open:
        log.warning("%s", reason)
    ctx.api = ApiState(settings=settings, engine=ctx.engine, model_name=settings.model, keys=settings.api_keys,
                       open=is_open, closed_reason=reason)
    app.include_router(router(ctx.api))

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        if not request.url.path.startswith("/v1"):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        kind = {404: ("Unknown route.", "not_found"), 405: ("Method not allowed on this route.", "method_not_allowed")}
        message, code = kind.get(exc.status_code, (str(exc.detail), None))
        return ApiError(exc.status_code, message, "invalid_request_error", code=code).response()

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return ApiError(500, "Internal error; the details are in the server log.", "server_error").response()

    @app.get("/health")
    def health():
        engine = ctx.engine
        body = {"status": "ok" if engine.ready.is_set() else "loading", "model": ctx.model_name,
                "waiting": engine.waiting}
        return JSONResponse(body, status_code=200 if engine.ready.is_set() else 503)

    @app.get("/metrics")
    def metrics():
        registry = getattr(ctx.engine, "metrics", None)
        data = registry.render() if registry is not None else b""
        return Response(data, media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(NoSideDoors)
    hours = settings.gradio_cache_hours * 3600
    demo = page.build(ctx, browser_key(settings.data_dir), delete_cache=(min(hours, 3600), hours))
    demo.queue(api_open=False, max_size=settings.max_waiting * 4, default_concurrency_limit=None)
    auth = tuple(settings.auth.split(":", 1)) if settings.auth else None
    app = gr.mount_gradio_app(
        app, demo, path="/", auth=auth, show_error=False, max_file_size=settings.max_image_bytes,
        allowed_paths=[str(store.images_dir)],
        blocked_paths=[str(settings.data_dir / "vlchat.db"), str(settings.data_dir / "models"),
                       str(settings.data_dir / "browser.key")],
        footer_links=[], ssr_mode=False, run_history=False,
    )
    return app, ctx, store


def main(argv: list[str] | None = None) -> int:
    """Run the server until interrupted."""
    settings = load_settings(argv)
    if settings.auth and ":" not in settings.auth:
        print("vlchat could not start: --auth (VLCHAT_AUTH) must look like user:password.", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    import uvicorn

    app, ctx, store = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning"))
    threading.Thread(target=start_engine, args=(settings, store, ctx, server), name="vlchat-load", daemon=True).start()
    log.info("serving on http://%s:%d (the model loads in the background; /health says when ready)",
             settings.host, settings.port)
    server.run()
    if getattr(ctx.engine, "shutdown", None):
        ctx.engine.shutdown()
    store.close()
    return ctx.exit_code


if __name__ == "__main__":
    sys.exit(main())
