"""Reuse across turns: KV prefixes and vision features, each an LRU.

Prefix cache: each entry is the KV state of one finished request, with the cache keys of
every token it holds (see prompt.py). A new request finds the entry sharing the longest
prefix with it. When the request continues that entry (same session, or it covers the whole
entry) it takes the entry out, crops it and extends it in place: no copy, and the worker
stores the extended state back when the request ends. When it only shares a part (another
conversation with the same system prompt and image, a branch) it gets a copy of the shared
part and the entry stays for its owner. Either way no two requests write into one KV object.

Feature cache: the vision tower's output for an image (merged embeddings plus the DeepStack
feature sets that travel with them), so an image whose prefix was evicted or that appears
in another conversation is not encoded again.

Both live on the model's device and only the worker thread touches them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from chat.engine.prompt import common_prefix


@dataclass
class PrefixEntry:
    """KV state for `keys` (one key per cached token)."""

    keys: list[int]
    kv: object  # a transformers Cache
    nbytes: int
    session: str | None = None


@dataclass
class ImageFeatures:
    """Vision output for one image: (n, hidden) embeddings and one (n, hidden) per DeepStack layer."""

    embeds: torch.Tensor
    deepstack: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        """Device memory held."""
        return sum(t.numel() * t.element_size() for t in [self.embeds, *self.deepstack])


def kv_nbytes(kv) -> int:
    """Bytes held by a transformers Cache (sum over its layers' tensors)."""
    total = 0
    for layer in getattr(kv, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def crop_kv(kv, length: int) -> None:
    """Keep the first `length` tokens of every layer (transformers changed `crop`'s meaning in 5.x)."""
    for layer in kv.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def copy_prefix(kv, length: int, into):
    """Fill the empty cache `into` with a copy of the first `length` tokens of `kv`."""
    for idx, layer in enumerate(kv.layers):
        into.update(layer.keys[..., :length, :].clone(), layer.values[..., :length, :].clone(), idx)
    return into


# Sharing fewer tokens than this is not worth a copy: prefill them again.
MIN_SHARED = 16


class PrefixCache:
    """LRU of KV prefixes under an entry count and a byte budget."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, PrefixEntry] = OrderedDict()
        self._next = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held by all entries."""
        return sum(e.nbytes for e in self._entries.values())

    def take(self, keys: list[int], session: str | None, limit: int, new_cache) -> tuple[object | None, int]:
        """KV state holding the longest cached prefix of `keys` (at most `limit` tokens) and its length.

        The state is the entry itself when this request continues it, else a copy of the shared
        part (made with `new_cache()`); (None, 0) when nothing useful is shared.
        """
        best_id, best_len = None, 0
        for entry_id, entry in self._entries.items():
            n = common_prefix(entry.keys, keys)
            if n > best_len:
                best_id, best_len = entry_id, n
        best_len = min(best_len, limit)
        if best_id is None or best_len == 0:
            return None, 0
        entry = self._entries[best_id]
        if (session is not None and entry.session == session) or best_len >= len(entry.keys):
            del self._entries[best_id]
            crop_kv(entry.kv, best_len)
            return entry.kv, best_len
        if best_len < MIN_SHARED:
            return None, 0
        self._entries.move_to_end(best_id)
        return copy_prefix(entry.kv, best_len, new_cache()), best_len

    def put(self, keys: list[int], kv, session: str | None = None) -> None:
        """Store a finished request's state as most recent, evicting the oldest over budget."""
        if self.max_entries <= 0:
            return
        entry = PrefixEntry(keys=keys, kv=kv, nbytes=kv_nbytes(kv), session=session)
        if entry.nbytes > self.max_bytes:
            return
        self._entries[self._next] = entry
        self._next += 1
        while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Drop everything (after an out-of-memory error, say)."""
        self._entries.clear()


class FeatureCache:
    """LRU of vision features by image id, under a byte budget."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, ImageFeatures] = OrderedDict()
        self._bytes = 0

    def get(self, image_id: str) -> ImageFeatures | None:
        """The cached features, refreshed as most recent, or None."""
        feats = self._items.get(image_id)
        if feats is not None:
            self._items.move_to_end(image_id)
        return feats

    def put(self, image_id: str, feats: ImageFeatures) -> None:
        """Keep `feats`, evicting least recently used items over the budget."""
        if feats.nbytes > self.max_bytes:
            return
        old = self._items.pop(image_id, None)
        if old is not None:
            self._bytes -= old.nbytes
        self._items[image_id] = feats
        self._bytes += feats.nbytes
        while self._bytes > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self._bytes -= dropped.nbytes

    def clear(self) -> None:
        """Drop everything."""
        self._items.clear()
        self._bytes = 0
