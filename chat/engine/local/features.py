"""Vision features: the encoder runs once per image (and detail level); the results are kept by sha256.

A sequence's prefill chunk that reaches an image needs that image's features: the merged
embeddings and the DeepStack feature sets that travel with them. They come from the cache when
this image was seen before (in this conversation, another one, or before a preemption), else
the vision tower runs now, once for all of the chunk's uncached images of one detail level.
The features are keyed by image content, not owner: whoever sends the image already has it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from chat.engine.local.prompt import split_visual
from chat.images import open_clean


@dataclass
class ImageFeatures:
    """Vision output for one image: (n, hidden) embeddings and one (n, hidden) per DeepStack layer."""

    embeds: torch.Tensor
    deepstack: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        """Device memory held."""
        return sum(t.numel() * t.element_size() for t in [self.embeds, *self.deepstack])


class FeatureCache:
    """LRU of vision features by visual id, under a byte budget."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, ImageFeatures] = OrderedDict()
        self._bytes = 0

    def get(self, vid: str) -> ImageFeatures | None:
        """The cached features, refreshed as most recent, or None."""
        feats = self._items.get(vid)
        if feats is not None:
            self._items.move_to_end(vid)
        return feats

    def put(self, vid: str, feats: ImageFeatures) -> None:
        """Keep `feats`, evicting least recently used items over the budget."""
        if feats.nbytes > self.max_bytes:
            return
        old = self._items.pop(vid, None)
        if old is not None:
            self._bytes -= old.nbytes
        self._items[vid] = feats
        self._bytes += feats.nbytes
        while self._bytes > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self._bytes -= dropped.nbytes

    def clear(self) -> None:
        """Drop everything."""
        self._items.clear()
        self._bytes = 0


class Vision:
    """Features for visual ids: from the cache, else one encoder run per detail level."""

    def __init__(self, runner, fetch_image: Callable[[str], Image.Image], max_bytes: int) -> None:
        self.runner = runner
        self.fetch_image = fetch_image
        self.cache = FeatureCache(max_bytes)

    def image(self, image_id: str, inline: dict) -> Image.Image:
        """An image by id: one that travels with the request, else from the store."""
        data = inline.get(image_id)
        if data is None:
            return self.fetch_image(image_id)
        return data if isinstance(data, Image.Image) else open_clean(data)

    def get(self, vids: list[str], inline: dict) -> tuple[dict[str, ImageFeatures], int]:
        """Features of each visual id and how many images the encoder had to run on."""
        found = {vid: self.cache.get(vid) for vid in dict.fromkeys(vids)}
        missing = [vid for vid, feats in found.items() if feats is None]
        by_detail: dict[str, list[str]] = {}
        for vid in missing:
            by_detail.setdefault(split_visual(vid)[1], []).append(vid)
        for detail, group in by_detail.items():
            images = [self.image(split_visual(vid)[0], inline) for vid in group]
            for vid, feats in zip(group, self.runner.encode(images, detail), strict=True):
                self.cache.put(vid, feats)
                found[vid] = feats  # held here even if the LRU had no room for them
        return found, len(missing)

    def prepare(self, plan, metrics) -> None:
        """Give every image a chunk reaches its features: from the cache, else one encoder run.

        While answers are streaming (the step has decode rows) at most one image is encoded per
        step, so a message with several new images never stalls everyone for all of them at once:
        a chunk that reaches a second one stops just before it and goes on in the next step.
        """
        budget = 1 if any(c.length == 1 and c.seq.generated for c in plan.chunks) else len(plan.chunks) + 64
        for chunk in list(plan.chunks):
            seq, a = chunk.seq, chunk.start
            for span in seq.prompt.images:
                b = chunk.start + chunk.length
                if span.start >= b or span.start + span.length <= a or span.image_id in seq.features:
                    continue
                cached = self.cache.get(span.image_id)
                if cached is None and budget <= 0:
                    chunk.length = span.start - a  # stop before the image; it is encoded in a later step
                    break
                found, encoded = self.get([span.image_id], seq.request.images)
                budget -= encoded
                seq.features.update(found)
                seq.images_encoded += encoded
                metrics.images_encoded.inc(encoded)
            if chunk.length <= 0:
                plan.chunks.remove(chunk)
