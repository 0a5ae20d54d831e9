"""The GPU's fast paths: Triton paged attention for every step, CUDA graphs for decode-only steps.

A decode-only step (every row is one sequence's next token) is the common case once answers
stream. Launching its ~600 small kernels from Python costs more than the GPU needs to run them,
so the whole step (embeddings, 36 layers with the paged decode kernel, lm_head) is captured
once per batch size (1, 2, 4, ... 64) as a CUDA graph and replayed: the step's inputs go into
static buffers, padding rows point at the scratch block 0, and the kernel reads each row's
block table and length on the device, so attention reads only the blocks in use.

Mixed steps (prefill chunks with or without decode rows) run eagerly with `TritonAttention`,
one varlen kernel launch per layer for the whole packed batch.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from chat.engine.local.scheduler import StepPlan
from chat.engine.local.step import ModelStep, PackedBatch

log = logging.getLogger(__name__)

GRAPH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


class TritonAttention:
    """Attention for a packed mixed batch: one varlen paged kernel launch per layer."""

    def __init__(self, kv, scale: float) -> None:
        from chat.engine.local import triton_attention as ta

        self.ta = ta
        self.kv = kv
        self.scale = scale
        self._batch: PackedBatch | None = None
        self._tiles = None

    def __call__(self, layer: int, q: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """(T, heads, dim) queries -> outputs, each row over its own sequence's blocks."""
        if batch is not self._batch:  # once per step, not per layer
            self._batch = batch
            self._tiles = self.ta.prefill_tiles(batch.cu_q, 16)
        return self.ta.paged_prefill(q, self.kv.k[layer], self.kv.v[layer], batch.tables, batch.seq_lens, batch.cu_q,
                                     max_tiles=q.shape[0] // 16 + batch.seq_lens.shape[0], cu_tiles=self._tiles,
                                     scale=self.scale)


class DecodeGraphs:
    """One captured decode step per batch size; `run(plan)` fills the static inputs and replays."""

    def __init__(self, step: ModelStep, max_batch: int, max_blocks: int) -> None:
        from chat.engine.local import triton_attention as ta

        self.ta = ta
        self.step = step
        self.kv = step.kv
        device = step.kv.k.device
        self.sizes = [b for b in GRAPH_SIZES if b <= max(1, max_batch)]
        self.max_batch = self.sizes[-1]
        n = self.max_batch
        # Token ids, positions, KV slots, lengths and LoRA adapters in one buffer, so a step's inputs are one copy.
        self.meta = torch.zeros(5, n, dtype=torch.long, device=device)
        self.ids, self.pos, self.slots, self.seq_lens = self.meta[0], self.meta[1], self.meta[2], self.meta[3]
        self.adapters = self.meta[4]
        self.tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.logits = torch.zeros(n, step.lm_head.out_features, dtype=torch.float32, device=device)
        # Off a GPU (the tests run the kernels in Triton's interpreter) the step runs eagerly, uncaptured.
        self.eager = device.type != "cuda"
        self.sms = 8 if self.eager else torch.cuda.get_device_properties(device).multi_processor_count
        self.workspace = ta.DecodeWorkspace(n, step.n_heads, step.head_dim, 32, device)
        self.scale = step.layers[0].self_attn.scaling
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self.steps = 0  # decode steps served

    def splits(self, batch: int) -> int:
        """How many slices each sequence's context is cut into: about four programs per SM in flight,
        and never fewer than 8 (measured on an H200: 32 at batch 1, 9 at 8, 8 from 32 up were best)."""
        return max(8, min(32, math.ceil(4 * self.sms / (batch * self.step.n_kv))))

    def _decode(self, b: int, lora: bool = False) -> None:
        splits = self.splits(b)

        def attend(layer: int, q: torch.Tensor) -> torch.Tensor:
            return self.ta.paged_decode(q, self.kv.k[layer], self.kv.v[layer], self.tables[:b], self.seq_lens[:b],
                                        splits, workspace=self.workspace, scale=self.scale)

        pos = self.pos[:b].view(1, b).expand(3, b)
        rows = self.adapters[:b] if lora else None
        h = self.step.hidden(self.ids[:b], pos, self.slots[:b], attend, adapter_rows=rows)
        self.logits[:b].copy_(self.step.lm_head(h).float())

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every batch size (the inputs point at the scratch block, so nothing real is written)."""
        self._reset(0)
        if self.eager:
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        # With LoRA adapters loaded, a second set whose steps add them: a batch with no row on an adapter
        # replays the first set, at the base model's speed.
        kinds = (False, True) if self.step.lora is not None else (False,)
        with torch.cuda.stream(stream):
            for b in self.sizes:
                for lora in kinds:
                    for _ in range(2):  # compile kernels and fill workspaces outside the graph
                        self._decode(b, lora)
        torch.cuda.current_stream().wait_stream(stream)
        for b in reversed(self.sizes):  # largest first, so the smaller ones fit in its memory pool
            for lora in kinds:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    self._decode(b, lora)
                if self._pool is None:
                    self._pool = graph.pool()
                self.graphs[(b, lora)] = graph
        torch.cuda.synchronize()

    def _reset(self, start: int) -> None:
        self.meta[:, start:].zero_()
        self.seq_lens[start:].fill_(1)
        self.tables[start:].zero_()

    def fits(self, plan: StepPlan) -> bool:
        """Whether a captured graph can run this plan."""
        return (self.eager or bool(self.graphs)) and plan.decode_only and len(plan.chunks) <= self.max_batch

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> torch.Tensor:
        """Logits (rows in plan order) of a decode-only step."""
        n = len(plan.chunks)
        b = next(s for s in self.sizes if s >= n)
        self.steps += 1
        bs = self.kv.block_size
        width = max(len(c.seq.blocks) for c in plan.chunks)
        meta = np.zeros((5, b), dtype=np.int64)
        meta[3] = 1  # padding rows read one token of the scratch block
        table = np.zeros((b, width), dtype=np.int32)
        for i, chunk in enumerate(plan.chunks):
            seq, p = chunk.seq, chunk.start
            meta[0, i] = seq.tokens[p]
            meta[1, i] = seq.text_position(p)  # a decode row is text: its three M-RoPE axes are equal
            meta[2, i] = seq.blocks[p // bs] * bs + p % bs
            meta[3, i] = p + 1
            meta[4, i] = seq.adapter_index
            table[i, : len(seq.blocks)] = seq.blocks
        self.meta[:, :b].copy_(torch.from_numpy(meta), non_blocking=True)
        self.tables[:b, :width].copy_(torch.from_numpy(table), non_blocking=True)
        lora = bool(meta[4].any())
        if self.eager:
            self._decode(b, lora)
        else:
            self.graphs[(b, lora)].replay()
        return self.logits[:n]
