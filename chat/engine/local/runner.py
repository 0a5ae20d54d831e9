"""The model's vision side and facts about it: image grids, vision encoding, end tokens, context size.

The decoder itself is driven by step.py (a packed batch over the paged KV pool); this module
holds what is per model rather than per step. The pieces used are public attributes of
`Qwen3VLForConditionalGeneration` in transformers 5.x.
"""

from __future__ import annotations

import torch
from PIL import Image

from chat.engine.local.detok import token_bytes
from chat.engine.local.features import ImageFeatures
from chat.images import detail_pixels


def _smart_resize():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    return smart_resize


def _per_image(features, sizes: list[int]) -> list[torch.Tensor]:
    """Features as one tensor per image, whether they come split or concatenated."""
    if isinstance(features, torch.Tensor):
        return list(torch.split(features, sizes))
    return list(features)


class Runner:
    """Stateless helpers bound to one model and processor."""

    def __init__(self, model, processor) -> None:
        self.model = model
        self.processor = processor
        self.device = next(model.parameters()).device
        ip = processor.image_processor
        self.patch = int(ip.patch_size)
        self.merge = int(ip.merge_size)
        self.decoder = model.model.language_model
        self.embed = model.get_input_embeddings()
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        cfg = model.config.get_text_config()
        self.max_context = int(getattr(cfg, "max_position_embeddings", 32768))
        # The most characters one token can stand for: a byte-level BPE token's string has one
        # character per byte, at least as many as the text it decodes to. Bounds prompts before tokenizing.
        vocab = processor.tokenizer.get_vocab()
        self.max_token_chars = max(1, max((len(t) for t in vocab), default=1))
        self.token_table = token_bytes(processor.tokenizer)  # fast detokenizing (None: not byte-level)
        self._preprocess_on_device = self.device.type == "cuda"

    def grid(self, width: int, height: int, detail: str) -> tuple[int, int, int]:
        """Patch grid (t, h, w) the processor will produce for an image of this size at `detail`."""
        factor = self.patch * self.merge
        min_pixels, max_pixels = detail_pixels(detail)
        h, w = _smart_resize()(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        return 1, h // self.patch, w // self.patch

    @torch.inference_mode()
    def encode(self, images: list[Image.Image], detail: str) -> list[ImageFeatures]:
        """Run the vision tower once over `images` at `detail`; one ImageFeatures per image."""
        min_pixels, max_pixels = detail_pixels(detail)
        size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        batch = None
        if self._preprocess_on_device:  # resize and normalize on the GPU: tens of ms less for a big photo
            try:
                batch = self.processor.image_processor(images=images, return_tensors="pt", size=size,
                                                       device=self.device)
            except (TypeError, ValueError):  # an image processor without a device option
                self._preprocess_on_device = False
        if batch is None:
            batch = self.processor.image_processor(images=images, return_tensors="pt", size=size)
        pixel_values = batch["pixel_values"].to(self.device)
        grid_thw = batch["image_grid_thw"].to(self.device)
        out = self.model.model.get_image_features(pixel_values, grid_thw, return_dict=True)
        sizes = (grid_thw.prod(-1) // self.merge**2).tolist()
        embeds = _per_image(out.pooler_output, sizes)
        # transformers 5.17 returns each DeepStack layer as one tensor for all images; 5.23 splits them.
        layers = [_per_image(layer, sizes) for layer in out.deepstack_features]
        return [ImageFeatures(embeds=embeds[i], deepstack=[layer[i] for layer in layers]) for i in range(len(images))]
