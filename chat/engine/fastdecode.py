"""Fast batch-1 decode: a static KV buffer and one CUDA graph per length bucket.

Plain eager decode spends most of each step launching ~20 small kernels per layer from
Python; on an 8B model that is several times the time the GPU needs to read the weights. Here
the decode step is written directly against the model's own modules (norms, projections, MLP,
lm_head) with a static KV buffer and static input tensors, so the whole step, sampling
included, can be captured once as a CUDA graph and replayed per token.

Why this is exact for decode tokens: a generated token is text, so its three M-RoPE position
components are equal, and interleaved M-RoPE at (p, p, p) is ordinary RoPE at p. The cos/sin
table is computed once by the model's own rotary module at such positions. DeepStack only
touches visual positions, which decode never has.

Attention reads keys up to a bucket length (sqrt(2) steps from 256), masked past the current
length: a graph per bucket keeps the work proportional to the conversation, not to the
maximum context. Prefill stays on the regular (transformers) path; its KV is copied into the
buffer before decoding and the new tokens' KV is copied back out afterwards, so the prefix
cache keeps one format.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def buckets(max_len: int, first: int = 256) -> list[int]:
    """Attention lengths to capture: about sqrt(2) apart, multiples of 256, ending at max_len."""
    out, x = [], float(first)
    while x < max_len:
        b = int(math.ceil(x / 256) * 256)
        if not out or b > out[-1]:
            out.append(b)
        x *= math.sqrt(2)
    out.append(max_len)
    return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class FastDecoder:
    """Decode one conversation at a time from a static KV buffer of `max_len` tokens."""

    def __init__(self, model, max_len: int, use_graphs: bool | None = None) -> None:
        text = model.model.language_model
        cfg = model.config.get_text_config()
        self.model = model
        self.layers = list(text.layers)
        self.norm = text.norm
        self.embed = model.get_input_embeddings()
        self.lm_head = model.lm_head
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.max_len = max_len
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (len(self.layers), 1, self.n_kv, max_len, self.head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        with torch.inference_mode():
            pos = torch.arange(max_len + 1, device=self.device).view(1, 1, -1).expand(3, 1, -1)
            cos, sin = text.rotary_emb(self.k[0, 0, 0, :1], pos)
        self.cos, self.sin = cos[0].clone(), sin[0].clone()  # (max_len + 1, head_dim)
        self.arange = torch.arange(max_len, device=self.device)
        # Static inputs and output of the captured step.
        self.token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.slot = torch.zeros(1, dtype=torch.long, device=self.device)
        self.temperature = torch.zeros((), dtype=torch.float32, device=self.device)
        self.top_p = torch.ones((), dtype=torch.float32, device=self.device)
        self.next_token = torch.zeros((), dtype=torch.long, device=self.device)
        self.buckets = buckets(max_len)
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = None

    @property
    def nbytes(self) -> int:
        """Device memory held by the KV buffer."""
        return 2 * self.k.numel() * self.k.element_size()

    # -- the step ---------------------------------------------------------------------------------

    def _step(self, bucket: int) -> None:
        """One token through the decoder into `self.next_token`; shapes fixed by `bucket`."""
        h = self.embed(self.token)  # (1, 1, hidden)
        cos = self.cos.index_select(0, self.position).view(1, 1, 1, -1)
        sin = self.sin.index_select(0, self.position).view(1, 1, 1, -1)
        mask = (self.arange[:bucket] <= self.slot).view(1, 1, 1, bucket)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_norm(attn.q_proj(x).view(1, 1, self.n_heads, self.head_dim)).transpose(1, 2)
            k = attn.k_norm(attn.k_proj(x).view(1, 1, self.n_kv, self.head_dim)).transpose(1, 2)
            v = attn.v_proj(x).view(1, 1, self.n_kv, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.k[i].index_copy_(2, self.slot, k)
            self.v[i].index_copy_(2, self.slot, v)
            o = F.scaled_dot_product_attention(
                q, self.k[i, :, :, :bucket], self.v[i, :, :, :bucket], attn_mask=mask, scale=attn.scaling,
                enable_gqa=True,
            )
            h = h + attn.o_proj(o.transpose(1, 2).reshape(1, 1, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = self.lm_head(self.norm(h))[0, 0].float()
        self.next_token.copy_(self._sample(logits))

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy at temperature 0, else temperature + top-p, all on the device (no host sync)."""
        greedy = logits.argmax()
        probs = torch.softmax(logits / self.temperature.clamp_min(1e-5), dim=-1)
        sorted_probs, order = probs.sort(descending=True)
        keep = (sorted_probs.cumsum(0) - sorted_probs) < self.top_p  # the top token always stays
        sorted_probs = sorted_probs * keep
        # argmax(p / E) with E ~ Exp(1) draws index i with probability p_i / sum(p).
        noise = torch.empty_like(sorted_probs).exponential_()
        drawn = order.gather(0, (sorted_probs / noise).argmax().view(1))[0]  # no host sync: capturable
        return torch.where(self.temperature > 0, drawn, greedy)

    def _bucket(self, slot: int) -> int:
        for b in self.buckets:
            if slot < b:
                return b
        raise ValueError(f"slot {slot} is past the decode buffer ({self.max_len} tokens)")

    def _capture(self, bucket: int) -> torch.cuda.CUDAGraph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up kernels/workspaces outside the graph
                self._step(bucket)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step(bucket)
        return graph

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Capture every bucket's graph (the slot is 0, so the captures write nothing that matters)."""
        if not self.use_graphs:
            return
        self.slot.zero_()
        for b in self.buckets:
            if b not in self.graphs:
                self.graphs[b] = self._capture(b)
        torch.cuda.synchronize()

    # -- a conversation ----------------------------------------------------------------------------

    @torch.inference_mode()
    def load(self, kv, length: int) -> None:
        """Copy the first `length` tokens of a transformers cache into the buffer."""
        for i, layer in enumerate(kv.layers):
            self.k[i, :, :, :length].copy_(layer.keys[:, :, :length])
            self.v[i, :, :, :length].copy_(layer.values[:, :, :length])

    @torch.inference_mode()
    def step(self, token: int, position: int, slot: int, temperature: float, top_p: float) -> torch.Tensor:
        """Feed `token` (rope `position`, cache `slot`); the next token as a 0-d device tensor."""
        self.token.fill_(token)
        self.position.fill_(position)
        self.slot.fill_(slot)
        self.temperature.fill_(temperature)
        self.top_p.fill_(top_p)
        bucket = self._bucket(slot)
        graph = self.graphs.get(bucket) if self.use_graphs else None
        if graph is None and self.use_graphs:
            graph = self.graphs[bucket] = self._capture(bucket)
        if graph is not None:
            graph.replay()
        else:
            self._step(bucket)
        return self.next_token

    @torch.inference_mode()
    def store(self, kv, start: int, end: int) -> None:
        """Append buffer tokens [start, end) to a transformers cache (so the prefix cache keeps them)."""
        if end <= start:
            return
        for i, layer in enumerate(kv.layers):
            layer.keys = torch.cat([layer.keys[:, :, :start], self.k[i, :, :, start:end].clone()], dim=2)
            layer.values = torch.cat([layer.values[:, :, :start], self.v[i, :, :, start:end].clone()], dim=2)
