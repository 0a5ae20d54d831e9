"""Settings: one frozen dataclass, parsed once at startup and passed down.

Every field has a default and a help line; each is a command-line flag (`--max-waiting`) and
an environment variable (`VLCHAT_MAX_WAITING`). A flag beats the variable, which beats the
default. `python app.py --help` prints the table.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from chat.engine.types import GenParams


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class Settings:
    """All limits and switches of one vlchat server."""

    host: str = _opt("0.0.0.0", "Interface to listen on.")
    port: int = _opt(8080, "Port to listen on.")
    model: str = _opt(
        "Qwen/Qwen3-VL-8B-Instruct",
        "Hub id or local folder of a Qwen3-VL checkpoint; 'tiny-random' builds a random-weight test model.",
    )
    data_dir: Path = _opt(Path("data"), "Folder for the SQLite history, stored images and the tiny model.")
    device: str = _opt("auto", "'auto' (GPU if present), 'cuda' or 'cpu'.")
    auth: str = _opt("", "user:password for the page (Gradio auth); conversations then belong to the user.")
    api_key: str = _opt("", "Key(s) the /v1 API requires as 'Authorization: Bearer KEY'; several separated by commas.")
    api_open: bool = _opt(False, "Serve /v1 without a key on a non-loopback address (otherwise it is refused).")
    max_waiting: int = _opt(16, "Requests that may wait for the model; more get an immediate 'busy'.")
    context_tokens: int = _opt(32768, "Longest conversation (prompt + answer) in tokens.")
    default_max_new_tokens: int = _opt(1024, "Default answer length limit in tokens.")
    max_new_tokens_limit: int = _opt(4096, "Largest answer length a request may ask for.")
    max_image_bytes: int = _opt(20_000_000, "Largest image upload in bytes.")
    max_image_pixels: int = _opt(40_000_000, "Largest image in pixels (width x height), checked before decoding.")
    max_body_bytes: int = _opt(50_000_000, "Largest /v1 request body in bytes (images travel inside it).")
    max_images_per_message: int = _opt(8, "Images one message may carry.")
    max_images_per_conversation: int = _opt(32, "Images one conversation may hold.")
    prefix_cache_entries: int = _opt(8, "Conversations whose KV state is kept for reuse across turns.")
    prefix_cache_mb: int = _opt(
        0, "Memory budget for kept KV state, in MiB; 0 sizes it at start-up from free GPU memory (2 GiB on CPU)."
    )
    feature_cache_mb: int = _opt(1024, "Memory budget for kept vision features, in MiB.")
    max_message_chars: int = _opt(100_000, "Longest text of one page message, in characters.")
    gradio_cache_hours: int = _opt(1, "Gradio's temporary upload files older than this are deleted.")
    metrics_key_required: bool = _opt(False, "/metrics requires an API key ('Authorization: Bearer KEY').")
    expose_docs: bool = _opt(False, "Serve the OpenAPI schemas, /docs and Gradio's /monitoring (off: 404).")
    login_failures_per_minute: int = _opt(
        5, "Failed page logins one address may make per minute; more get 429 (0: no limit)."
    )
    cookie_secure: bool = _opt(False, "Mark the browser-identity cookie Secure (set it when served over HTTPS).")
    shutdown_grace_seconds: int = _opt(5, "On SIGTERM, seconds open answers get to end before the server stops.")
    header_timeout_seconds: int = _opt(15, "Seconds a client may take to send a request's headers.")
    body_timeout_seconds: int = _opt(30, "Seconds a client may take to send a request's body.")
    log_level: str = _opt("INFO", "Logging level.")

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The configured API keys."""
        return tuple(k.strip() for k in self.api_key.split(",") if k.strip())

    def clamp_params(
        self, temperature: float | None, top_p: float | None, max_new_tokens: int | None, **extra
    ) -> GenParams:
        """Sampling settings within safe bounds (missing values take the defaults)."""
        t = 0.7 if temperature is None else min(max(float(temperature), 0.0), 2.0)
        p = 0.9 if top_p is None else min(max(float(top_p), 0.01), 1.0)
        n = self.default_max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        n = min(max(n, 1), self.max_new_tokens_limit)
        return GenParams(temperature=t, top_p=p, max_new_tokens=n, **extra)


def _env_name(name: str) -> str:
    return "VLCHAT_" + name.upper()


def parser() -> argparse.ArgumentParser:
    """The command line, built from the Settings fields."""
    ap = argparse.ArgumentParser(
        prog="app.py",
        description="vlchat: multi-turn visual chat over Qwen3-VL, with a web page and an OpenAI-compatible API.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in fields(Settings):
        default = f.default if f.default is not MISSING else None
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{f.metadata['help']} [env {_env_name(f.name)}]"
        if isinstance(default, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        else:
            ap.add_argument(flag, type=type(default) if not isinstance(default, Path) else Path, default=default,
                            help=help_)
    return ap


def load_settings(argv: list[str] | None = None, environ: dict | None = None) -> Settings:
    """Defaults, overridden by VLCHAT_* variables, overridden by flags."""
    environ = os.environ if environ is None else environ
    ap = parser()
    for f in fields(Settings):
        value = environ.get(_env_name(f.name))
        if value is not None:
            if isinstance(f.default, bool):
                parsed = value.strip().lower() in ("1", "true", "yes", "on")
            else:
                parsed = (Path if f.type in ("Path", Path) else type(f.default))(value)
            ap.set_defaults(**{f.name: parsed})
    return Settings(**vars(ap.parse_args(argv)))
