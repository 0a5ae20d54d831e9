"""Shared by the GPU benchmarks: the real Qwen3-VL-8B shape with random weights, test images, timing helpers.

No download: the model is built from its config with random bf16 weights on the GPU. The
tokenizer is vlchat's tiny byte-level one with the image token ids wired into the config, so
prompts, images and the processor are real while the weights are noise. No end token is set,
so every request decodes exactly the tokens it asks for.
"""

from __future__ import annotations

import io
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat.engine.local.loader import TINY_CHAT_TEMPLATE, _tiny_tokenizer  # noqa: E402

REAL = dict(
    text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
              num_key_value_heads=8, head_dim=128, mrope_section=[24, 20, 20]),
    vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                deepstack_visual_indexes=[8, 16, 24]),
)
# A CPU-sized stand-in, only to smoke-test this script where there is no GPU.
SMOKE = dict(
    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, mrope_section=[2, 3, 3]),
    vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                deepstack_visual_indexes=[0, 1]),
)


def build(device: str, shape: dict):
    """Random-weight Qwen3-VL of `shape` (bf16 on GPU), with real processor pieces."""
    import transformers
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tok = _tiny_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                     "<|vision_end|>")}
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=151936, max_position_embeddings=262144,
                         **{k: v for k, v in shape["text"].items() if k != "mrope_section"},
                         rope_parameters=dict(rope_type="default", rope_theta=5_000_000.0,
                                              mrope_section=shape["text"]["mrope_section"], mrope_interleaved=True)),
        vision_config=dict(patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                           **shape["vision"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build straight in the target dtype: no fp32 copy of 8.8 B weights
    try:
        with torch.device(device):
            model = Qwen3VLForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(default)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    # The torchvision-based image processor where this transformers has it (what a real checkpoint loads).
    image_processor = getattr(transformers, "Qwen2VLImageProcessorFast", Qwen2VLImageProcessor)
    processor = Qwen3VLProcessor(
        image_processor=image_processor(patch_size=16, temporal_patch_size=2, merge_size=2,
                                        size={"shortest_edge": 65536, "longest_edge": 16777216},
                                        image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tok, video_processor=Qwen3VLVideoProcessor(), chat_template=TINY_CHAT_TEMPLATE,
    )
    return model, processor, transformers.__version__


def png_bytes(w: int, h: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(h // 8, w // 8, 3, generator=g) * 255).to(torch.uint8).numpy()
    img = Image.fromarray(arr).resize((w, h), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def sync_time() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def copy_bandwidth() -> float:
    """Measured device-to-device copy, bytes read + written per second."""
    if not torch.cuda.is_available():
        return float("nan")
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    times = []
    for _ in range(10):
        t0 = sync_time()
        y.copy_(x)
        times.append(sync_time() - t0)
    return 2 * x.numel() / statistics.median(times)


QUESTION = "Describe this picture in detail, including every object, colour and any text you can read there."


def image_message(image_id: str, text: str = QUESTION) -> dict:
    """A user message with one image, then text."""
    return {"role": "user", "content": [{"type": "image", "image_id": image_id}, {"type": "text", "text": text}]}


def weight_bytes(model) -> int:
    """Bytes a decode step must read: the text decoder's weights and lm_head."""
    n = sum(p.numel() * p.element_size() for p in model.model.language_model.parameters())
    return n + model.lm_head.weight.numel() * model.lm_head.weight.element_size()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]
