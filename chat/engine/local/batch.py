"""A step plan as one packed batch: token ids, positions, KV slots, block tables and image rows."""

from __future__ import annotations

import torch

from chat.engine.local.scheduler import StepPlan, blocks_for
from chat.engine.local.step import PackedBatch, SeqRows


def pack(plan: StepPlan, block_size: int, device: torch.device) -> PackedBatch:
    """Lay the plan's chunks end to end; every image token's row takes its image's features."""
    ids: list[int] = []
    slots: list[int] = []
    positions = []
    seqs: list[SeqRows] = []
    sample_rows: list[int] = []
    vis_rows, vis_embeds, vis_deep = [], [], []
    adapters: list[int] = []
    offset = 0
    for chunk in plan.chunks:
        seq, a = chunk.seq, chunk.start
        b = a + chunk.length
        ids.extend(seq.tokens[a:b])
        adapters.extend([seq.adapter_index] * chunk.length)
        positions.append(seq.positions(a, b))
        table = seq.blocks
        slots.extend(table[i // block_size] * block_size + i % block_size for i in range(a, b))
        used = torch.tensor(table[: blocks_for(b, block_size)], dtype=torch.long)
        seqs.append(SeqRows(offset, chunk.length, b, used))
        for span in seq.prompt.images:
            lo, hi = max(a, span.start), min(b, span.start + span.length)
            if lo >= hi:
                continue
            feats = seq.features[span.image_id]
            vis_rows.append(torch.arange(offset + lo - a, offset + hi - a))
            vis_embeds.append(feats.embeds[lo - span.start : hi - span.start])
            vis_deep.append([d[lo - span.start : hi - span.start] for d in feats.deepstack])
        if chunk.samples:
            sample_rows.append(offset + chunk.length - 1)
        offset += chunk.length
    width = max(r.table.shape[0] for r in seqs)
    tables = torch.zeros(len(seqs), width, dtype=torch.int32)
    for i, chunk in enumerate(plan.chunks):
        n = seqs[i].table.shape[0]
        tables[i, :n] = torch.tensor(chunk.seq.blocks[:n], dtype=torch.int32)
    cu_q = torch.tensor([0, *(r.start + r.length for r in seqs)], dtype=torch.int32)
    batch = PackedBatch(
        tables=tables.to(device, non_blocking=True),
        seq_lens=torch.tensor([r.context for r in seqs], dtype=torch.int32).to(device, non_blocking=True),
        cu_q=cu_q.to(device, non_blocking=True),
        ids=torch.tensor(ids, dtype=torch.long).to(device, non_blocking=True),
        positions=torch.cat(positions, dim=1).to(device, non_blocking=True),
        slots=torch.tensor(slots, dtype=torch.long).to(device, non_blocking=True),
        seqs=seqs,
        sample_rows=torch.tensor(sample_rows, dtype=torch.long).to(device, non_blocking=True),
    )
    if any(adapters):
        batch.adapter_rows = torch.tensor(adapters, dtype=torch.long).to(device, non_blocking=True)
    if vis_rows:
        batch.visual_rows = torch.cat(vis_rows).to(device)
        batch.visual_embeds = torch.cat(vis_embeds)
        batch.deepstack = [torch.cat([d[k] for d in vis_deep]) for k in range(len(vis_deep[0]))]
    return batch
