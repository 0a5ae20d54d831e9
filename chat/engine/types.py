"""The worker's small, stable interface: what goes in (ChatRequest) and what comes out (events).

UI and API both speak only this. Scheduling inside the worker (prefix reuse, compiled decode,
batching) can change without either door noticing.

A message's content is a string or a list of parts: {"type": "text", "text": ...} or
{"type": "image", "image_id": <sha256 of the stored, sanitized image>}. Roles are system, user,
assistant and tool (a tool's result); an assistant message may carry `tool_calls` (OpenAI's shape,
as the chat template renders them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol


class EngineError(Exception):
    """Base of the errors a caller can show to a person; `code` is stable for programs."""

    code = "engine_error"


class Busy(EngineError):
    """The queue is full; try again shortly."""

    code = "busy"

    def __init__(self, waiting: int) -> None:
        super().__init__(f"The server is busy: {waiting} requests are waiting. Try again in a moment.")
        self.waiting = waiting


class NotReady(EngineError):
    """The model is still loading or warming up."""

    code = "not_ready"

    def __init__(self) -> None:
        super().__init__("The model is still loading; try again in a moment.")


class ContextTooLong(EngineError):
    """Prompt plus requested answer would not fit."""

    code = "context_length_exceeded"


class ShuttingDown(EngineError):
    """The server is stopping; open answers end with this."""

    code = "shutting_down"

    def __init__(self) -> None:
        super().__init__("The server is restarting; your answer was cut short. Try again in a minute.")


class UnknownAdapter(EngineError):
    """The request asks for an adapter (a model name) this engine does not serve."""

    code = "model_not_found"

    def __init__(self, name: str, served: tuple[str, ...]) -> None:
        listed = ", ".join(served) if served else "none are loaded"
        super().__init__(f"The model '{name}' is not served here (LoRA adapters: {listed}).")


class GenerationFailed(EngineError):
    """The model failed while generating (out of memory, a bug); the worker goes on serving."""

    code = "generation_failed"


@dataclass(frozen=True)
class GenParams:
    """Sampling settings for one request; bounds are enforced by `Settings.clamp_params`."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0  # 0: off
    presence_penalty: float = 0.0  # subtracted from every token already in the answer
    frequency_penalty: float = 0.0  # subtracted once per time a token already appears in the answer
    max_new_tokens: int = 1024
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # False: a prompt plus max_new_tokens over the context is refused. True (an API request that
    # named no max_tokens): the answer may use whatever room the context has left.
    fit_to_context: bool = False


@dataclass
class ChatRequest:
    """One generation: the whole conversation so far, ending with the user's turn."""

    messages: list[dict]
    params: GenParams = field(default_factory=GenParams)
    session: str | None = None  # a hint for prefix reuse (a conversation id); never required
    # Images that travel with the request (clean bytes or a PIL image, by id), looked up before the
    # engine's own image loader: an API request's inline images stay with it while it waits.
    images: dict = field(default_factory=dict)
    # Who may reuse this request's KV state: the owner key (a browser, an --auth user, an API key,
    # optionally split by the client's cache_salt). It is part of every prefix-cache key, so
    # state built for one owner never serves another (no cached_tokens side channel).
    cache_salt: str = ""
    # Functions the model may call (OpenAI's `tools` entries): the chat template renders them into the
    # system prompt. None: no tools (the prompt is exactly as without them).
    tools: list[dict] | None = None
    # The last message is the assistant's and is continued (no new turn is opened after it), as vLLM's
    # `continue_final_message`; the answer is only the text that follows it.
    continue_final: bool = False
    # A LoRA adapter the engine loaded (its name, what `model` asks for on the API); "" is the base model.
    adapter: str = ""


@dataclass(frozen=True)
class Usage:
    """Token counts for one request, OpenAI style plus the vision-encoder work done."""

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    images_encoded: int

    def as_dict(self) -> dict:
        """Plain dict for storage and JSON."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "images_encoded": self.images_encoded,
        }


@dataclass(frozen=True)
class Delta:
    """New answer text, always whole characters."""

    text: str


@dataclass(frozen=True)
class Done:
    """The request ended. finish_reason: 'stop', 'length' or 'cancelled'."""

    finish_reason: str
    text: str
    usage: Usage
    notice: str = ""  # something the person should know (e.g. images were lowered in detail)


@dataclass(frozen=True)
class Failed:
    """The request ended with an error; `message` is safe to show."""

    message: str
    code: str
    text: str = ""


Event = Delta | Done | Failed


class LoadStatus:
    """How far start-up has got, for the page and /health: phase, a fraction where known, or a failure.

    Written by the loading thread, read by web threads; plain attribute writes are enough.
    """

    def __init__(self) -> None:
        self.phase = "starting"  # starting -> loading -> warming-up -> ready, or failed
        self.fraction: float | None = None
        self.error = ""

    def set(self, phase: str, fraction: float | None = None) -> None:
        """Move to `phase` (with progress in 0..1 where known)."""
        self.phase, self.fraction = phase, fraction

    def fail(self, message: str) -> None:
        """Start-up failed for good; `message` says what to do."""
        self.phase, self.error = "failed", message

    def describe(self) -> str:
        """One line for a person: 'Loading the model, 43%'."""
        if self.phase == "failed":
            return f"The model could not start: {self.error}"
        if self.phase == "ready":
            return "Ready."
        label = {"starting": "Starting", "loading": "Loading the model",
                 "warming-up": "Warming up the model"}.get(self.phase, self.phase)
        pct = f", {round(self.fraction * 100)}%" if self.fraction is not None else ""
        return f"{label}{pct}…"


class RequestHandle(Protocol):
    """What `submit` returns: the request's events, its final result, and a way to stop it."""

    result: Done | Failed | None

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Delta events, then one Done or Failed."""

    def aevents(self):
        """The same events for an asyncio caller (an async iterator)."""

    def wait(self, timeout: float | None = None) -> Done | Failed | None:
        """Block until the request ends."""

    def cancel(self) -> None:
        """Stop it: at once if it waits, else within a step; it ends with finish_reason 'cancelled'."""


class ChatEngine(Protocol):
    """The engine as the page and API see it; the local engine (engine.py) implements it, a remote one can."""

    ready: object  # a threading.Event, set once requests are accepted
    waiting: int  # requests submitted and not yet running

    def submit(self, request: ChatRequest, on_finish: Callable[[Event], None] | None = None) -> RequestHandle:
        """Queue a request; raises NotReady, ShuttingDown or Busy; a prompt that cannot fit comes back finished."""

    def drain(self) -> int:
        """Stopping: end every open request with a ShuttingDown failure; how many."""

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop serving."""
