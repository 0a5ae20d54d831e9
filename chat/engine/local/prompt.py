"""Turn a conversation into token ids, cache keys and M-RoPE positions.

The chat template is the processor's own (the model's), rendered to text with one
`<|image_pad|>` per image. We expand each placeholder to the image's visual-token count
ourselves, from the image size alone, so an image already encoded is never re-read or
re-processed to build a later turn's prompt.

Cache keys equal the token ids, except that the image placeholder (the same id for every
image) becomes a negative number derived from the image's content hash: two prompts share a
prefix only if their tokens AND their images match.

Positions are computed here, per request, from the token layout (Qwen3-VL's 3D M-RoPE):
text advances all three axes by one; an image of llm grid (t, h, w) placed at p takes
(p + t_i, p + h_i, p + w_i) and the text after it resumes at p + max(h, w). Keeping this
per request is what makes cached continuations safe when conversations interleave; the
model's shared `rope_deltas` attribute is never used.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageSpan:
    """Where one image's placeholder tokens sit in the prompt."""

    image_id: str  # a visual id: the image's sha256 and its detail level
    start: int
    length: int
    grid_thw: tuple[int, int, int]


@dataclass
class Prompt:
    """A rendered request."""

    ids: list[int]
    keys: list[int]
    images: list[ImageSpan]
    positions: torch.Tensor  # (3, len(ids)) M-RoPE positions
    next_position: int  # position of the first generated token (all three axes)


def visual_id(image_id: str, detail: str) -> str:
    """The unit the engine encodes and caches: one image at one detail level."""
    return f"{image_id}@{detail}"


def split_visual(vid: str) -> tuple[str, str]:
    """(image_id, detail) of a visual id."""
    image_id, _, detail = vid.rpartition("@")
    return image_id, detail


def image_key(image_id: str) -> int:
    """A negative int that stands for every placeholder token of this image."""
    return -1 - int(hashlib.sha256(image_id.encode()).hexdigest()[:15], 16)


def defuse(text: str) -> str:
    """Text as plain text: a typed '<|im_start|>' or '<|image_pad|>' must not become a control token.

    A zero-width non-joiner after '<' keeps it visible as typed while no special token matches it.
    """
    return text.replace("<|", "<\u200c|")


def defuse_all(value):
    """`defuse` on every string inside a JSON-like value (tool definitions and call arguments)."""
    if isinstance(value, str):
        return defuse(value)
    if isinstance(value, dict):
        return {defuse_all(k): defuse_all(v) for k, v in value.items()}
    if isinstance(value, list):
        return [defuse_all(v) for v in value]
    return value


def template_messages(messages: list[dict]) -> tuple[list[dict], list[str]]:
    """Messages for `apply_chat_template` (image parts without payload) and the visual ids in order."""
    out, image_ids = [], []
    for msg in messages:
        content = msg["content"]
        if isinstance(content, str):
            out.append({"role": msg["role"], "content": defuse(content)})
            if msg.get("tool_calls"):
                out[-1]["tool_calls"] = defuse_all(msg["tool_calls"])
            continue
        parts = []
        for part in content:
            if part["type"] == "image":
                parts.append({"type": "image"})
                image_ids.append(visual_id(part["image_id"], part.get("detail") or "auto"))
            else:
                parts.append({"type": "text", "text": defuse(part["text"])})
        out.append({"role": msg["role"], "content": parts})
    return out, image_ids


def render(processor, messages: list[dict], grids: dict[str, tuple[int, int, int]], merge: int,
           tools: list[dict] | None = None, continue_final: bool = False) -> Prompt:
    """Render `messages` to a Prompt; `grids` maps each visual id to its patch grid (t, h, w).

    `tools` go to the chat template (Qwen's renders them into the system prompt; their strings are
    defused like message text); `continue_final` continues the last (assistant) message instead of
    opening a new turn. Both change the token ids, so the prefix cache keys follow by themselves.
    """
    tmpl, image_ids = template_messages(messages)
    extra = {"tools": defuse_all(tools)} if tools else {}
    if continue_final:
        extra["continue_final_message"] = True
    text = processor.apply_chat_template(tmpl, tokenize=False, add_generation_prompt=not continue_final, **extra)
    pad_text = processor.image_token
    pad_id = processor.image_token_id
    pieces = text.split(pad_text)
    if len(pieces) - 1 != len(image_ids):
        raise ValueError(f"chat template produced {len(pieces) - 1} image placeholders for {len(image_ids)} images")
    tok = processor.tokenizer
    ids: list[int] = []
    keys: list[int] = []
    spans: list[ImageSpan] = []
    for i, piece in enumerate(pieces):
        piece_ids = tok(piece, add_special_tokens=False)["input_ids"] if piece else []
        ids.extend(piece_ids)
        keys.extend(piece_ids)
        if i < len(image_ids):
            grid = grids[image_ids[i]]
            n = grid[0] * grid[1] * grid[2] // (merge * merge)
            spans.append(ImageSpan(image_ids[i], len(ids), n, grid))
            ids.extend([pad_id] * n)
            keys.extend([image_key(image_ids[i])] * n)
    positions, next_position = mrope_positions(len(ids), spans, merge)
    return Prompt(ids=ids, keys=keys, images=spans, positions=positions, next_position=next_position)


def mrope_positions(length: int, spans: list[ImageSpan], merge: int) -> tuple[torch.Tensor, int]:
    """3D positions for a sequence of `length` tokens with images at `spans`."""
    pieces = []
    pos = 0  # next position value
    cursor = 0  # next token index
    for span in spans:
        if span.start > cursor:
            n = span.start - cursor
            pieces.append(torch.arange(pos, pos + n).expand(3, n))
            pos += n
        t, h, w = span.grid_thw[0], span.grid_thw[1] // merge, span.grid_thw[2] // merge
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        pieces.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
        pos += max(h, w)
        cursor = span.start + span.length
    if length > cursor:
        n = length - cursor
        pieces.append(torch.arange(pos, pos + n).expand(3, n))
        pos += n
    positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
    return positions.long(), pos


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two key lists."""
    n = min(len(a), len(b))
    i = 0
    # Compare in blocks first: prompts run to thousands of tokens and usually match long.
    step = 256
    while i + step <= n and a[i : i + step] == b[i : i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i
