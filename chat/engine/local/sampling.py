"""One batched sampler for every row a step produced logits for.

Per row: temperature (0 = greedy), top-k, top-p, presence penalty (subtracted once from the
logit of every token the answer already holds, as OpenAI and vLLM define it) and an optional
seed. Greedy rows are a plain argmax of their own logits, so what else shares the batch never
changes them. Sampled rows draw with the exponential trick (argmax of p / E, E ~ Exp(1)),
which needs no host sync; a seeded row draws its noise from its own generator, so its answer
depends on its seed alone.
"""

from __future__ import annotations

import torch


def _noise(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    noise = torch.empty_like(probs).exponential_()
    for i, gen in enumerate(generators):
        if gen is not None:
            noise[i] = torch.empty_like(probs[i]).exponential_(generator=gen)
    return noise


@torch.inference_mode()  # the logits come from an inference-mode forward; the penalty updates them in place
def sample(logits: torch.Tensor, params: list, generated: list[list[int]],
           generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of (rows, vocab) float logits; `params[i]` is row i's GenParams."""
    logits = logits.float()
    for i, p in enumerate(params):
        penalty = getattr(p, "presence_penalty", 0.0)
        if penalty and generated[i]:
            seen = torch.tensor(sorted(set(generated[i])), device=logits.device)
            logits[i].index_add_(0, seen, torch.full(seen.shape, -penalty, device=logits.device))
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
