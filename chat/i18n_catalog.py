"""The server's page sentences in other languages, keyed by the English (chat/i18n_text.py reads it).

A key is the English sentence exactly as the code writes it, with `{name}` (or `{name:,}`) where a
value goes; the translation uses the same names. Add a sentence here when you add one to the page.
"""

from __future__ import annotations

ZH_CN: dict[str, str] = {
    # -- issue 14: over-long conversations (chat/trim.py) --
    "Earlier messages (1 turn) were left out to fit the model's context.":
        "为了放进模型的上下文，较早的消息（1 轮）未发送给模型。",
    "Earlier messages ({n} turns) were left out to fit the model's context.":
        "为了放进模型的上下文，较早的消息（{n} 轮）未发送给模型。",
    "The most recent image, with its question and answer, was kept.": "最近的一张图片及其问答已保留。",
}

CATALOG: dict[str, dict[str, str]] = {"zh-CN": ZH_CN}
