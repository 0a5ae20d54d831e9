"""A stand-in for vLLM's OpenAI server on loopback that records what it receives.

It answers `GET /v1/models` and streamed `POST /v1/chat/completions` the way vLLM does (role chunk,
content chunks, a finish chunk, a usage chunk with `prompt_tokens_details.cached_tokens`, then
`data: [DONE]`), and keeps every request's headers and JSON body so a test can check what a real
vLLM would have been sent. `mode` switches its behaviour: "ok", "slow" (streams until the client goes
away, then counts the disconnect), "silent" (never sends a token), "tools" (answers with a parsed tool
call in `delta.tool_calls`) or an HTTP status to fail with.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.servers import free_port


class FakeUpstream:
    """One fake model server; `start()`/`stop()` can be repeated (same port), like a server restarting."""

    def __init__(self, name: str, model: str = "fake-vl") -> None:
        self.name, self.model = name, model
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/v1"
        self.requests: list[dict] = []  # {"headers": {lower-case name: value}, "body": dict, "at": monotonic}
        self.mode: str | int = "ok"
        self.replies: list[str] = []  # answers given in order (in "ok" mode) before the default one (issue 14)
        self.error_body: dict = {}
        self.adapters: list[str] = []  # LoRA adapters it lists after its model, as vLLM lists --lora-modules
        self.disconnects = 0
        self.disconnected = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> FakeUpstream:
        """Listen (again) on its port."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                if self.path != "/v1/models":
                    self.send_error(404)
                    return
                self._json(200, {"object": "list", "data": [{"id": name, "object": "model"}
                                                            for name in [fake.model, *fake.adapters]]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                fake.requests.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body,
                                      "at": time.monotonic()})
                if isinstance(fake.mode, int):
                    self._json(fake.mode, fake.error_body)
                    return
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.end_headers()
                try:
                    if fake.mode == "silent":
                        while True:  # a comment now and then, only to notice the client leaving
                            self._send(": waiting\n\n")
                            time.sleep(0.1)
                    self._chunk({"role": "assistant", "content": ""})
                    if fake.mode == "tools":  # a parsed call, streamed in pieces as vLLM's tool parsers do
                        self._chunk({"tool_calls": [{"index": 0, "id": "chatcmpl-tool-1", "type": "function",
                                                     "function": {"name": "get_weather", "arguments": ""}}]})
                        for piece in ('{"city": ', '"Paris"}'):
                            self._chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
                        self._chunk({}, "tool_calls")
                        self._send("data: [DONE]\n\n")
                        return
                    if fake.mode == "slow":
                        for _ in range(6000):
                            self._chunk({"content": "la "})
                            time.sleep(0.02)
                    for piece in [fake.replies.pop(0)] if fake.replies else ("answer ", "from ", fake.name):
                        self._chunk({"content": piece})
                    self._chunk({}, "stop")
                    session = self.headers.get("x-session-id")
                    seen = sum(r["headers"].get("x-session-id") == session for r in fake.requests) > 1
                    usage = {"prompt_tokens": 50, "completion_tokens": 3, "total_tokens": 53,
                             "prompt_tokens_details": {"cached_tokens": 32 if seen else 0}}
                    last = {"id": "x", "object": "chat.completion.chunk", "choices": [], "usage": usage}
                    self._send(f"data: {json.dumps(last)}\n\n")
                    self._send("data: [DONE]\n\n")
                except (BrokenPipeError, ConnectionResetError):
                    fake.disconnects += 1
                    fake.disconnected.set()

            def _send(self, text: str) -> None:
                self.wfile.write(text.encode())
                self.wfile.flush()

            def _chunk(self, delta: dict, finish: str | None = None) -> None:
                chunk = {"id": "x", "object": "chat.completion.chunk", "model": fake.model,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                self._send(f"data: {json.dumps(chunk)}\n\n")

            def _json(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening (connections are refused until `start()` again)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def sessions(self) -> list[str]:
        """The session header of every request so far, in order."""
        return [r["headers"].get("x-session-id", "") for r in self.requests]
