"""The model runner: one forward pass over a packed batch of many sequences' tokens, into the paged KV pool.

A batch is the tokens of one step laid end to end: some sequences' single next tokens, some
sequences' prefill chunks. The decoder runs once over all of them, written directly against
Qwen3-VL's own modules (embeddings, norms, projections, MLP, lm_head, the model's M-RoPE
module for cos/sin), so every projection is one matrix multiply for the whole batch. Only
attention is per sequence: each token attends to its own sequence's earlier tokens, read from
that sequence's blocks in the pool, after this step's keys and values were written there.

Images: their rows carry vision-encoder embeddings instead of token embeddings, and the three
DeepStack feature sets are added to those rows after the first decoder layers, as
transformers' Qwen3VLTextModel does. Positions are each sequence's own 3-D M-RoPE positions.

`PagedAttention` is the plain torch path (gather the blocks, then SDPA): used on the CPU, in
the tests, and for prefill chunks on the GPU. A faster decode kernel can take its place for
decode rows (see `attention`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from chat.engine.local.kv import KVTensors
from chat.engine.local.layer_ops import Ops, fuse_projections


@dataclass
class SeqRows:
    """One sequence's rows in the batch: query rows [start, start + length), `context` tokens after this step."""

    start: int
    length: int
    context: int
    table: torch.Tensor  # (blocks,) block ids (on the host; the torch path moves them)


@dataclass
class PackedBatch:
    """Everything one step's forward needs, on the model's device."""

    ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (3, T) M-RoPE positions
    slots: torch.Tensor  # (T,) flat KV slots: block * block_size + offset
    seqs: list[SeqRows]
    sample_rows: torch.Tensor  # (n,) rows whose logits are wanted
    # The same per-sequence facts as device tensors, for kernels that take the whole batch at once:
    tables: torch.Tensor | None = None  # (seqs, max blocks) int32 block tables, 0-padded
    seq_lens: torch.Tensor | None = None  # (seqs,) int32 tokens after this step
    cu_q: torch.Tensor | None = None  # (seqs + 1,) int32 first row of each sequence, then T
    visual_rows: torch.Tensor | None = None  # (V,) rows that hold image tokens
    visual_embeds: torch.Tensor | None = None  # (V, hidden)
    deepstack: list[torch.Tensor] = field(default_factory=list)  # per DeepStack layer, (V, hidden)
    adapter_rows: torch.Tensor | None = None  # (T,) each row's LoRA adapter index (0: none); see lora.py


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The rotation RoPE pairs with cos/sin (first half with second half)."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class PagedAttention:
    """Attention of each sequence's query rows over its own KV blocks: gather, then SDPA."""

    def __init__(self, kv: KVTensors, scale: float) -> None:
        self.kv = kv
        self.scale = scale

    def __call__(self, layer: int, q: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """(T, heads, dim) queries -> (T, heads, dim) outputs."""
        out = torch.empty_like(q)
        for rows in batch.seqs:
            k, v = self.kv.gather(layer, rows.table.to(q.device), rows.context)
            qq = q[rows.start : rows.start + rows.length].transpose(0, 1).unsqueeze(0)
            mask = None
            if rows.length > 1:  # row j sits at context - length + j and sees keys up to there
                first = rows.context - rows.length
                key = torch.arange(rows.context, device=q.device).view(1, -1)
                query = torch.arange(first, rows.context, device=q.device).view(-1, 1)
                mask = key <= query
            o = F.scaled_dot_product_attention(
                qq, k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0), attn_mask=mask,
                scale=self.scale, enable_gqa=True,
            )
            out[rows.start : rows.start + rows.length] = o[0].transpose(0, 1)
        return out


def _plus(x: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    return x if extra is None else x + extra


def _qkv(attn, x: torch.Tensor, extra: torch.Tensor | None):
    """q, k and v projections of x through the modules, each with its part of `extra` (the adapters' share)."""
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    if extra is not None:
        dq, dk, dv = extra.split([q.shape[-1], k.shape[-1], v.shape[-1]], dim=-1)
        q, k, v = q + dq, k + dk, v + dv
    return q, k, v


class ModelStep:
    """Runs packed batches through one Qwen3-VL decoder, reading and writing the paged pool."""

    def __init__(self, model, kv: KVTensors, compiled: bool = False, lora=None) -> None:
        text = model.model.language_model
        cfg = model.config.get_text_config()
        self.layers = list(text.layers)
        self.norm = text.norm
        self.rotary = text.rotary_emb
        self.embed = model.get_input_embeddings()
        self.lm_head = model.lm_head
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = float(cfg.rms_norm_eps)
        self.kv = kv
        self.attention = PagedAttention(kv, self.layers[0].self_attn.scaling)
        self.ops = Ops(compiled)
        self.lora = lora  # a LoraSet (lora.py) when adapters are loaded: every step adds their share
        # --max-gpu-memory: accelerate keeps some weights elsewhere, and a hook on each module that holds them brings
        # them in when the module is called. Such a model runs `_hidden_by_modules`, which reads no weight directly.
        self.offloaded = any(p.device.type == "meta" for p in model.parameters()) or any(
            hasattr(m, "_hf_hook") for m in text.modules())
        # q/k/v and gate/up as one matrix multiply each (SiLU-gated MLPs only, as Qwen3-VL's is).
        self.fused = fuse_projections(self.layers) if getattr(cfg, "hidden_act", "silu") == "silu" and not \
            self.offloaded else None
        # The whole after-attention half in one call needs bias-free output and down projections (Qwen3-VL's are).
        self.fused_out = self.fused is not None and all(
            layer.self_attn.o_proj.bias is None and layer.mlp.down_proj.bias is None for layer in self.layers)

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, attend,
               visual_rows: torch.Tensor | None = None, visual_embeds: torch.Tensor | None = None,
               deepstack: list[torch.Tensor] = (), adapter_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states of tokens `ids` at (3, T) `positions`; KV written at `slots`.

        `attend(layer, q)` maps (T, heads, dim) queries to outputs, reading the pool after this
        layer's keys and values were written. Free of host syncs, so a decode step can be captured.
        `adapter_rows` (T,): each row's LoRA adapter (0: the base model), when a row uses one.
        """
        t, ops, eps = ids.shape[0], self.ops, self.eps
        # No row on an adapter (None): the step is exactly the base model's, at its full speed.
        lora = self.lora if adapter_rows is not None else None
        masks = lora.masks(adapter_rows) if lora is not None else None
        h = self.embed(ids)
        if visual_rows is not None:
            h[visual_rows] = visual_embeds.to(h.dtype)
        cos, sin = self.rotary(h, positions.view(3, 1, t))
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # (T, 1, dim)
        if self.offloaded:
            return self._hidden_by_modules(h, cos, sin, slots, attend, visual_rows, deepstack, masks)
        x = ops.rms(h, self.layers[0].input_layernorm.weight, eps)
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            following = self.layers[i + 1].input_layernorm.weight if i + 1 < len(self.layers) else self.norm.weight
            extra = lora.delta(i, "qkv", x, masks) if lora is not None else None
            if self.fused is not None:
                q, k, v = ops.attention_in(x, self.fused[i][0], attn.q_norm.weight, attn.k_norm.weight, eps, cos, sin,
                                           self.n_heads, self.n_kv, self.head_dim, extra)
            else:
                q, k, v = _qkv(attn, x, extra)
                q = ops.norm_rope(q.view(t, self.n_heads, self.head_dim), attn.q_norm.weight, eps, cos, sin)
                k = ops.norm_rope(k.view(t, self.n_kv, self.head_dim), attn.k_norm.weight, eps, cos, sin)
                v = v.view(t, self.n_kv, self.head_dim)
            self.kv.write(i, slots, k, v)
            o = attend(i, q).reshape(t, -1)
            if self.fused_out and lora is None and i >= len(deepstack):
                h, x = ops.attention_out(h, o, attn.o_proj.weight, layer.post_attention_layernorm.weight,
                                         self.fused[i][1], mlp.down_proj.weight, following, eps)
                continue
            h, x = ops.add_rms(h, _plus(attn.o_proj(o), lora and lora.delta(i, "o", o, masks)),
                               layer.post_attention_layernorm.weight, eps)
            delta = self._mlp(i, mlp, x, lora, masks) if lora is not None or self.fused is not None else mlp(x)
            if i < len(deepstack):  # image rows get this layer's DeepStack features on top
                h = h + delta
                h[visual_rows] += deepstack[i].to(h.dtype)
                x = ops.rms(h, following, eps)
            else:
                h, x = ops.add_rms(h, delta, following, eps)
        return x

    def _hidden_by_modules(self, h, cos, sin, slots, attend, visual_rows, deepstack, masks) -> torch.Tensor:
        """`hidden` for an offloaded model: every weight is used by calling its module (so its hook runs)."""
        t, lora = h.shape[0], self.lora if masks is not None else None
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = layer.input_layernorm(h)
            q, k, v = _qkv(attn, x, lora.delta(i, "qkv", x, masks) if lora is not None else None)
            q = attn.q_norm(q.view(t, self.n_heads, self.head_dim))
            k = attn.k_norm(k.view(t, self.n_kv, self.head_dim))
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            self.kv.write(i, slots, k, v.view(t, self.n_kv, self.head_dim))
            o = attend(i, q).reshape(t, -1)
            h = h + _plus(attn.o_proj(o), lora and lora.delta(i, "o", o, masks))
            h = h + self._mlp(i, mlp, layer.post_attention_layernorm(h), lora, masks)
            if i < len(deepstack):
                h[visual_rows] += deepstack[i].to(h.dtype)
        return self.norm(h)

    def _mlp(self, i: int, mlp, x: torch.Tensor, lora, masks) -> torch.Tensor:
        """Layer i's SiLU-gated MLP of x through the fused gate/up weight (or its modules), plus the adapters'
        share of each projection when `lora` is given."""
        gate_up = F.linear(x, self.fused[i][1]) if self.fused is not None else torch.cat(
            [mlp.gate_proj(x), mlp.up_proj(x)], dim=-1)
        act = self.ops.swiglu(_plus(gate_up, lora and lora.delta(i, "gate_up", x, masks)))
        return _plus(mlp.down_proj(act), lora and lora.delta(i, "down", act, masks))

    @torch.inference_mode()
    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Logits (float32) of `batch.sample_rows`; the batch's keys and values land in the pool."""
        h = self.hidden(batch.ids, batch.positions, batch.slots, lambda i, q: self.attention(i, q, batch),
                        batch.visual_rows, batch.visual_embeds, batch.deepstack, batch.adapter_rows)
        return self.lm_head(h.index_select(0, batch.sample_rows)).float()
