"""Who runs in the next step: every decoding sequence's next token plus prefill chunks, under a budget.

Each step is one forward pass over a packed batch of at most `max_batch_tokens` tokens:
1. every running sequence that decodes feeds its newest token (oldest first);
2. sequences still prefilling continue with the next chunk of their prompt;
3. waiting requests are admitted first come, first served while the budget, `max_running` and
   the pool allow, skipping any whose owner already runs `max_per_owner` requests (one API
   client cannot take every slot). Admission looks up the prompt's full blocks by name in the
   pool (the prefix cache) and computes only the rest, in chunks.
A long prompt (a big image, a long history) is therefore split over several steps, and the
sequences already decoding get a token in every one of them. A step with no decoding sequence
in it keeps nobody waiting, so it may take up to four budgets (at most 8,192 tokens) of prefill.

When a decoding sequence needs a new block and the pool has none, the newest running sequence
is preempted: its blocks go back (named ones stay cached) and it waits at the front of the
queue to be recomputed, keeping what it has generated. Nobody fails for lack of KV memory
unless a single request cannot fit the whole pool, which admission refuses up front.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from chat.engine.local.kv import BlockPool
from chat.engine.local.sequence import Sequence


@dataclass
class Chunk:
    """Tokens [start, start + length) of one sequence, fed in this step."""

    seq: Sequence
    start: int
    length: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's newest token, so a token is sampled after it."""
        return self.start + self.length == len(self.seq.tokens)


@dataclass
class StepPlan:
    """What one step runs, and who was preempted to make room."""

    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        """Tokens in the packed batch."""
        return sum(c.length for c in self.chunks)

    @property
    def decode_only(self) -> bool:
        """Every row is one decoding sequence's next token."""
        return all(c.length == 1 and c.start > 0 for c in self.chunks)


PREFILL_ALONE_TOKENS = 8192  # the most a step may take when no answer is streaming


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks needed to hold `tokens` tokens."""
    return -(-tokens // block_size)


class Scheduler:
    """Waiting and running sequences, and the plan of each step."""

    def __init__(self, pool: BlockPool, max_batch_tokens: int, max_running: int, max_per_owner: int) -> None:
        self.pool = pool
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        self.max_per_owner = max_per_owner
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        """A new request joins the back of the queue."""
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """A sequence is done (or cancelled): its blocks go back to the pool (named ones stay cached)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks = []

    def fits_pool(self, tokens: int) -> bool:
        """Whether one request of `tokens` tokens could ever be held by the pool."""
        return blocks_for(tokens, self.pool.block_size) <= self.pool.total

    # -- one step -------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Plan the next step (and make room for it)."""
        plan = StepPlan()
        budget = self.max_batch_tokens
        scheduled: set[int] = set()
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if budget <= 0:
                break
            if seq.pending != 1 or seq not in self.running:
                continue
            if not self._grow(seq, seq.computed + 1, plan, scheduled):
                continue
            plan.chunks.append(Chunk(seq, seq.computed, 1))
            scheduled.add(id(seq))
            budget -= 1
        if not plan.chunks:  # nobody is decoding, so nobody waits on a long step: prefill in bigger pieces
            budget = max(budget, min(4 * self.max_batch_tokens, PREFILL_ALONE_TOKENS))
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if budget <= 0:
                break
            if seq.pending <= 1 or id(seq) in scheduled or seq not in self.running:
                continue
            n = self._fit(seq, min(seq.pending, budget))
            while n == 0:  # no blocks left: an older prefill goes before newer sequences
                newer = [s for s in self.running if s.arrival > seq.arrival and id(s) not in scheduled]
                if not newer:
                    break
                self._preempt(max(newer, key=lambda s: s.arrival), plan)
                n = self._fit(seq, min(seq.pending, budget))
            if n > 0:
                plan.chunks.append(Chunk(seq, seq.computed, n))
                scheduled.add(id(seq))
                budget -= n
        self._admit(plan, budget)
        return plan

    def _fit(self, seq: Sequence, n: int) -> int:
        """Grow `seq` to hold `n` more tokens, or as many as the free blocks allow; how many it got."""
        bs = self.pool.block_size
        have = len(seq.blocks) * bs - seq.computed
        extra = blocks_for(max(0, n - have), bs)
        extra = min(extra, self.pool.available)
        if extra:
            seq.blocks.extend(self.pool.allocate(extra))
        return min(n, len(seq.blocks) * bs - seq.computed)

    def _grow(self, seq: Sequence, tokens: int, plan: StepPlan, scheduled: set[int]) -> bool:
        """Make `seq`'s blocks hold `tokens`, preempting the newest others if needed; False if `seq` went."""
        need = blocks_for(tokens, self.pool.block_size) - len(seq.blocks)
        while need > self.pool.available:
            victims = [s for s in self.running if s is not seq and id(s) not in scheduled]
            victim = max(victims, key=lambda s: s.arrival) if victims else seq
            self._preempt(victim, plan)
            if victim is seq:
                return False
        if need > 0:
            seq.blocks.extend(self.pool.allocate(need))
        return True

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self.pool.release(seq.blocks)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)

    def _admit(self, plan: StepPlan, budget: int) -> None:
        bs = self.pool.block_size
        owners: dict[str, int] = {}
        for seq in self.running:
            owners[seq.owner] = owners.get(seq.owner, 0) + 1
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_running:
                break
            if owners.get(seq.owner, 0) >= self.max_per_owner:
                continue  # that owner is at its cap; others behind it may go
            hit = self.pool.match(seq.block_names(len(seq.tokens) - 1))  # one token must run for logits
            cached = len(hit) * bs
            n = min(len(seq.tokens) - cached, budget)
            need = blocks_for(cached + n, bs) - len(hit)
            if need > self.pool.available:
                self.pool.release(hit)
                break  # first come, first served: nobody overtakes for lack of memory
            seq.blocks = hit + self.pool.allocate(need)
            seq.computed = cached
            seq.named = len(hit)
            if seq.cached_tokens < 0:
                seq.cached_tokens = min(cached, seq.n_prompt)
            self.waiting.remove(seq)
            self.running.append(seq)
            owners[seq.owner] = owners.get(seq.owner, 0) + 1
            plan.chunks.append(Chunk(seq, cached, n))
            budget -= n
