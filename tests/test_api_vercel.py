"""The Vercel AI SDK (npm `ai` with `@ai-sdk/openai`, pinned in tests/clients/vercel/package.json
and its lock file) against vlchat.

Its default OpenAI provider calls POST /v1/responses; `openai.chat(...)` calls chat completions. The
SDK is installed with npm into a temporary folder and run with node against a real `app.py` with the
tiny model (text, an image, streaming, tools offered), and against vlchat's own Responses code
serving a scripted answer that calls a tool (the tiny model never writes one): the SDK must read
the call from both the whole response and the event stream.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi import Request  # at module level: the scripted route's annotation is resolved here
from PIL import Image

from tests.servers import ROOT, Server, data_dir, free_port

CLIENT = ROOT / "tests" / "clients" / "vercel"
SCRIPTED = 'Checking. <tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def sdk(tmp_path_factory) -> Path:
    """A folder with the pinned SDK installed and the check script."""
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.fail("node and npm are needed for the Vercel AI SDK check (Debian: apt-get install nodejs npm)")
    folder = tmp_path_factory.mktemp("vercel")
    for name in ("package.json", "package-lock.json", "check.mjs"):
        shutil.copy(CLIENT / name, folder / name)
    done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=folder,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    srv = Server(data_dir(tmp_path_factory, model_dir, "api-vercel"), env={"VLCHAT_API_KEY": "vk1"})
    try:
        yield srv.start()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def scripted():
    """vlchat's Responses answer code (chat/responses.py) on a small server whose 'model' calls a tool."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    from chat.engine.types import Delta, Done, Usage
    from chat.responses import answer, stream

    meta = {"response_id": "resp_scripted", "created": int(time.time()), "model": "vlchat", "tools": True,
            "echo": {"instructions": None, "max_output_tokens": None, "temperature": None, "top_p": None,
                     "metadata": {}, "tool_choice": "auto", "tools": [], "parallel_tool_calls": True, "user": None}}
    done = Done("stop", SCRIPTED, Usage(10, 2, 5, 0))

    class Handle:
        result = None

        def cancel(self) -> None:
            self.result = "cancelled"

    class Generation:  # what chat.responses.stream reads: handle, first event, the rest
        def __init__(self) -> None:
            self.handle, self.first = Handle(), Delta(SCRIPTED[:12])

            async def rest():
                for i in range(12, len(SCRIPTED), 7):
                    yield Delta(SCRIPTED[i:i + 7])
                yield done

            self.events = rest()

    app = FastAPI()

    @app.post("/v1/responses")
    async def responses(request: Request):
        if (await request.json()).get("stream"):
            return StreamingResponse(stream(Generation(), meta), media_type="text/event-stream")
        return JSONResponse(answer(meta, done))

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(10)


def test_vercel_ai_sdk_default_provider_and_chat(sdk, server, scripted, tmp_path):
    png = tmp_path / "pic.png"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(png)
    run = subprocess.run(["node", "check.mjs", server.base + "/v1", scripted, str(png)], cwd=sdk,
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert "streamError" not in out and "toolStreamError" not in out, out

    # Responses API, whole and streamed: the same greedy answer, its usage, the length cut read as such.
    assert out["generate"]["text"] and out["generate"]["finish"] == "length"
    assert out["generate"]["usage"]["output_tokens"] == 12 and out["generate"]["usage"]["input_tokens"] > 20
    assert out["stream"]["text"] == out["generate"]["text"] and out["stream"]["finish"] == "length"
    assert out["stream"]["usage"]["input_tokens_details"]["cached_tokens"] > 0  # the image's prefix was reused
    assert out["toolsOffered"]["text"] and out["toolsOffered"]["finish"] == "length"  # answered as text
    assert out["chat"]["text"] == out["generate"]["text"]  # openai.chat(): chat completions, same engine

    # A tool call, from the whole response and from the event stream.
    assert out["toolCall"] == {"text": "Checking.", "finish": "tool-calls", "calls": [["weather", {"city": "Paris"}]]}
    stream = out["toolCallStream"]
    assert stream["finish"] == "tool-calls" and stream["calls"] == [["weather", {"city": "Paris"}]]
    assert stream["text"].strip() == "Checking."
    kinds = stream["kinds"]
    assert kinds.index("text-delta") < kinds.index("tool-input-start") < kinds.index("tool-call")
    # and the key was asked for: without it the SDK gets a 401
    assert httpx.post(server.base + "/v1/responses", json={"model": "vlchat", "input": "hi"}).status_code == 401
