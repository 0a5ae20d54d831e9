"""One batched sampler for every row a step produced logits for.

Per row: temperature (0 = greedy), top-k, top-p, presence penalty (subtracted once from the
logit of every token the answer already holds, as OpenAI and vLLM define it), frequency penalty
(subtracted once per occurrence of such a token) and an optional seed. Greedy rows are a plain
argmax of their own logits, so what else shares the batch never changes them. Sampled rows draw
with the exponential trick (argmax of p / E, E ~ Exp(1)), which needs no host sync; a seeded row
draws its noise from its own generator, so its answer depends on its seed alone.
"""

from __future__ import annotations

import torch


def _noise(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    noise = torch.empty_like(probs).exponential_()
    for i, gen in enumerate(generators):
        if gen is not None:
            noise[i] = torch.empty_like(probs[i]).exponential_(generator=gen)
    return noise


def _penalize(logits: torch.Tensor, params: list, generated: list[list[int]]) -> None:
    """Presence and frequency penalties of every row at once, in place: each token the answer holds loses
    presence_penalty once plus frequency_penalty times how often it occurs (OpenAI's and vLLM's definition).

    The penalized rows' answers travel to the device as one flat list; their counts come from one scatter.
    """
    rows = [i for i, p in enumerate(params) if generated[i] and (
        getattr(p, "presence_penalty", 0.0) or getattr(p, "frequency_penalty", 0.0))]
    if not rows:
        return
    device = logits.device
    flat: list[int] = []
    for i in rows:
        flat.extend(generated[i])
    ids = torch.tensor(flat, device=device)
    which = torch.repeat_interleave(torch.arange(len(rows), device=device),
                                    torch.tensor([len(generated[i]) for i in rows], device=device))
    counts = torch.zeros((len(rows), logits.shape[1]), device=device)
    counts.index_put_((which, ids), torch.ones_like(ids, dtype=counts.dtype), accumulate=True)
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
