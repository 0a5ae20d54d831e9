"""Paged-KV attention kernels in Triton, for the engine on a GPU.

KV layout of one layer: (num_blocks, block_size, kv_heads, head_dim), the pool's own layout
(kv.py). Token p of a sequence lives in block `table[p // block_size]`, row `p % block_size`.

paged_decode: one query token per sequence, split-K ("flash decoding"): each program takes the
query heads of one KV head group over a slice of the sequence, so K/V are read once per group;
a second small kernel merges the slices. Sequence lengths and block tables are read on the
device and nothing syncs with the host, so a decode step that uses it can be captured as a
CUDA graph (the tensors are static buffers updated in place). Used by graphs.py.

paged_prefill: varlen and causal over a cached prefix: the packed queries of a mixed batch (some
sequences' prefill chunks, others' single decode tokens) in one launch; each sequence's new
keys and values must already be in the pool. Used for steps that are not decode-only.

Limits: head_dim a power of two (16..256); block_size a power of two; query heads a multiple of
KV heads; forward only. Written for this project (issue 10); bench/attention_kernels.py
measures them against SDPA and FlexAttention and checks them against an fp32 reference.
"""
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["num_splits"])  # one compiled kernel whatever the split count
def _decode_split_kernel(
    Q, K, V, BT, SEQ_LENS, PART_O, PART_LSE, scale_log2, num_splits,
    stride_qb, stride_qh,
    stride_kblk, stride_ktok, stride_kh,
    stride_vblk, stride_vtok, stride_vh,
    stride_btb,
    stride_pob, stride_poh, stride_pos,
    stride_plb, stride_plh,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(SEQ_LENS + b)
    # tokens per split, a whole number of BLOCK_N tiles
    per = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = s * per
    end = tl.minimum(start + per, seq_len)

    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * G + offs_g
    gmask = offs_g < G
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=gmask[:, None], other=0.0)

    m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    bt_row = BT + b * stride_btb
    for start_n in range(start, end, BLOCK_N):
        pos = start_n + offs_n
        nmask = pos < end
        blk = tl.load(bt_row + pos // PAGE, mask=nmask, other=0).to(tl.int64)
        row = pos % PAGE
        k = tl.load(K + blk[:, None] * stride_kblk + row[:, None] * stride_ktok
                    + kvh * stride_kh + offs_d[None, :], mask=nmask[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * scale_log2
        qk = tl.where(nmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + blk[:, None] * stride_vblk + row[:, None] * stride_vtok
                    + kvh * stride_vh + offs_d[None, :], mask=nmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    po = PART_O + b * stride_pob + heads[:, None] * stride_poh + s * stride_pos + offs_d[None, :]
    tl.store(po, out, mask=gmask[:, None])
    tl.store(PART_LSE + b * stride_plb + heads * stride_plh + s, lse, mask=gmask)


@triton.jit(do_not_specialize=["num_splits"])  # one compiled kernel whatever the split count
def _decode_merge_kernel(
    PART_O, PART_LSE, OUT, num_splits,
    stride_pob, stride_poh, stride_pos,
    stride_plb, stride_plh,
    stride_ob, stride_oh,
    D: tl.constexpr, SP: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SP)
    offs_d = tl.arange(0, D)
    smask = offs_s < num_splits
    lse = tl.load(PART_LSE + b * stride_plb + h * stride_plh + offs_s, mask=smask,
                  other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.where(lse == float("-inf"), 0.0, tl.math.exp2(lse - m))
    o = tl.load(PART_O + b * stride_pob + h * stride_poh + offs_s[:, None] * stride_pos
                + offs_d[None, :], mask=smask[:, None], other=0.0)
    den = tl.sum(w, 0)
    res = tl.sum(o * w[:, None], 0) / tl.where(den > 0.0, den, 1.0)
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_d, res.to(OUT.dtype.element_ty))


class DecodeWorkspace:
    """Split buffers for paged_decode, allocated once (keep them alive across graph replays)."""

    def __init__(self, max_batch, num_q_heads, head_dim, max_splits, device):
        self.part_o = torch.empty(max_batch, num_q_heads, max_splits, head_dim,
                                  dtype=torch.float32, device=device)
        self.part_lse = torch.empty(max_batch, num_q_heads, max_splits,
                                    dtype=torch.float32, device=device)
        self.max_splits = max_splits


def paged_decode(q, k_cache, v_cache, block_table, seq_lens, num_splits, out=None,
                 workspace=None, scale=None, block_n=None, num_warps=4, num_stages=2):
    B, Hq, D = q.shape
    _, PAGE, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    assert Hq == G * Hkv and k_cache.stride(-1) == 1 and q.stride(-1) == 1
    if workspace is None:
        workspace = DecodeWorkspace(B, Hq, D, max(num_splits, 1), q.device)
    assert num_splits <= workspace.max_splits
    if out is None:
        out = torch.empty_like(q)
    scale = (1.0 / math.sqrt(D)) if scale is None else scale
    block_n = block_n or max(16, min(64, 4 * PAGE))
    po, pl = workspace.part_o, workspace.part_lse
    _decode_split_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, po, pl, scale * LOG2E, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0),
        po.stride(0), po.stride(1), po.stride(2),
        pl.stride(0), pl.stride(1),
        G=G, GP=max(16, triton.next_power_of_2(G)), D=D, PAGE=PAGE, BLOCK_N=block_n,
        num_warps=num_warps, num_stages=num_stages,
    )
    _decode_merge_kernel[(B, Hq)](
        po, pl, out, num_splits,
        po.stride(0), po.stride(1), po.stride(2),
        pl.stride(0), pl.stride(1),
        out.stride(0), out.stride(1),
        D=D, SP=triton.next_power_of_2(workspace.max_splits), num_warps=4,
    )
    return out


@triton.jit(do_not_specialize=["num_seqs"])  # one compiled kernel whatever the batch
def _prefill_kernel(
    Q, K, V, OUT, BT, SEQ_LENS, CU_Q, CU_TILES, num_seqs, scale_log2,
    stride_qt, stride_qh,
    stride_kblk, stride_ktok, stride_kh,
    stride_vblk, stride_vtok, stride_vh,
    stride_btb,
    stride_ot, stride_oh,
    G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * G
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    # sequence owning this tile: first b with CU_TILES[b + 1] > pid
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(CU_TILES + mid + 1) <= pid:
            lo = mid + 1
        else:
            hi = mid
    b = lo
    if b < num_seqs:
        tile = pid - tl.load(CU_TILES + b)
        q_start = tl.load(CU_Q + b)
        q_len = tl.load(CU_Q + b + 1) - q_start
        seq_len = tl.load(SEQ_LENS + b)
        prefix = seq_len - q_len

        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        qi = tile * BLOCK_Q + offs_m // G          # token index within the sequence's chunk
        heads = kvh * G + offs_m % G
        rmask = qi < q_len
        q = tl.load(Q + (q_start + qi)[:, None].to(tl.int64) * stride_qt
                    + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=rmask[:, None], other=0.0)
        qpos = prefix + qi
        kv_end = tl.minimum(seq_len, prefix + tl.minimum(tile * BLOCK_Q + BLOCK_Q, q_len))

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        bt_row = BT + b * stride_btb
        for start_n in range(0, kv_end, BLOCK_N):
            pos = start_n + offs_n
            nmask = pos < kv_end
            blk = tl.load(bt_row + pos // PAGE, mask=nmask, other=0).to(tl.int64)
            row = pos % PAGE
            k = tl.load(K + blk[:, None] * stride_kblk + row[:, None] * stride_ktok
                        + kvh * stride_kh + offs_d[None, :], mask=nmask[:, None], other=0.0)
            qk = tl.dot(q, tl.trans(k)) * scale_log2
            ok = nmask[None, :] & (pos[None, :] <= qpos[:, None])
            qk = tl.where(ok, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + blk[:, None] * stride_vblk + row[:, None] * stride_vtok
                        + kvh * stride_vh + offs_d[None, :], mask=nmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(OUT + (q_start + qi)[:, None].to(tl.int64) * stride_ot
                 + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(OUT.dtype.element_ty), mask=rmask[:, None])


def prefill_tiles(cu_seqlens_q, block_q):
    """Cumulative tile counts per sequence, on the device (no host sync)."""
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    tiles = (q_lens + block_q - 1) // block_q
    return torch.cat([tiles.new_zeros(1), torch.cumsum(tiles, 0)]).to(torch.int32)


def paged_prefill(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_tiles=None,
                  out=None, cu_tiles=None, scale=None, block_q=16, block_n=64, num_warps=4,
                  num_stages=2):
    T, Hq, D = q.shape
    _, PAGE, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    B = seq_lens.shape[0]
    assert Hq == G * Hkv and k_cache.stride(-1) == 1 and q.stride(-1) == 1
    if max_tiles is None:
        max_tiles = T // block_q + B
    if cu_tiles is None:
        cu_tiles = prefill_tiles(cu_seqlens_q, block_q)
    if out is None:
        out = torch.empty_like(q)
    scale = (1.0 / math.sqrt(D)) if scale is None else scale
    _prefill_kernel[(max_tiles, Hkv)](
        q, k_cache, v_cache, out, block_table, seq_lens, cu_seqlens_q, cu_tiles, B,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0),
        out.stride(0), out.stride(1),
        G=G, D=D, PAGE=PAGE, BLOCK_Q=block_q, BLOCK_N=block_n,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
