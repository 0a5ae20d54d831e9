"""The message model shared by page, API and store: modes, and stored rows -> engine messages.

A stored message is a row from `Store.messages()` (role, text, image_ids, status). The engine
takes chat-template messages whose content is a list of parts; images come first in a user
turn, then its text, which is how Qwen3-VL was trained to see a question about an image.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    """A use of the app: a system prompt plus sensible sampling defaults."""

    key: str
    label: str
    system_prompt: str
    temperature: float
    max_new_tokens: int
    # Sent with a photo and no text ("Describe a photo", or paste and Enter).
    describe_prompt: str = "Describe this image."
    # Follow-up questions shown as buttons once there is an answer: (the button's label, what it sends).
    follow_ups: tuple[tuple[str, str], ...] = ()


MODES: dict[str, Mode] = {
    m.key: m
    for m in (
        Mode(
            "general",
            "General chat",
            "You are a helpful assistant. Answer questions about the user's images and text accurately and "
            "say so when something in an image is unclear.",
            0.7,
            1024,
            "Describe this image.",
            (
                ("More detail", "Tell me more about the image, in detail."),
                ("Read any text", "Read out any text in the image exactly as written."),
                ("What stands out?", "What is the most important or unusual thing in the image?"),
                ("Summarise", "Summarise your last answer in one or two sentences."),
            ),
        ),
        Mode(
            "troubleshoot",
            "Screenshot troubleshooting",
            "You help people fix software problems from screenshots. First transcribe the exact error text "
            "from the screenshot in a fenced code block, character for character. Then explain the likely "
            "cause in plain words, then give the fix as numbered steps with any commands in code blocks. "
            "If the text is unreadable, say which part and ask for a sharper screenshot.",
            0.2,
            1536,
            "Read the exact error in this screenshot and explain how to fix it.",
            (
                ("Explain more simply", "Explain the cause again in simpler words, without jargon."),
                ("Other possible causes", "What else could cause this error, and how can I tell which it is?"),
                ("Read all the text", "Transcribe all the text in the screenshot exactly as written."),
                ("How do I check it is fixed?", "How can I check that the fix worked?"),
            ),
        ),
        Mode(
            "scene",
            "Scene description",
            "You describe images for a blind or low-vision person. Answer first in two or three short "
            "sentences: what the scene is, then anything urgent (a hazard, an obstacle, a step, traffic, or a "
            "sign or warning that matters). Stop there: the person will ask if they want more. When asked for more, "
            "give it in order of importance: people, text and signs, obstacles and hazards, and where things "
            "are using left, right, ahead, near and far. Be concrete; do not guess at what cannot be seen, and "
            "say so when the image is too dark or blurred to tell.",
            0.3,
            384,
            "Describe this scene briefly.",
            (
                ("More detail", "Describe the scene in more detail: people, text and signs, obstacles, and where "
                                "things are."),
                ("Read any text", "Read out any text in the image exactly as written, and say where it is."),
                ("What colours?", "What are the main colours in the image, and of what?"),
                ("Is anything in the way?", "Is anything in the way or is there any hazard ahead? Say where it is "
                                            "and how near."),
            ),
        ),
    )
}
DEFAULT_MODE = "general"

# Only these statuses carry text the model should see again on the next turn.
_REPLAYED = ("complete", "stopped", "interrupted")


def mode_for(key: str | None) -> Mode:
    """The mode named `key`, or the default one."""
    return MODES.get(key or DEFAULT_MODE, MODES[DEFAULT_MODE])


def engine_messages(rows: list[dict], system_prompt: str) -> list[dict]:
    """Chat-template messages for the engine from stored rows (pending and failed answers left out)."""
    out: list[dict] = []
    if system_prompt.strip():
        out.append({"role": "system", "content": system_prompt.strip()})
    for row in rows:
        if row["role"] == "assistant":
            if row["status"] in _REPLAYED and row["text"]:
                out.append({"role": "assistant", "content": row["text"]})
        elif row["role"] == "user":
            detail = (row.get("settings") or {}).get("detail", "auto")
            parts = [{"type": "image", "image_id": i, "detail": detail} for i in row["image_ids"]]
            parts.append({"type": "text", "text": row["text"]})
            out.append({"role": "user", "content": parts})
    return out


def title_from(text: str, limit: int = 60) -> str:
    """A conversation title from the first message: its first line, cut at a word."""
    line = " ".join(text.strip().split("\n", 1)[0].split())
    if not line:
        return "Image chat"
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0]
    return (cut or line[:limit]) + "…"


def context_used(rows: list[dict]) -> int:
    """Tokens the conversation holds so far, from the last answer's usage (0 before any answer)."""
    for row in reversed(rows):
        usage = row.get("usage") or {}
        if row["role"] == "assistant" and "prompt_tokens" in usage:
            return usage["prompt_tokens"] + usage.get("completion_tokens", 0)
    return 0


def md_escape(text: str) -> str:
    """Text for a Markdown component, shown as typed: HTML escaped, Markdown punctuation backslashed."""
    return re.sub(r"([\\`*_{}\[\]()#+!|~-])", r"\\\1", html.escape(text, quote=False))


def attachment_preview(names: list[str], plans: list, used: int, limit: int, answer_tokens: int) -> str:
    """Markdown for the page: what each attached image costs and how much context is left."""
    lines = []
    for name, p in zip(names, plans, strict=True):
        lines.append(f"- **{md_escape(name)}**: {p.describe()}")
    cost = sum(p.tokens for p in plans)
    left = limit - used - cost - answer_tokens
    summary = (f"Images: {cost:,} tokens. Conversation so far: about {used:,}; room for the answer "
               f"({answer_tokens:,}) included, about {max(left, 0):,} of {limit:,} tokens are left.")
    if left < 0:
        summary += (f" **This is about {-left:,} tokens over the limit**: choose a lower detail, remove an image, "
                    "ask for a shorter answer or start a new chat.")
    if any(p.scaled_down for p in plans):
        summary += " Scaled-down images lose small text; choose High detail for documents and screenshots."
    return "\n".join(lines + [summary])
