"""The model-facing steps of one request: image grids, vision encoding, prefill, decode, sampling.

We drive Qwen3-VL's parts directly (vision tower, token embeddings, text decoder, lm_head)
rather than `generate()`, because a turn must be able to (a) reuse a KV prefix that already
holds earlier images while (b) encoding only the images that are new, with (c) positions
that belong to this request, and (d) stop between any two decode steps. The pieces used are
public attributes of `Qwen3VLForConditionalGeneration` in transformers 5.x.
"""

from __future__ import annotations

import torch
from PIL import Image

from chat.engine.cache import ImageFeatures
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
        batch = self.processor.image_processor(
            images=images, return_tensors="pt", size={"shortest_edge": min_pixels, "longest_edge": max_pixels}
        )
        pixel_values = batch["pixel_values"].to(self.device)
        grid_thw = batch["image_grid_thw"].to(self.device)
        out = self.model.model.get_image_features(pixel_values, grid_thw, return_dict=True)
        sizes = (grid_thw.prod(-1) // self.merge**2).tolist()
        embeds = _per_image(out.pooler_output, sizes)
        # transformers 5.17 returns each DeepStack layer as one tensor for all images; 5.23 splits them.
        layers = [_per_image(layer, sizes) for layer in out.deepstack_features]
        return [ImageFeatures(embeds=embeds[i], deepstack=[layer[i] for layer in layers]) for i in range(len(images))]

    @torch.inference_mode()
    def forward(
        self,
        ids: list[int],
        positions: torch.Tensor,
        start: int,
        kv,
        images: list[tuple[int, ImageFeatures]] = (),
    ) -> torch.Tensor:
        """Run tokens `ids` (sequence index `start` onward) through the decoder into `kv`; last logits.

        `positions` is (3, len(ids)); `images` gives each image's offset within `ids` and its
        features, and the features are written over the placeholder embeddings.
        """
        input_ids = torch.tensor([ids], device=self.device)
        embeds = self.embed(input_ids)
        visual_mask = None
        deepstack = None
        if images:
            visual_mask = torch.zeros(1, len(ids), dtype=torch.bool, device=self.device)
            for offset, feats in images:
                n = feats.embeds.shape[0]
                embeds[0, offset : offset + n] = feats.embeds.to(embeds.dtype)
                visual_mask[0, offset : offset + n] = True
            layers = len(images[0][1].deepstack)
            deepstack = [torch.cat([f.deepstack[k] for _, f in images]) for k in range(layers)]
        seq = torch.arange(start, start + len(ids), device=self.device).view(1, 1, -1)
        pos = torch.cat([seq, positions.to(self.device).view(3, 1, -1)], dim=0)
        out = self.decoder(
            inputs_embeds=embeds,
            position_ids=pos,
            past_key_values=kv,
            use_cache=True,
            visual_pos_masks=visual_mask,
            deepstack_visual_embeds=deepstack,
        )
        return self.model.lm_head(out.last_hidden_state[:, -1]).float()

    def new_cache(self):
        """An empty KV cache for this model."""
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config.get_text_config())


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy when temperature is 0, else temperature + nucleus sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits, dim=-1).item())
    probs = torch.softmax(logits / temperature, dim=-1).view(-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < top_p  # always keeps the top token
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs.cpu(), 1, generator=generator)
        return int(order[choice.to(order.device)].item())
    return int(torch.multinomial(probs.cpu(), 1, generator=generator).item())


class TextStream:
    """Incremental detokenizer: emits only whole characters, never a split multi-byte sequence."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context
        self.read = 0  # end of what has been emitted
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add a token; return the new text it completes ('' while a character is still partial)."""
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
            self.text += delta
            return delta
        return ""
