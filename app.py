"""vlchat entry point: settings -> store + engine -> one FastAPI app (page at /, /health, /metrics) -> uvicorn.

The server listens at once; the model loads and warms up in the background, and /health says
503 until it is ready. A model that cannot be loaded ends the process with one paragraph that
says what to do. The guards around the app (headers, identity cookie, closed routes, uploads,
slow clients, login throttle) are in `chat.security` and `chat.webguard`; SIGTERM drains open
answers, stops the engine, then closes the database (`chat.serving`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
import threading
from pathlib import Path

from chat.boot import start_engine, start_remote_engine
from chat.config import Settings, load_settings

log = logging.getLogger("vlchat")
ASSETS = Path(__file__).resolve().parent / "assets"


class _NotLoaded:
    """Stands in for the engine until the model is ready."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.waiting = 0

    def submit(self, *args, **kwargs):
        from chat.engine.types import NotReady

        raise NotReady()


def legacy_browser_key(data_dir: Path) -> str | None:
    """The key older pages encrypted browser identities with (Gradio BrowserState), if there is one.

    It is never sent to a client any more; it only decrypts an old identity on its first visit.
    """
    path = data_dir / "browser.key"
    return path.read_text().strip() if path.exists() else None


def local_theme():
    """Gradio's default look with fonts served by this server or the system's: nothing from Google Fonts."""
    import gradio as gr

    return gr.themes.Default(
        font=[gr.themes.LocalFont("Source Sans Pro", weights=(400, 600)), "ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=[gr.themes.LocalFont("IBM Plex Mono", weights=(400, 600)), "ui-monospace", "Consolas", "monospace"],
    )


def health_body(ctx) -> tuple[dict, int]:
    """/health's answer: ok (200), loading with phase and progress (503), or failed with the reason (503)."""
    status = ctx.status
    upstreams = getattr(ctx.engine, "health", None)
    if ctx.engine.ready.is_set():
        state = "ok"
    elif status.phase == "failed":
        state = "failed"
    else:
        state = "unavailable" if upstreams is not None else "loading"
    body = {"status": state, "model": ctx.model_name, "waiting": ctx.engine.waiting, "phase": status.phase,
            "progress": None if status.fraction is None else round(status.fraction, 3)}
    if state == "failed":
        body["error"] = status.error
    if upstreams is not None:  # --engine-url: each model server's state
        body["upstreams"] = upstreams()
        body["phase"] = "ready" if state == "ok" else "unreachable"
        if state == "unavailable":
            body["error"] = ctx.engine.state_line()
    return body, 200 if state == "ok" else 503


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
    """The FastAPI app with the page mounted, wrapped in the web guards; returns (app, ctx, store)."""
    os.environ.setdefault("GRADIO_TEMP_DIR", str((settings.data_dir / "gradio").resolve()))
    import gradio as gr
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException
    from starlette.requests import Request

    from chat import page, ui
    from chat.api import ApiError, ApiState, router
    from chat.cors import ApiHeaders, parse_origins
    from chat.engine.types import LoadStatus
    from chat.security import CookieSigner, IdentityCookies, LoginThrottle, bearer_ok, secret_file
    from chat.store import Store
    from chat.webguard import BodyTimeout, NoSideDoors, SecurityHeaders, UploadFilter

    store = Store(settings.data_dir)
    recovered = store.recover_interrupted()
    if recovered:
        log.info("marked %d answers interrupted by the last shutdown", recovered)
    remote = bool(settings.engine_urls)
    tiny = (settings.engine_model if remote else settings.model) == "tiny-random"
    ctx = ui.Ctx(store=store, engine=_NotLoaded(), settings=settings, random_weights=tiny,
                 model_name=(settings.engine_model or "vlchat") if remote else settings.model, status=LoadStatus())
    expose_docs = getattr(settings, "expose_docs", False)
    docs = {"docs_url": "/docs", "redoc_url": "/redoc", "openapi_url": "/openapi.json"} if expose_docs else \
        {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="vlchat", **docs)
    is_open, reason = api_policy(settings)
    if not is_open:
        log.warning("%s", reason)
    ctx.api = ApiState(settings=settings, engine=ctx.engine, model_name=ctx.model_name, keys=settings.api_keys,
                       open=is_open, closed_reason=reason)
    from chat.ratelimit_gate import Gate

    ctx.limits = ctx.api.limits = Gate.from_settings(settings)  # issue 14: --rate-limit, --token-limit
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
        body, status = health_body(ctx)
        return JSONResponse(body, status_code=status)

    metrics_locked = getattr(settings, "metrics_key_required", False)
    if metrics_locked and not settings.api_keys:
        log.warning("--metrics-key-required without --api-key: /metrics answers 401 to everyone")

    def metrics(request: Request) -> Response:
        if metrics_locked and not bearer_ok(request.headers, settings.api_keys):
            return JSONResponse({"error": "/metrics needs an API key: send 'Authorization: Bearer <key>'."},
                                status_code=401, headers={"www-authenticate": "Bearer"})
        registry = getattr(ctx.engine, "metrics", None)
        data = registry.render() if registry is not None else b""
        data += ctx.limits.render()  # vlchat_rate_limited_total (chat/ratelimit_gate.py)
        return Response(data, media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_route("/metrics", metrics, methods=["GET"])

    hours = settings.gradio_cache_hours * 3600
    legacy_key = legacy_browser_key(settings.data_dir)
    from chat import admin
    from chat.accounts import Accounts

    ctx.accounts = accounts = Accounts(settings)  # issue 14: --auth, --users or the proxy's header; admins
    admin.add_route(app, ctx, accounts)  # GET /admin/usage
    demo = page.build(ctx, delete_cache=(min(hours, 3600), hours))
    demo.queue(api_open=False, max_size=settings.max_waiting * 4, default_concurrency_limit=None)
    options = dict(page.mount_options(ctx))
    migrate_js = (ASSETS / "migrate-identity.js").read_text()
    options["head"] = f"<script>{migrate_js}</script>" + options.get("head", "")
    options.setdefault("theme", local_theme())
    data = settings.data_dir
    app = gr.mount_gradio_app(
        app, demo, path="/", **accounts.mount_options(), show_error=False, max_file_size=settings.max_image_bytes,
        allowed_paths=[str(store.images_dir)],
        blocked_paths=[str(data / "vlchat.db"), str(data / "models"), str(data / "browser.key"),
                       str(data / "cookie.key"), str(data / "migrated-identities")],
        footer_links=[], ssr_mode=False, run_history=False, enable_monitoring=expose_docs, **options,
    )
    accounts.attach(app)  # its login tokens name the user behind a cookie (for /admin/usage)
    signer = CookieSigner(secret_file(data / "cookie.key"))
    # Innermost first; the outermost (SecurityHeaders) also marks the guards' own answers.
    guarded = UploadFilter(app, limit=settings.max_image_bytes * settings.max_images_per_message + (1 << 20),
                           max_files=settings.max_images_per_message)
    guarded = IdentityCookies(guarded, signer, legacy_key, data / "migrated-identities",
                              secure=getattr(settings, "cookie_secure", False))
    guarded = LoginThrottle(guarded, getattr(settings, "login_failures_per_minute", 5))
    guarded = NoSideDoors(guarded, expose_docs=expose_docs)
    guarded = BodyTimeout(guarded, getattr(settings, "body_timeout_seconds", 30))
    guarded = ApiHeaders(guarded, parse_origins(getattr(settings, "cors_origins", "")))  # /v1: x-request-id, CORS
    guarded = SecurityHeaders(guarded, csp_exempt=("/docs", "/redoc") if expose_docs else ())
    return guarded, ctx, store


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGTERM or Ctrl-C; then drain open answers, stop the engine, close the database."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["users"]:  # issue 14: python app.py users add NAME [--admin] (chat.users)
        from chat.users import main as users_main

        return users_main(args[1:])
    settings = load_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    from chat.serving import make_server, quiet_signals_after_run

    app, ctx, store = create_app(settings)

    def drain() -> None:
        stop = getattr(ctx.engine, "drain", None)
        if stop is not None:
            log.info("stopping: open answers end with 'the server is restarting'")
            stop()

    server = make_server(app, settings.host, settings.port,
                         grace_seconds=getattr(settings, "shutdown_grace_seconds", 5),
                         header_timeout=getattr(settings, "header_timeout_seconds", 15), on_shutdown=drain)
    if settings.engine_urls:
        threading.Thread(target=start_remote_engine, args=(settings, store, ctx), name="vlchat-load",
                         daemon=True).start()
    else:
        threading.Thread(target=start_engine, args=(settings, store, ctx, server), name="vlchat-load",
                         daemon=True).start()
    log.info("serving on http://%s:%d (%s; /health says when ready)", settings.host, settings.port,
             "answers come from --engine-url" if settings.engine_urls else "the model loads in the background")
    quiet_signals_after_run()
    server.run()
    if getattr(ctx.engine, "shutdown", None):
        ctx.engine.shutdown()
    store.close()
    log.info("stopped")
    return ctx.exit_code


if __name__ == "__main__":
    status = main()
    # Everything is stopped and closed; skip the interpreter's teardown of torch and friends, which
    # takes seconds on a busy machine (SIGTERM must end the process well inside `docker stop`'s 10).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
