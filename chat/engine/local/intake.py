"""The caller's side of a request: render the conversation to a prompt and check that it fits.

Runs in the caller's thread (a web handler's), never on the engine's: tokenizing a long
conversation is CPU work that must not stall everyone's streams. Text that could not fit the
context whatever it tokenizes to (more characters than context x the longest token) is refused
before any tokenizing at all. Image sizes are remembered by visual id, so an image is opened
only the first time a prompt needs its grid.
"""

from __future__ import annotations

import threading

from chat.engine.local.prompt import Prompt, render, split_visual, template_messages
from chat.engine.types import ChatRequest, ContextTooLong

MAX_KNOWN_GRIDS = 4096


class PromptBuilder:
    """Prompts for one model: rendering, the context checks, and a small cache of image grids."""

    def __init__(self, runner, vision, max_context: int) -> None:
        self.runner = runner
        self.vision = vision
        self.max_context = max_context
        self.max_chars = max_context * runner.max_token_chars
        self._grids: dict[str, tuple[int, int, int]] = {}
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Forget the image sizes (after warm-up)."""
        with self._lock:
            self._grids.clear()

    def checked(self, request: ChatRequest) -> Prompt:
        """The rendered prompt, or ContextTooLong, refused on characters before any tokenizing."""
        chars = sum(len(m["content"]) if isinstance(m["content"], str)
                    else sum(len(p.get("text") or "") for p in m["content"]) for m in request.messages)
        if chars > self.max_chars:
            raise ContextTooLong(
                f"This conversation's text is {chars:,} characters, more than the {self.max_context:,}-token context "
                "can hold. Send a shorter text (or attach it in parts) or start a new chat."
            )
        prompt = self.build(request.messages, request.images, request.tools, request.continue_final)
        n_prompt, params = len(prompt.ids), request.params
        room = self.max_context - n_prompt
        if room < 1 or (params.max_new_tokens > room and not params.fit_to_context):
            over = n_prompt + params.max_new_tokens - self.max_context
            raise ContextTooLong(
                f"This conversation is {n_prompt} tokens and the answer may take {params.max_new_tokens}; together "
                f"that is {over} over the {self.max_context}-token limit. Choose a lower image detail, remove an "
                "image, ask for a shorter answer (Max new tokens) or start a new chat."
            )
        return prompt

    def build(self, messages: list[dict], inline: dict | None = None, tools: list[dict] | None = None,
              continue_final: bool = False) -> Prompt:
        """Render messages; an image is opened only the first time its size is needed."""
        grids = {}
        with self._lock:  # callers' threads render side by side
            if len(self._grids) > MAX_KNOWN_GRIDS:  # only a cache of image sizes; keep it bounded
                self._grids.clear()
            known = {vid: self._grids.get(vid) for vid in template_messages(messages)[1]}
        for vid, grid in known.items():
            if grid is None:
                image_id, detail = split_visual(vid)
                img = self.vision.image(image_id, inline or {})
                grid = self.runner.grid(img.width, img.height, detail)
                with self._lock:
                    self._grids[vid] = grid
            grids[vid] = grid
        return render(self.runner.processor, messages, grids, self.runner.merge, tools, continue_final)
