"""One request's state inside the engine: its tokens, blocks, positions, images and output.

A sequence's tokens are its prompt followed by what it generated. `computed` counts the
tokens whose KV is in its blocks; the next step feeds tokens [computed, computed + n). While
`computed` is short of the prompt the sequence is prefilling (in chunks); after that every
step feeds its one newest token. The last sampled token is never in the cache until the next
step feeds it.

Preemption throws the blocks away (their full blocks stay named in the pool, so a later
re-admission usually finds most of them again) and starts over from `computed = 0` with the
tokens generated so far kept: the recomputed state is the same, and the answer continues
where it was.
"""

from __future__ import annotations

import itertools
import time

import torch

from chat.engine.handle import Handle
from chat.engine.local.detok import OutputText
from chat.engine.local.kv import chain_hashes
from chat.engine.local.prompt import Prompt

_arrivals = itertools.count()


class Sequence:
    """A request being served: prompt, generated tokens, KV blocks and output text."""

    def __init__(self, handle: Handle, prompt: Prompt, block_size: int, max_context: int, eos_ids: set[int],
                 tokenizer, token_table: list | None = None) -> None:
        request = handle.request
        self.handle = handle
        self.request = request
        self.params = request.params
        self.prompt = prompt
        # An adapter changes every layer's keys and values: its KV state is its own (the chain's seed says which).
        self.salt = request.cache_salt + (f"|lora={request.adapter}" if request.adapter else "")
        self.owner = request.cache_salt.split("|", 1)[0]
        self.adapter_index = 0  # the engine's LoRA index for request.adapter (0: the base model)
        self.arrival = next(_arrivals)
        self.block_size = block_size
        self.tokens: list[int] = list(prompt.ids)
        self.keys: list[int] = list(prompt.keys)  # the owner salt seeds the block-name chain instead
        self.n_prompt = len(prompt.ids)
        self.max_new = min(self.params.max_new_tokens, max_context - self.n_prompt)
        self.eos_ids = eos_ids
        self.computed = 0
        self.blocks: list[int] = []
        self.named = 0  # leading blocks whose names were recorded in the pool
        self._names: list[bytes] = []
        self.cached_tokens = -1  # prompt tokens reused at first admission (-1: not admitted yet)
        self.images_encoded = 0
        self.generated: list[int] = []
        self.output = OutputText(tokenizer, self.params.stop, token_table)
        self.finish_reason: str | None = None
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.generator: torch.Generator | None = None
        self.preemptions = 0
        self.features: dict = {}  # visual id -> ImageFeatures, held while prefill still needs them
        self.notice = ""  # something the person should know (images were read at lower detail)

    # -- where it stands --------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Tokens to feed before the next sample: the rest of the prompt, or the newest token."""
        return len(self.tokens) - self.computed

    def block_names(self, upto: int) -> list[bytes]:
        """Names of the full blocks among the first `upto` tokens (computed lazily, extended as it grows)."""
        full = upto // self.block_size
        if len(self._names) < full:
            start = len(self._names) * self.block_size
            parent = self._names[-1] if self._names else None
            keys = self.keys[start : full * self.block_size]
            self._names.extend(chain_hashes(self.salt, keys, self.block_size, parent))
        return self._names[:full]

    def positions(self, start: int, end: int) -> torch.Tensor:
        """(3, end - start) M-RoPE positions of tokens [start, end)."""
        n_prompt = self.n_prompt
        parts = []
        if start < n_prompt:
            parts.append(self.prompt.positions[:, start : min(end, n_prompt)])
        if end > n_prompt:
            first = self.prompt.next_position + max(start, n_prompt) - n_prompt
            gen = torch.arange(first, first + end - max(start, n_prompt), dtype=torch.long)
            parts.append(gen.view(1, -1).expand(3, -1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def text_position(self, index: int) -> int:
        """The position of token `index` when it is text (its three M-RoPE axes are then equal)."""
        if index >= self.n_prompt:
            return self.prompt.next_position + index - self.n_prompt
        return int(self.prompt.positions[0, index])

    # -- output -----------------------------------------------------------------------------------

    def append(self, token: int) -> str | None:
        """Add a sampled token; the text to stream now, or None. Sets `finish_reason` when it is done."""
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.generated.append(token)
        self.tokens.append(token)
        self.keys.append(token)
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return self.output.flush()
        delta, stopped = self.output.push(token)
        if stopped:
            self.finish_reason = "stop"
        elif len(self.generated) >= self.max_new:
            self.finish_reason = "length"
            delta = (delta or "") + self.output.flush()
        return delta or None

    def reset_for_recompute(self) -> None:
        """After preemption: no blocks, nothing computed; generated tokens are kept and recomputed."""
        self.blocks = []
        self.computed = 0
        self.named = 0
        self.preemptions += 1
