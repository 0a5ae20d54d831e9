"""One batched sampler for every row a step produced logits for.

Per row: temperature (0 = greedy), top-k, top-p, presence penalty (subtracted once from the
logit of every token the answer already holds, as OpenAI and vLLM define it), frequency penalty
(subtracted once per occurrence of such a token) and an optional seed. Greedy rows are a plain
argmax of their own logits, so what else shares the batch never changes them. Sampled rows draw
with the exponential trick (argmax of p / E, E ~ Exp(1)), which needs no host sync; a seeded row
draws its noise from its own generator, so its answer depends on its seed alone.
"""

from __future__ import annotations

import threading

import torch


def _noise(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    noise = torch.empty_like(probs).exponential_()
    for i, gen in enumerate(generators):
        if gen is not None:
            noise[i] = torch.empty_like(probs[i]).exponential_(generator=gen)
    return noise


class _Counted:
    """How often each token occurs in one answer (a row of counts on the device), and how much of it is counted."""

    __slots__ = ("tokens", "seen", "counts")

    def __init__(self, tokens: list[int], counts: torch.Tensor) -> None:
        self.tokens, self.seen, self.counts = tokens, 0, counts


# Per engine thread (the one thread that samples for an engine): answer list id -> its counts. An entry holds its
# list, so the id cannot be reused while it is kept; entries of answers not sampled in a call are dropped (one
# that comes back, e.g. after a preemption, is counted again from scratch).
_counted = threading.local()


def _counts(rows: list[int], generated: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """(len(rows), vocab) token counts of the rows' answers, kept between steps: each step adds only the tokens
    sampled since the last one (one small copy to the device and one scatter for the whole batch)."""
    kept: dict = getattr(_counted, "entries", {})
    entries, which, ids = [], [], []
    for j, i in enumerate(rows):
        tokens = generated[i]
        entry = kept.get(id(tokens))
        if (entry is None or entry.tokens is not tokens or entry.seen > len(tokens)
                or entry.counts.device != device or entry.counts.shape[0] != vocab):
            entry = _Counted(tokens, torch.zeros(vocab, device=device))
        new = tokens[entry.seen:]
        which.extend([j] * len(new))
        ids.extend(new)
        entry.seen = len(tokens)
        entries.append(entry)
    counts = torch.stack([e.counts for e in entries])
    if ids:
        where = torch.tensor([which, ids], device=device)
        counts.index_put_((where[0], where[1]), torch.ones(len(ids), device=device), accumulate=True)
    for j, entry in enumerate(entries):
        entry.counts = counts[j]
    _counted.entries = {id(e.tokens): e for e in entries}
    return counts


def _penalize(logits: torch.Tensor, params: list, generated: list[list[int]]) -> None:
    """Presence and frequency penalties of every row at once, in place: each token the answer holds loses
    presence_penalty once plus frequency_penalty times how often it occurs (OpenAI's and vLLM's definition)."""
    rows = [i for i, p in enumerate(params) if generated[i] and (
        getattr(p, "presence_penalty", 0.0) or getattr(p, "frequency_penalty", 0.0))]
    if not rows:
        return
    device = logits.device
    counts = _counts(rows, generated, logits.shape[1], device)
    pen = torch.tensor([[getattr(params[i], "presence_penalty", 0.0), getattr(params[i], "frequency_penalty", 0.0)]
                        for i in rows], device=device)
    index = torch.tensor(rows, device=device)
    cut = (counts > 0).float() * pen[:, :1] + counts * pen[:, 1:]
    logits.index_copy_(0, index, logits.index_select(0, index) - cut)


@torch.inference_mode()  # the logits come from an inference-mode forward; the penalty updates them in place
def sample(logits: torch.Tensor, params: list, generated: list[list[int]],
           generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of (rows, vocab) float logits; `params[i]` is row i's GenParams."""
    logits = logits.float()
    _penalize(logits, params, generated)
    tokens = logits.argmax(-1)
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if rows:
        index = torch.tensor(rows, device=logits.device)
        temps = torch.tensor([params[i].temperature for i in rows], device=logits.device).view(-1, 1)
        top_p = torch.tensor([params[i].top_p for i in rows], device=logits.device).view(-1, 1)
        top_k = torch.tensor([getattr(params[i], "top_k", 0) or logits.shape[1] for i in rows],
                             device=logits.device).view(-1, 1)
        sorted_logits, order = (logits.index_select(0, index) / temps).sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        rank = torch.arange(probs.shape[1], device=logits.device).view(1, -1)
        keep = (rank < top_k) & ((probs.cumsum(-1) - probs) < top_p)  # the top token always stays
        probs = probs * keep
        choice = (probs / _noise(probs, [generators[i] for i in rows])).argmax(-1, keepdim=True)
        tokens[index] = order.gather(1, choice).view(-1)
    return tokens.tolist()
