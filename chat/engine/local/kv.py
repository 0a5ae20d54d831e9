"""The paged KV cache: one pool of fixed-size blocks, and the prefix cache that lives in it.

Every request's KV state is a list of block ids (its block table); token i of the request sits
in block `table[i // block_size]` at offset `i % block_size`. Blocks are reference-counted.

Prefix caching is the pool itself. A block that is full gets a name: a hash chained over the
previous block's name and this block's cache keys (token ids, with image placeholders keyed by
the image's sha256; see prompt.py). The chain starts from the request's owner salt, so a
block can only ever be found again by the owner that computed it (no cached-tokens side
channel between users; vLLM salts its first block the same way). A finished request's named
blocks stay in the pool with no references, least-recently-used first in line for eviction,
until a new request's chain finds them again or the pool needs the room.

Block 0 is never handed out: padded rows of a captured decode step write their KV there.

The pool's bookkeeping is plain Python, used only by the engine's thread; the tensors live in
`KVTensors`.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque

import torch

SCRATCH_BLOCK = 0


def chain_hashes(salt: str, keys: list[int], block_size: int, parent: bytes | None = None) -> list[bytes]:
    """Names of the full blocks of `keys`, each chained over the one before (the first over `salt`)."""
    out = []
    prev = parent if parent is not None else hashlib.blake2b(salt.encode(), digest_size=16).digest()
    for start in range(0, len(keys) - block_size + 1, block_size):
        block = struct.pack(f"<{block_size}q", *keys[start : start + block_size])
        prev = hashlib.blake2b(prev + block, digest_size=16).digest()
        out.append(prev)
    return out


class BlockPool:
    """Which blocks are free, used or cached, and the names of full blocks."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError("the KV pool needs at least 2 blocks")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.refs = [0] * num_blocks
        self.names: list[bytes | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(1, num_blocks))  # block 0: scratch
        self._by_name: dict[bytes, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # named, unreferenced; oldest first

    @property
    def total(self) -> int:
        """Blocks that can hold requests' tokens."""
        return self.num_blocks - 1

    @property
    def available(self) -> int:
        """Blocks that an allocation may take now (free, or cached and unreferenced)."""
        return len(self._free) + len(self._evictable)

    @property
    def used(self) -> int:
        """Blocks referenced by at least one request."""
        return self.total - self.available

    @property
    def cached(self) -> int:
        """Named blocks kept for reuse with no request using them."""
        return len(self._evictable)

    def match(self, names: list[bytes]) -> list[int]:
        """Take a reference on the longest run of cached blocks for `names`, from the first; their ids."""
        found = []
        for name in names:
            block = self._by_name.get(name)
            if block is None:
                break
            found.append(block)
        for block in found:
            self._ref(block)
        return found

    def allocate(self, n: int) -> list[int] | None:
        """`n` blank blocks with one reference each, evicting cached ones if needed; None if not enough."""
        if n > self.available:
            return None
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._by_name[self.names[block]]
                self.names[block] = None
            self.refs[block] = 1
            out.append(block)
        return out

    def name(self, block: int, name: bytes) -> int:
        """Record that full `block` holds the tokens named `name`; the block to keep using.

        If another block already has that name (two requests computed the same prefix at the same
        time), this one stays unnamed and is freed normally; callers may keep using it.
        """
        if self.names[block] is None and name not in self._by_name:
            self.names[block] = name
            self._by_name[name] = block
        return block

    def release(self, blocks: list[int]) -> None:
        """Drop one reference from each block; unreferenced named blocks stay cached, others are freed."""
        for block in reversed(blocks):  # later blocks of a chain are evicted first
            self.refs[block] -= 1
            if self.refs[block] > 0:
                continue
            if self.names[block] is not None:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def _ref(self, block: int) -> None:
        if self.refs[block] == 0:
            self._evictable.pop(block, None)
        self.refs[block] += 1

    def clear_cache(self) -> None:
        """Forget every cached, unreferenced block (after an out-of-memory error, say)."""
        while self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._by_name[self.names[block]]
            self.names[block] = None
            self._free.append(block)


class KVTensors:
    """The pool's memory: keys and values of every layer, (layers, blocks, block_size, kv_heads, head_dim)."""

    def __init__(self, layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (layers, num_blocks, block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    @staticmethod
    def block_bytes(layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one block takes across all layers, keys and values."""
        return 2 * layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        """Device memory held."""
        return 2 * self.k.numel() * self.k.element_size()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store (tokens, kv_heads, head_dim) keys and values at flat slots (block * block_size + offset)."""
        self.k[layer].view(-1, *k.shape[1:]).index_copy_(0, slots, k)
        self.v[layer].view(-1, *v.shape[1:]).index_copy_(0, slots, v)

    def gather(self, layer: int, table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` tokens of one block table as contiguous (length, kv_heads, head_dim) tensors."""
        k = self.k[layer].index_select(0, table).flatten(0, 1)[:length]
        v = self.v[layer].index_select(0, table).flatten(0, 1)[:length]
        return k, v


def pool_blocks(kv_bytes: int, block_bytes: int, max_context: int, block_size: int) -> int:
    """Blocks for a pool of `kv_bytes`, never fewer than one full-length conversation needs (plus scratch)."""
    return max(kv_bytes // block_bytes, -(-max_context // block_size) + 2)
