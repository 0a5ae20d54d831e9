"""Per-answer details (issue 13): tokens, time to first token, decode rate, cache and image work.

The engine's Done event carries the token counts (`Usage`); the page measures the timing itself
(`chat.stream`: from submit to the first text it sees, and the decode rate from there to the end),
and both are stored together as the answer's `usage` JSON, so they show again when the
conversation is reopened.

Shown under each answer as a collapsed <details> ("Details"), which is keyboard-reachable (its
summary is a native disclosure button). It carries the class `answer-note`, which the page's
announcer (assets/announce.js) and the image alt texts (assets/a11y.js) leave out, so the live
region never reads it; it comes after the answer's own note ("Stopped."), so that note stays the
first `.answer-note` the announcer looks at.
"""

from __future__ import annotations

import html

from chat.i18n import DEFAULT_LANG, translator

TIMING_KEYS = ("ttft_s", "tokens_per_s")


def timing(started: float, first_at: float | None, done_at: float, completion_tokens: int) -> dict:
    """`ttft_s` (submit -> first text) and `tokens_per_s` (the tokens after the first over the time they took)."""
    if first_at is None:
        return {}
    out = {"ttft_s": round(max(first_at - started, 0.0), 3)}
    span = done_at - first_at
    if completion_tokens > 1 and span > 0:
        out["tokens_per_s"] = round((completion_tokens - 1) / span, 1)
    return out


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def rows(usage: dict | None, t=None) -> list[tuple[str, str]]:
    """(label, value) pairs for an answer's usage; empty when there is nothing to show (e.g. an error)."""
    t = t or translator(DEFAULT_LANG)
    usage = usage or {}
    if "completion_tokens" not in usage or "error" in usage:
        return []
    out = [(t("stats.tokens"), t("stats.tokens_value", prompt=f"{usage.get('prompt_tokens', 0):,}",
                                 generated=f"{usage['completion_tokens']:,}"))]
    if "ttft_s" in usage:
        out.append((t("stats.ttft"), _seconds(float(usage["ttft_s"]))))
    if "tokens_per_s" in usage:
        out.append((t("stats.rate"), t("stats.rate_value", rate=f"{float(usage['tokens_per_s']):.1f}")))
    out.append((t("stats.cached"), f"{usage.get('cached_tokens', 0):,}"))
    out.append((t("stats.images"), f"{usage.get('images_encoded', 0):,}"))
    return out


def details_html(usage: dict | None, t=None) -> str:
    """The collapsed "Details" element for an answer ('' when there is nothing to show)."""
    t = t or translator(DEFAULT_LANG)
    pairs = rows(usage, t)
    if not pairs:
        return ""
    items = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in pairs)
    return (f'<details class="answer-note vl-stats"><summary>{html.escape(t("stats.summary"))}</summary>'
            f"<dl>{items}</dl></details>")


def with_details(content: dict, usage: dict | None) -> dict:
    """A Chatbot text part (chat.render.answer_content) with the answer's details appended."""
    extra = details_html(usage)
    if not extra:
        return content
    text = content.get("text", "")
    return {**content, "text": f"{text}\n{extra}" if text else extra}
