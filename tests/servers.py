"""Real vlchat servers for the tests: `python app.py --model tiny-random` on a free loopback port.

Shared by the API, browser and intake tests. Every server gets its own data folder with a copy
of the session's tiny checkpoint (so it is not rebuilt), a clean VLCHAT_* environment, and is
always reached through 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_dir(tmp_path_factory, model_dir: Path, name: str) -> Path:
    """A fresh data folder holding a copy of the tiny checkpoint."""
    data = tmp_path_factory.mktemp(name)
    shutil.copytree(model_dir / "models", data / "models")
    return data


def metric(base: str, name: str) -> float:
    """One sample of /metrics, e.g. 'vlchat_requests_total{outcome="cancelled"}'; 0 when absent."""
    body = httpx.get(base + "/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", body, re.M)
    return float(match.group(1)) if match else 0.0


class Server:
    """The app in a subprocess; `start()` returns once /health says ready, `stop()` ends it."""

    def __init__(self, data: Path, *args: str, host: str = "127.0.0.1", env: dict | None = None) -> None:
        self.data_dir = data
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.args = ["--model", "tiny-random", "--host", host, "--port", str(self.port), "--data-dir", str(data),
                     *args]
        # No VLCHAT_* settings and no GRADIO_TEMP_DIR from this test process (an in-process app sets one):
        # each server keeps its uploads in its own data folder.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("VLCHAT_") and k != "GRADIO_TEMP_DIR"}
        self.env.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", **(env or {}))
        self.log = data / "server.log"
        self.proc: subprocess.Popen | None = None

    def launch(self) -> None:
        """Start the process without waiting (several servers can start side by side)."""
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), *self.args], cwd=ROOT, env=self.env,
                                     stdout=self.log.open("ab"), stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float = 180) -> None:
        """Until /health answers 200 (the model is loaded and warmed up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError("server did not become healthy:\n" + self.log.read_text()[-3000:])

    def start(self) -> Server:
        """Launch and wait until healthy."""
        self.launch()
        self.wait_healthy()
        return self

    def stop(self) -> None:
        """Terminate (kill after 15 s)."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextmanager
def running(group: dict[str, Server]):
    """Start every server of `group` (all launched first, then each waited for), and stop them all after."""
    try:
        for srv in group.values():
            srv.launch()
        for srv in group.values():
            srv.wait_healthy()
        yield group
    finally:
        for srv in group.values():
            srv.stop()
