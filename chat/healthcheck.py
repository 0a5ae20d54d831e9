"""The container's health check: GET /health where the server (PID 1) really listens.

Usage: python -m chat.healthcheck   (exit 0 when /health answers 200, else 1)

The port and host come from the same settings code the server used: the flags of PID 1 (read from
/proc/1/cmdline, everything after `app.py`) over its VLCHAT_* variables (from /proc/1/environ when
readable, else this process's own), over the defaults. So `docker run ... vlchat python app.py --port
9000` and `-e VLCHAT_PORT=9000` are both checked on 9000. Imports nothing heavy (no torch, no gradio).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from chat.config import SettingsError, load_settings

PROC_CMDLINE = Path("/proc/1/cmdline")
PROC_ENVIRON = Path("/proc/1/environ")


def server_args(cmdline: bytes) -> list[str]:
    """The arguments after `app.py` in a NUL-separated command line (none if app.py is not in it)."""
    argv = [a.decode("utf-8", "replace") for a in cmdline.split(b"\0") if a]
    for i, arg in enumerate(argv):
        if arg == "app.py" or arg.endswith("/app.py"):
            return argv[i + 1:]
    return []


def read_environ(path: Path) -> dict | None:
    """A NUL-separated environment block as a dict, or None when it cannot be read."""
    try:
        block = path.read_bytes()
    except OSError:
        return None
    pairs = (item.decode("utf-8", "replace").partition("=") for item in block.split(b"\0") if item)
    return {key: value for key, _, value in pairs}


def health_url(cmdline: bytes, environ) -> str:
    """The /health URL of a server started with this command line and environment."""
    settings = load_settings(server_args(cmdline), environ, exit_on_error=False)
    host = settings.host.strip("[]")
    if host in ("0.0.0.0", "localhost", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}/health"


def main(cmdline_path: Path = PROC_CMDLINE, environ=None) -> int:
    """0 when the server's /health answers 200, 1 otherwise (with one line saying why)."""
    if environ is None:
        environ = read_environ(PROC_ENVIRON) or os.environ
    try:
        cmdline = cmdline_path.read_bytes()
    except OSError:
        cmdline = b""
    try:
        url = health_url(cmdline, environ)
    except (SettingsError, SystemExit) as exc:
        print(f"health check: cannot tell the server's port ({exc})", file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except urllib.error.HTTPError as exc:
        print(f"health check: {url} answered {exc.code}", file=sys.stderr)
    except (OSError, ValueError) as exc:
        print(f"health check: {url} did not answer ({exc})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    if sys.argv[1:] in (["-h"], ["--help"]):
        print(__doc__)
        sys.exit(0)
    sys.exit(main())
