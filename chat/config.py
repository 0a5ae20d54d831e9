"""Settings: one frozen dataclass, parsed and validated once at startup and passed down.

Every field has a default and a help line; each is a command-line flag (`--max-waiting`) and
an environment variable (`VLCHAT_MAX_WAITING`). A flag beats the variable, which beats the
default. `python app.py --help` prints the table.

Flags and variables are parsed by the same code, so `--port abc` and `VLCHAT_PORT=abc` get the
same sentence. Every value is checked when the Settings is built (`__post_init__`): whole numbers
in their range, on/off words only (1/0, true/false, yes/no, on/off), a known device and log level,
user:password for --auth. A bad value ends start-up with one line naming the flag and the variable
and what is allowed (exit code 2), never a traceback or a silent fallback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path

from chat.engine.sampling_defaults import CARD, SamplingDefaults
from chat.engine.types import GenParams

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
SECRETS = ("auth", "api_key", "engine_key")


class SettingsError(ValueError):
    """A setting with a value it may not have; the text names the flag, the variable and what is allowed."""


def _opt(default, help: str, *, lo: int | None = None, hi: int | None = None, check: str = ""):
    """A Settings field: its default, help line and what values it allows."""
    return field(default=default, metadata={"help": help, "lo": lo, "hi": hi, "check": check})


@dataclass(frozen=True)
class Settings:
    """All limits and switches of one vlchat server."""

    host: str = _opt("0.0.0.0", "Interface to listen on.", check="host")
    port: int = _opt(8080, "Port to listen on (0 picks a free one).", lo=0, hi=65535)
    model: str = _opt(
        "Qwen/Qwen3-VL-8B-Instruct",
        "Hub id or local folder of a Qwen3-VL checkpoint; 'tiny-random' builds a random-weight test model.",
        check="nonempty",
    )
    data_dir: Path = _opt(Path("data"), "Folder for the SQLite history, stored images and the tiny model.")
    device: str = _opt("auto", "'auto' (GPU if present), 'cpu', 'cuda' or 'cuda:N'.", check="device")
    lora: str = _opt("", "LoRA adapters to serve beside the base model, NAME=PATH (a PEFT adapter folder or hub id); "
                     "repeat the flag or separate with commas. An API request picks one with \"model\": \"NAME\".",
                     check="lora")
    quantize: str = _opt("", "Load the weights quantized with bitsandbytes: 'int8' or 'nf4' (4-bit), for GPUs with "
                         "less memory; empty: bf16.", check="quantize")
    max_gpu_memory: str = _opt("", "Most GPU memory the weights may take, e.g. 10GiB; the rest is kept in CPU memory "
                               "and streamed in (accelerate offload; slow). Empty: all on the GPU.", check="memory")
    auth: str = _opt("", "user:password for the page (Gradio auth); conversations then belong to the user.",
                     check="auth")
    users: str = _opt("", "Users file for page accounts with hashed passwords (python app.py users add NAME); "
                      "re-read when it changes.", check="users_file")
    trusted_user_header: str = _opt(
        "", "Header in which a reverse proxy names the user it logged in, e.g. X-Forwarded-User; trusted only from "
        "--trusted-proxies (the page then has no login form).", check="header",
    )
    trusted_proxies: str = _opt("", "Addresses or networks (CIDR) of the reverse proxies, separated by commas.",
                                check="networks")
    admins: str = _opt("", "Users (from --users, --auth or the proxy header) who may see usage per user; "
                       "separated by commas.", check="names")
    api_key: str = _opt("", "Key(s) the /v1 API requires as 'Authorization: Bearer KEY'; several separated by commas.",
                        check="api_key")
    api_open: bool = _opt(False, "Serve /v1 without a key on a non-loopback address (otherwise it is refused).")
    max_waiting: int = _opt(16, "Requests that may wait for the model; more get an immediate 'busy'.", lo=1)
    context_tokens: int = _opt(32768, "Longest conversation (prompt + answer) in tokens.", lo=256)
    trim_history: bool = _opt(True, "On the page, a conversation longer than the context leaves out its oldest turns "
                              "(and says so) instead of being refused; the history keeps them (chat/trim.py).")
    trim_history_api: bool = _opt(False, "The same for /v1/chat/completions: the oldest turns are left out and the "
                                  "response says how many in the header X-Vlchat-Left-Out-Turns.")
    default_max_new_tokens: int = _opt(1024, "Default answer length limit in tokens.", lo=1)
    max_new_tokens_limit: int = _opt(4096, "Largest answer length a request may ask for.", lo=1)
    max_image_bytes: int = _opt(20_000_000, "Largest image upload in bytes.", lo=1)
    max_image_pixels: int = _opt(40_000_000, "Largest image in pixels (width x height), checked before decoding.",
                                 lo=1)
    max_body_bytes: int = _opt(50_000_000, "Largest /v1 request body in bytes (images travel inside it).", lo=1)
    max_images_per_message: int = _opt(8, "Images one message may carry.", lo=0)
    max_images_per_conversation: int = _opt(32, "Images one conversation may hold.", lo=0)
    kv_cache_mb: int = _opt(
        0, "Memory for the paged KV cache (running requests and reused prefixes), in MiB; 0 sizes it after "
        "warm-up from free GPU memory (1 GiB on CPU).", lo=0,
    )
    max_batch_tokens: int = _opt(1024, "Tokens one engine step may process (decode tokens plus prefill chunks).",
                                 lo=16)
    max_running: int = _opt(64, "Requests generating at once (continuous batching); more wait in the queue.", lo=1)
    max_running_per_owner: int = _opt(
        16, "Requests one owner (a browser, a login or an API key) may have generating at once.", lo=1
    )
    rate_limit: str = _opt(
        "", "Requests (API calls, page messages) one API key, browser or login may make, e.g. 60/minute; several "
        "as 10/second,60/minute; per address on a keyless API (chat/ratelimit_gate.py).", check="rates",
    )
    token_limit: str = _opt(
        "", "Tokens (prompt plus answer) one API key, browser or login may use, e.g. 100000/minute (per second, "
        "minute or hour; several separated by commas).", check="rates",
    )
    address_rate_limit: str = _opt(
        "", "Requests one client address may make in all (page messages and API calls, whatever the key, browser "
        "or login), on top of --rate-limit, e.g. 600/hour; behind a reverse proxy every client shares its "
        "address.", check="rates",
    )
    address_token_limit: str = _opt(
        "", "Tokens one client address may use in all, on top of --token-limit, e.g. 1000000/hour.", check="rates",
    )
    cpu_threads: int = _opt(
        0, "Torch threads for the model on the CPU; 0 picks one per core but one (left to the web server), at "
        "most 8. With several servers on one machine, lower it.", lo=0,
    )
    feature_cache_mb: int = _opt(1024, "Memory budget for kept vision features, in MiB.", lo=0)
    max_message_chars: int = _opt(100_000, "Longest text of one page message, in characters.", lo=1)
    gradio_cache_hours: int = _opt(1, "Gradio's temporary upload files older than this are deleted.", lo=1)
    metrics_key_required: bool = _opt(False, "/metrics requires an API key ('Authorization: Bearer KEY').")
    expose_docs: bool = _opt(False, "Serve the OpenAPI schemas, /docs and Gradio's /monitoring (off: 404).")
    login_failures_per_minute: int = _opt(
        5, "Failed page logins one address may make per minute; more get 429 (0: no limit).", lo=0
    )
    cookie_secure: bool = _opt(False, "Mark the browser-identity cookie Secure (set it when served over HTTPS).")
    shutdown_grace_seconds: int = _opt(5, "On SIGTERM, seconds open answers get to end before the server stops.",
                                       lo=0)
    header_timeout_seconds: int = _opt(15, "Seconds a client may take to send a request's headers.", lo=1)
    body_timeout_seconds: int = _opt(30, "Seconds a request body may stall between chunks; then 408.", lo=1)
    log_level: str = _opt("INFO", "Logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL.", check="log_level")
    engine_url: str = _opt(
        "", "Model server(s) with an OpenAI chat API to answer with instead of loading a model here, e.g. "
        "http://10.0.0.5:8000/v1 (vLLM, SGLang or another vlchat); several separated by commas.", check="engine_url",
    )
    engine_key: str = _opt("", "API key sent to the model server(s) as 'Authorization: Bearer KEY'.",
                           check="engine_key")
    engine_model: str = _opt("", "Model name to ask the model server(s) for (empty: the first one they list).")
    engine_session_header: str = _opt(
        "X-Session-Id", "Header that carries a conversation's id to the model server(s), for routers that keep a "
        "conversation on one server (empty: not sent).", check="header",
    )
    engine_first_token_seconds: int = _opt(
        120, "With a model server: seconds to wait for its first token before the request fails (and is "
        "cancelled there).", lo=1,
    )
    cors_origins: str = _opt(
        "", "Origins of browser apps that may call /v1 (CORS), e.g. https://app.example,http://localhost:3000; "
        "'*' allows any.", check="cors_origins",
    )
    blocklist: str = _opt(
        "", "Content filter: a UTF-8 file of words or phrases (one a line, any case, any language; '#' starts a "
        "comment) refused in messages and cut from answers (chat/moderation.py).",
    )

    def __post_init__(self) -> None:
        """Every value within what its setting allows (raises SettingsError naming the setting)."""
        for f in fields(self):
            _check(f, getattr(self, f.name))
        _check_accounts(self)  # chat.accounts: flags that only make sense together
        if self.blocklist:  # issue 14: a list that cannot be used stops start-up, saying why
            _check_blocklist(self.blocklist)

    @property
    def engine_urls(self) -> tuple[str, ...]:
        """The --engine-url servers (base URLs without a trailing slash); empty: the local engine."""
        return tuple(u.strip().rstrip("/") for u in self.engine_url.split(",") if u.strip())

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The configured API keys."""
        return tuple(k.strip() for k in self.api_key.split(",") if k.strip())

    def clamp_params(
        self, temperature: float | None, top_p: float | None, max_new_tokens: int | None, *,
        defaults: SamplingDefaults | None = None, top_k: int | None = None, presence_penalty: float | None = None,
        frequency_penalty: float | None = None, **extra
    ) -> GenParams:
        """Sampling settings within safe bounds; a missing value takes `defaults` (the checkpoint's generation
        config, else the model card's: chat/engine/sampling_defaults.py, issue 14)."""
        d = defaults or CARD
        t = d.temperature if temperature is None else min(max(float(temperature), 0.0), 2.0)
        p = d.top_p if top_p is None else min(max(float(top_p), 0.01), 1.0)
        k = d.top_k if top_k is None else min(max(int(top_k), 0), 1_000_000)  # -1 (vLLM's "off") -> 0
        pp = d.presence_penalty if presence_penalty is None else min(max(float(presence_penalty), -2.0), 2.0)
        fp = d.frequency_penalty if frequency_penalty is None else min(max(float(frequency_penalty), -2.0), 2.0)
        n = self.default_max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        n = min(max(n, 1), self.max_new_tokens_limit)
        return GenParams(temperature=t, top_p=p, top_k=k, presence_penalty=pp, frequency_penalty=fp,
                         max_new_tokens=n, **extra)


def _env_name(name: str) -> str:
    return "VLCHAT_" + name.upper()


def _names(f: Field) -> str:
    """'--max-waiting (VLCHAT_MAX_WAITING)'."""
    return f"--{f.name.replace('_', '-')} ({_env_name(f.name)})"


def _fail(f: Field, allowed: str, value) -> SettingsError:
    if f.name in SECRETS:  # a password or key is never echoed (the line may end up in a log)
        return SettingsError(f"{_names(f)} must be {allowed} (the value given is not shown).")
    shown = value if isinstance(value, str) else str(value)
    if len(shown) > 40:
        shown = shown[:40] + "..."
    return SettingsError(f"{_names(f)} must be {allowed}; got {shown!r}.")


def _check(f: Field, value) -> None:
    """Raise SettingsError unless `value` is allowed for field `f`."""
    meta = f.metadata
    if isinstance(f.default, bool):
        if not isinstance(value, bool):
            raise _fail(f, "on or off", value)
    elif isinstance(f.default, int):
        lo, hi = meta.get("lo"), meta.get("hi")
        allowed = "a whole number" + (f" from {lo} to {hi}" if hi is not None else
                                      f" of at least {lo}" if lo is not None else "")
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(f, allowed, value)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise _fail(f, allowed, value)
    elif isinstance(f.default, Path):
        if not isinstance(value, Path) or not str(value).strip():
            raise _fail(f, "a folder path", value)
    else:
        if not isinstance(value, str):
            raise _fail(f, "text", value)
        rule = _STRING_RULES.get(meta.get("check", ""))
        if rule is not None and not rule[0](value):
            raise _fail(f, rule[1], value)


def _check_blocklist(path: str) -> None:
    """--blocklist names a readable UTF-8 list (chat.moderation), else SettingsError with the reason."""
    from chat.moderation import BlocklistError, read_blocklist

    try:
        read_blocklist(path)
    except BlocklistError as exc:
        raise SettingsError(f"--blocklist (VLCHAT_BLOCKLIST): {exc}") from None


def _api_keys_ok(value: str) -> bool:
    keys = [k.strip() for k in value.split(",")]
    return not value or (any(keys) and all(re.fullmatch(r"[!-~]*", k) for k in keys))


def _rates_ok(value: str) -> bool:
    from chat.ratelimit import parse_rates

    try:
        parse_rates(value)
    except ValueError:
        return False
    return True


def _engine_urls_ok(value: str) -> bool:
    urls = [u.strip() for u in value.split(",")]
    return not value.strip() or all(re.fullmatch(r"https?://[^\s/?#,]+(/[^\s?#,]*)?", u) for u in urls)


def _networks_ok(value: str) -> bool:
    import ipaddress

    try:
        return all(ipaddress.ip_network(n.strip(), strict=False) for n in value.split(",") if n.strip())
    except ValueError:
        return False


def _lora_ok(value: str) -> bool:
    from chat.engine.adapters import LoraError, parse_specs

    try:
        parse_specs(value)
    except LoraError:
        return False
    return True


def _check_accounts(s: Settings) -> None:
    """--trusted-user-header needs --trusted-proxies, and replaces the login form of --auth/--users."""
    if s.trusted_user_header and not s.trusted_proxies.strip():
        raise SettingsError("--trusted-user-header (VLCHAT_TRUSTED_USER_HEADER) needs --trusted-proxies "
                            "(VLCHAT_TRUSTED_PROXIES): the addresses the header may come from.")
    if s.trusted_user_header and (s.auth or s.users):
        raise SettingsError("--trusted-user-header (VLCHAT_TRUSTED_USER_HEADER) cannot be combined with --auth or "
                            "--users: the proxy does the login. Use --admins to name admins.")


_STRING_RULES = {
    "users_file": (lambda v: not v or Path(v).is_file(),
                   "empty or an existing users file (create one with: python app.py users --file FILE add NAME)"),
    "networks": (_networks_ok, "empty or addresses/networks such as 127.0.0.1,10.0.0.0/8 separated by commas"),
    "names": (lambda v: all(re.fullmatch(r"[^\s,:]+", n.strip()) for n in v.split(",") if n.strip()),
              "empty or user names separated by commas"),
    "nonempty": (lambda v: bool(v.strip()), "non-empty"),
    "lora": (_lora_ok, "empty, or NAME=PATH (a PEFT adapter folder or hub id); several separated by commas"),
    "quantize": (lambda v: v in ("", "int8", "nf4"), "empty, int8 or nf4"),
    "memory": (lambda v: not v or bool(re.fullmatch(r"\d+(\.\d+)?\s*(GiB|GB|MiB|MB)", v.strip())),
               "empty, or an amount such as 10GiB, 12GB or 9000MiB"),
    "host": (lambda v: bool(re.fullmatch(r"\S+", v)), "an address such as 127.0.0.1, 0.0.0.0 or ::"),
    "device": (lambda v: bool(re.fullmatch(r"auto|cpu|cuda(:\d+)?", v)), "auto, cpu, cuda or cuda:N (N a GPU number)"),
    "auth": (lambda v: not v or bool(re.fullmatch(r"[^:\s][^:]*:\S.*", v)),
             "user:password (a user name without ':', then a password)"),
    "api_key": (_api_keys_ok, "one or more keys separated by commas, printable ASCII without spaces"),
    "log_level": (lambda v: v.upper() in LOG_LEVELS, "one of " + ", ".join(LOG_LEVELS)),
    "engine_url": (_engine_urls_ok, "empty, or http(s) URLs such as http://gpu-box:8000/v1 separated by commas"),
    "engine_key": (lambda v: bool(re.fullmatch(r"[!-~]*", v)), "printable ASCII without spaces"),
    "header": (lambda v: bool(re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]*", v)), "an HTTP header name (or empty)"),
    "rates": (_rates_ok, "empty (no limit), or a count per second, minute or hour such as 60/minute; several "
              "separated by commas, e.g. 10/second,60/minute"),
    "cors_origins": (lambda v: all(o == "*" or re.fullmatch(r"https?://[^\s/?#,]+", o)
                                   for o in (x.strip().rstrip("/") for x in v.split(",")) if o),
                     "empty, '*', or origins such as https://app.example:8443 separated by commas"),
}


def _parse(f: Field, raw: str):
    """A flag's or variable's text as the field's type (range checks come later, in Settings)."""
    if isinstance(f.default, bool):
        word = raw.strip().lower()
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
        raise _fail(f, "one of 1/0, true/false, yes/no, on/off", raw)
    if isinstance(f.default, int):
        text = raw.strip().replace("_", "")
        if not re.fullmatch(r"[+-]?\d{1,18}", text):
            lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
            allowed = "a whole number" + (f" from {lo} to {hi}" if hi is not None else
                                          f" of at least {lo}" if lo is not None else "")
            raise _fail(f, allowed, raw)
        return int(text)
    if isinstance(f.default, Path):
        if not raw.strip():
            raise _fail(f, "a folder path", raw)
        return Path(raw)
    return raw


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (not the whole usage text) and exit code 2."""

    def error(self, message: str):
        """Print one line and exit 2."""
        self.exit(2, f"vlchat could not start: {message} (python app.py --help lists the options)\n")


def parser() -> argparse.ArgumentParser:
    """The command line, built from the Settings fields (values stay text until `load_settings` parses them)."""
    ap = _Parser(
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
        elif f.metadata["check"] == "lora":  # repeatable: --lora a=X --lora b=Y
            ap.add_argument(flag, type=str, action="append", default=None, metavar="NAME=PATH", help=help_)
        else:
            ap.add_argument(flag, type=str, default=default, metavar=f.name.upper(), help=help_)
    return ap


def _load(argv: list[str] | None, environ) -> Settings:
    ap = parser()
    for f in fields(Settings):
        value = environ.get(_env_name(f.name))
        if value is not None and f.metadata["check"] != "lora":
            # Bools are parsed now (their flags carry no text); the rest stays text, like a flag's value.
            ap.set_defaults(**{f.name: _parse(f, value) if isinstance(f.default, bool) else value})
    given = vars(ap.parse_args(argv))
    given["lora"] = ",".join(given["lora"]) if given["lora"] else environ.get(_env_name("lora"), "")
    values = {f.name: _parse(f, given[f.name]) if isinstance(given[f.name], str) and not isinstance(
        f.default, str) else given[f.name] for f in fields(Settings)}
    return Settings(**values)


def load_settings(argv: list[str] | None = None, environ=None, *, exit_on_error: bool = True) -> Settings:
    """Defaults, overridden by VLCHAT_* variables, overridden by flags; all validated.

    A bad value prints one line naming the setting and exits with code 2 (or, with
    exit_on_error=False, raises SettingsError).
    """
    environ = os.environ if environ is None else environ
    try:
        return _load(argv, environ)
    except SettingsError as exc:
        if not exit_on_error:
            raise
        print(f"vlchat could not start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
