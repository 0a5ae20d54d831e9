"""Torch paths over a paged KV cache (issue 10 research): fp32 reference, SDPA over gathered
blocks (the CPU / test path), and FlexAttention with a paged block mask.

Cache layout, one layer: (num_blocks, PAGE, Hkv, D), the same as chat/engine/local/triton_attention.py.
"""
import inspect
import math

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- fp32 reference (correctness)
def reference_varlen(q, k_cache, v_cache, block_table, seq_lens, cu_q):
    """q: (T, Hq, D); seq_lens / cu_q / block_table as lists or tensors. Exact fp32 math."""
    seq_lens = [int(x) for x in seq_lens]
    cu_q = [int(x) for x in cu_q]
    _, PAGE, Hkv, D = k_cache.shape
    Hq = q.shape[1]
    G = Hq // Hkv
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b, L in enumerate(seq_lens):
        s, e = cu_q[b], cu_q[b + 1]
        nb = -(-L // PAGE)
        blocks = block_table[b, :nb].long()
        k = k_cache[blocks].reshape(nb * PAGE, Hkv, D)[:L].float().repeat_interleave(G, 1)
        v = v_cache[blocks].reshape(nb * PAGE, Hkv, D)[:L].float().repeat_interleave(G, 1)
        qq = q[s:e].float()                                   # (n, Hq, D)
        sc = torch.einsum("nhd,lhd->hnl", qq, k) / math.sqrt(D)
        qpos = L - (e - s) + torch.arange(e - s, device=q.device)
        allowed = torch.arange(L, device=q.device)[None, :] <= qpos[:, None]
        sc = sc.masked_fill(~allowed[None], float("-inf"))
        out[s:e] = torch.einsum("hnl,lhd->nhd", sc.softmax(-1), v)
    return out


# ---------------------------------------------------------------- SDPA over gathered blocks
def gather_decode_sdpa(q, k_cache, v_cache, block_table, seq_lens, max_blocks):
    """Decode, q: (B, Hq, D). Gathers max_blocks blocks per sequence (a fixed bucket, so the
    shapes are static and the call can be captured), masks past seq_len. The G query heads of a
    KV head are folded into the query-length axis, so no KV head expansion is needed."""
    B, Hq, D = q.shape
    _, PAGE, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    bt = block_table[:, :max_blocks]
    Lb = max_blocks * PAGE
    k = k_cache[bt].view(B, Lb, Hkv, D).transpose(1, 2)
    v = v_cache[bt].view(B, Lb, Hkv, D).transpose(1, 2)
    mask = (torch.arange(Lb, device=q.device)[None, :] < seq_lens[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(q.view(B, Hkv, G, D), k, v, attn_mask=mask)
    return o.reshape(B, Hq, D)


def _sdpa_chunk(qb, k, v, prefix):
    """qb: (n, Hq, D) new tokens at positions prefix..prefix+n-1; k, v: (L, Hkv, D) contiguous
    used KV of that sequence (L = prefix + n). Causal with offset; GQA folded into rows."""
    n, Hq, D = qb.shape
    L, Hkv, _ = k.shape
    G = Hq // Hkv
    kk, vv = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if prefix == 0 and n > 1:   # plain causal: the flash backend takes GQA directly
        o = F.scaled_dot_product_attention(qb.transpose(0, 1)[None], kk, vv, is_causal=True,
                                           enable_gqa=True)
        return o[0].transpose(0, 1)
    qf = qb.view(n, Hkv, G, D).permute(1, 0, 2, 3).reshape(1, Hkv, n * G, D)
    if n == 1:
        o = F.scaled_dot_product_attention(qf, kk, vv)
    else:
        qpos = (prefix + torch.arange(n, device=qb.device)).repeat_interleave(G)
        mask = torch.arange(L, device=qb.device)[None, :] <= qpos[:, None]
        o = F.scaled_dot_product_attention(qf, kk, vv, attn_mask=mask)
    return o.view(Hkv, n, G, D).permute(1, 0, 2, 3).reshape(n, Hq, D)


def gather_varlen_sdpa(q, k_cache, v_cache, block_table, seq_lens, cu_q):
    """Mixed batch: sequences with more than one new token get one SDPA each over their gathered
    blocks; the decode rows (one new token) go through gather_decode_sdpa together.
    seq_lens / cu_q are host lists (a prefill step is planned on the host anyway)."""
    _, PAGE, Hkv, D = k_cache.shape
    out = torch.empty_like(q)
    dec = [b for b in range(len(seq_lens)) if cu_q[b + 1] - cu_q[b] == 1]
    for b in range(len(seq_lens)):
        s, e, L = cu_q[b], cu_q[b + 1], seq_lens[b]
        if e - s == 1 and dec:
            continue
        nb = -(-L // PAGE)
        k = k_cache[block_table[b, :nb]].view(nb * PAGE, Hkv, D)[:L]
        v = v_cache[block_table[b, :nb]].view(nb * PAGE, Hkv, D)[:L]
        out[s:e] = _sdpa_chunk(q[s:e], k, v, L - (e - s))
    if dec:
        idx = torch.tensor(dec, device=q.device)
        rows = torch.tensor([cu_q[b] for b in dec], device=q.device)
        lens = torch.tensor([seq_lens[b] for b in dec], device=q.device)
        mb = -(-max(seq_lens[b] for b in dec) // PAGE)
        out[rows] = gather_decode_sdpa(q[rows], k_cache, v_cache, block_table[idx], lens, mb)
    return out


def contiguous_varlen_sdpa(q, ks, vs, seq_lens, cu_q):
    """Reference timing path: the same SDPA calls over contiguous used-KV tensors ks[b], vs[b]
    of shape (L_b, Hkv, D) (no gather)."""
    out = torch.empty_like(q)
    for b in range(len(seq_lens)):
        s, e = cu_q[b], cu_q[b + 1]
        out[s:e] = _sdpa_chunk(q[s:e], ks[b], vs[b], seq_lens[b] - (e - s))
    return out


# ---------------------------------------------------------------- FlexAttention, paged
_HAS_CQB = None


def _block_mask(kv_num, kv_idx, full_num, full_idx, bs, mask_mod, seq_lengths):
    from torch.nn.attention.flex_attention import BlockMask
    global _HAS_CQB
    if _HAS_CQB is None:
        _HAS_CQB = "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters
    kw = {"compute_q_blocks": False} if _HAS_CQB else {}
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=bs,
                                    mask_mod=mask_mod, seq_lengths=seq_lengths, **kw)


def flex_kv_view(cache):
    """(num_blocks, PAGE, Hkv, D) -> (1, Hkv, num_blocks * PAGE, D), a view (no copy)."""
    nb, P, H, D = cache.shape
    return cache.view(nb * P, H, D).permute(1, 0, 2).unsqueeze(0)


class FlexDecode:
    """Decode block mask over static buffers: full blocks go in full_kv_indices (the fused kernel
    evaluates no mask_mod there), the partial last block in kv_indices. mask_mod is exact on
    every position (page owner and logical position, as torch's PagedAttention helper does; the
    eager path evaluates it everywhere). update() is device-only (graph-safe); the BlockMask
    object is built once per batch size and reused across replays and layers."""

    def __init__(self, max_batch, max_blocks, page, n_slots, device, full_blocks=True):
        i32 = dict(dtype=torch.int32, device=device)
        self.page, self.max_blocks, self.n_slots = page, max_blocks, n_slots
        # full_blocks=False lists every block as partial (mask_mod evaluated everywhere): torch
        # 2.11's flex decoding splits the KV work by the whole pool length when full blocks are
        # given (a TODO in its template), by the listed blocks otherwise
        self.full_blocks = full_blocks
        nblocks = -(-n_slots // page)
        self.seq_len = torch.zeros(max_batch, **i32)
        self.page_owner = torch.full((nblocks + 1,), -1, **i32)   # last entry: a dummy
        self.page_lblk = torch.zeros(nblocks + 1, **i32)
        self.kv_num = torch.zeros(max_batch, 1, 1, **i32)
        self.full_num = torch.zeros(max_batch, 1, 1, **i32)
        # index arrays as wide as the pool, as torch's PagedAttention helper makes them: the
        # dense conversions inside flex size the KV axis by this width
        width = max(max_blocks, nblocks)
        self.kv_idx = torch.zeros(max_batch, 1, 1, width, **i32)
        self.full_idx = torch.zeros(max_batch, 1, 1, width, **i32)
        seq_len, owner, lblk, P = self.seq_len, self.page_owner, self.page_lblk, page

        def mask_mod(b, h, q_idx, kv_idx):
            pg = kv_idx // P
            return (owner[pg] == b) & (lblk[pg] * P + kv_idx % P < seq_len[b])
        self.mask_mod = mask_mod

    def update(self, block_table, seq_lens):
        B = seq_lens.shape[0]
        P, mb = self.page, self.max_blocks
        bt = block_table[:, :mb].to(torch.int32)
        n_full = (seq_lens // P).to(torch.int32)
        rem = (seq_lens - n_full * P).to(torch.int32)
        n_used = n_full + (rem > 0).to(torch.int32)
        if self.full_blocks:
            self.full_num[:B, 0, 0] = n_full
            self.full_idx[:B, 0, 0, :mb] = bt
            self.kv_num[:B, 0, 0] = (rem > 0).to(torch.int32)
            last = bt.gather(1, n_full.clamp(max=mb - 1).long()[:, None])[:, 0]
            self.kv_idx[:B, 0, 0, 0] = last
        else:
            self.kv_num[:B, 0, 0] = n_used
            self.kv_idx[:B, 0, 0, :mb] = bt
        self.seq_len[:B] = seq_lens.to(torch.int32)
        j = torch.arange(mb, device=bt.device, dtype=torch.int32)
        dummy = self.page_owner.shape[0] - 1
        idx = torch.where(j[None, :] < n_used[:, None], bt, dummy).long().flatten()
        self.page_owner.fill_(-1)
        self.page_owner[idx] = torch.arange(B, device=bt.device, dtype=torch.int32).repeat_interleave(mb)
        self.page_lblk[idx] = j.repeat(B)
        self.page_owner[dummy] = -1

    def block_mask(self, B):
        full = (self.full_num[:B], self.full_idx[:B]) if self.full_blocks else (None, None)
        return _block_mask(self.kv_num[:B], self.kv_idx[:B], *full, (128, self.page),
                           self.mask_mod, (1, self.n_slots))


class FlexVarlen:
    """Packed mixed batch as one 'sequence' of T query rows against the whole pool; the block
    mask lists, per 128-row query block, the physical pages of every sequence in it (full when
    the query block lies in one sequence and the page is wholly before its first position).
    mask_mod checks same sequence and causal position via per-row / per-page tables."""
    QB = 128

    def __init__(self, max_rows, num_blocks, page, device):
        i32 = dict(dtype=torch.int32, device=device)
        self.page, self.num_blocks, self.device = page, num_blocks, device
        self.q_seq = torch.zeros(max_rows, **i32)
        self.q_pos = torch.zeros(max_rows, **i32)
        self.page_seq = torch.full((num_blocks,), -1, **i32)
        self.page_lblk = torch.zeros(num_blocks, **i32)
        q_seq, q_pos, page_seq, page_lblk, P = (self.q_seq, self.q_pos, self.page_seq,
                                                self.page_lblk, page)

        def mask_mod(b, h, q_idx, kv_idx):
            pg = kv_idx // P
            return (page_seq[pg] == q_seq[q_idx]) & (page_lblk[pg] * P + kv_idx % P <= q_pos[q_idx])
        self.mask_mod = mask_mod

    def build(self, block_table_host, seq_lens, cu_q):
        P, QB = self.page, self.QB
        T = cu_q[-1]
        q_seq, q_pos = [], []
        self.page_seq.fill_(-1)
        for b, L in enumerate(seq_lens):
            n = cu_q[b + 1] - cu_q[b]
            q_seq += [b] * n
            q_pos += list(range(L - n, L))
            nb = -(-L // P)
            pages = torch.as_tensor(block_table_host[b][:nb], device=self.device).long()
            self.page_seq[pages] = b
            self.page_lblk[pages] = torch.arange(nb, dtype=torch.int32, device=self.device)
        self.q_seq[:T] = torch.tensor(q_seq, dtype=torch.int32, device=self.device)
        self.q_pos[:T] = torch.tensor(q_pos, dtype=torch.int32, device=self.device)
        nqb = -(-T // QB)
        part, full = [], []
        for qb in range(nqb):
            r0, r1 = qb * QB, min(T, qb * QB + QB)
            seqs = sorted(set(q_seq[r0:r1]))
            pp, ff = [], []
            for b in seqs:
                rows = [r for r in range(r0, r1) if q_seq[r] == b]
                pmin, pmax = q_pos[rows[0]], q_pos[rows[-1]]
                single = len(seqs) == 1
                for lb in range(pmax // P + 1):
                    page = block_table_host[b][lb]
                    if single and lb * P + P - 1 <= pmin:
                        ff.append(page)
                    else:
                        pp.append(page)
            part.append(pp)
            full.append(ff)
        w = max(1, max(len(x) for x in part), max(len(x) for x in full), self.num_blocks)

        def pack(lists):
            num = torch.tensor([len(x) for x in lists], dtype=torch.int32).view(1, 1, nqb)
            idx = torch.zeros(1, 1, nqb, w, dtype=torch.int32)
            for i, x in enumerate(lists):
                if x:
                    idx[0, 0, i, :len(x)] = torch.tensor(x, dtype=torch.int32)
            return num.to(self.device), idx.to(self.device)
        kv_num, kv_idx = pack(part)
        full_num, full_idx = pack(full)
        return _block_mask(kv_num, kv_idx, full_num, full_idx, (QB, P), self.mask_mod,
                           (T, self.num_blocks * P))
