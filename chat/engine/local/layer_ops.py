"""The decoder layer's small operations, written so the GPU can fuse them.

Each function below is what transformers' Qwen3-VL modules compute (RMSNorm in float32, RoPE
with rotate-half, SiLU-gated MLP), in one place. On the CPU they run as plain torch; on a GPU
the engine compiles each with torch.compile, which turns each into one or two Triton kernels
instead of five to ten small ones: in a captured decode step of 36 layers the launches saved
are most of the gap between a step and the time to read the weights.

`fuse_projections` lays q/k/v and gate/up weights side by side in one tensor per layer (the
modules keep views into it, so memory does not grow), so each layer runs two input matrix
multiplies instead of five.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis, computed in float32."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """Residual add, then RMSNorm of the sum: (sum, normed)."""
    h = h + delta
    return h, rms(h, weight, eps)


def norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Per-head RMSNorm, then rotary embedding (rotate-half form)."""
    x = rms(x, weight, eps)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up, from the fused gate/up projection's output."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def attention_in(x: torch.Tensor, w_qkv: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor, eps: float,
                 cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int, dim: int,
                 extra: torch.Tensor | None = None):
    """A layer up to attention: the fused q/k/v projection (plus `extra`, the LoRA adapters' share), per-head
    norms and rotary; (q, k, v)."""
    t = x.shape[0]
    qkv = F.linear(x, w_qkv)
    if extra is not None:
        qkv = qkv + extra
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q = norm_rope(q.reshape(t, heads, dim), q_norm, eps, cos, sin)
    k = norm_rope(k.reshape(t, kv_heads, dim), k_norm, eps, cos, sin)
    return q, k, v.reshape(t, kv_heads, dim)


def attention_out(h: torch.Tensor, o: torch.Tensor, w_o: torch.Tensor, post_norm: torch.Tensor, w_gate_up: torch.Tensor,
                  w_down: torch.Tensor, next_norm: torch.Tensor, eps: float):
    """A layer after attention: output projection, residual, norm, SiLU-gated MLP, residual, the next norm."""
    h = h + F.linear(o, w_o)
    x = rms(h, post_norm, eps)
    h = h + F.linear(swiglu(F.linear(x, w_gate_up)), w_down)
    return h, rms(h, next_norm, eps)


class Ops:
    """The functions a step uses: plain, or compiled for the GPU.

    Compiled, a layer is two calls around attention (`attention_in`, `attention_out`) instead of
    some thirty small operations: fewer kernels on the GPU, and far less Python per layer in steps
    that are not captured as graphs (those that read someone's prompt).
    """

    def __init__(self, compiled: bool = False) -> None:
        self.rms, self.add_rms, self.norm_rope, self.swiglu = rms, add_rms, norm_rope, swiglu
        self.attention_in, self.attention_out = attention_in, attention_out
        if compiled:
            opts = {"dynamic": True, "fullgraph": True}
            self.rms = torch.compile(rms, **opts)
            self.add_rms = torch.compile(add_rms, **opts)
            self.norm_rope = torch.compile(norm_rope, **opts)
            self.swiglu = torch.compile(swiglu, **opts)
            self.attention_in = torch.compile(attention_in, **opts)
            self.attention_out = torch.compile(attention_out, **opts)


def _stack(linears: list) -> torch.Tensor | None:
    """One weight tensor holding `linears`' weights one after the other; the modules get views into it."""
    if any(lin.bias is not None for lin in linears):
        return None
    weights = [lin.weight for lin in linears]
    if not all(w.dtype.is_floating_point and w.device.type != "meta" for w in weights):
        return None  # quantized (bitsandbytes) or offloaded (accelerate) weights: the modules run them
    if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
        return None
    fused = torch.cat([w.detach() for w in weights], dim=0)
    start = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight.data = fused[start : start + n]  # the separate tensor is freed; the module still works
        start += n
    return fused


def fuse_projections(layers: list) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per layer (qkv weight, gate_up weight), or None if the model's projections cannot be fused."""
    out = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = _stack([attn.q_proj, attn.k_proj, attn.v_proj])
        gate_up = _stack([mlp.gate_proj, mlp.up_proj])
        if qkv is None or gate_up is None:
            log.warning("projection weights could not be fused; the step uses them one by one")
            return None
        out.append((qkv, gate_up))
    return out
