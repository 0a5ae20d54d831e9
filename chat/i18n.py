"""The page's language (issue 13): English and Simplified Chinese.

Static labels go to the browser as Gradio i18n keys (`I18N`, passed to gr.mount_gradio_app through
chat.page.mount_options); Gradio picks the browser's language (navigator.language) and sets
<html lang> to it. The person's own choice (Display -> Language, assets/i18n.js) is kept in
localStorage and in the cookie `vlchat_lang`, and assets/i18n.js makes the browser report that
language to Gradio before it starts.

Strings made on the server (the answer's details, the delete question, the modes' prompts) follow
`lang_of(request)`: the cookie, else the browser's Accept-Language.
"""

from __future__ import annotations

import gradio as gr

LANGS = ("en", "zh-CN")
DEFAULT_LANG = "en"
COOKIE = "vlchat_lang"

# Static page labels. Keys are what chat/page.py passes as i18n("…").
PAGE = {
    "en": {
        "new_chat": "New chat",
        "conversations": "Conversations",
        "title": "Title",
        "rename": "Rename",
        "delete": "Delete",
        "cancel": "Cancel",
        "mode": "Mode",
        "mode.general": "General chat",
        "mode.troubleshoot": "Screenshot troubleshooting",
        "mode.scene": "Scene description",
        "mode.product": "Product listing",  # issue 14
        "conversation": "Conversation",
        "chat_placeholder": "Attach or paste an image and ask about it, or press Describe a photo.",
        "ask_next": "Ask next:",
        "dismiss": "Dismiss",
        "describe_photo": "Describe a photo",
        "find.label": "Find on the image",  # issue 14 (grounding): screenshot mode
        "find.button": "Find",
        "admin.usage": "Usage per user",  # issue 14 (accounts): admins only
        "admin.refresh": "Refresh",
        "image_detail": "Image detail",
        "detail.low": "Low",
        "detail.auto": "Auto",
        "detail.high": "High",
        "detail_info": "Low: about 256 tokens per image. Auto: screenshots keep their resolution. "
                       "High: up to about 4,096 tokens, for dense documents.",
        "stop": "Stop",
        "regenerate": "Regenerate",
        "settings": "Settings",
        "temperature": "Temperature",
        "top_p": "Top p",
        "top_k": "Top k (0: off)",  # issue 14: sampling panel
        "adapter": "Model (LoRA adapter)",  # issue 14: --lora
        "presence_penalty": "Presence penalty",
        "frequency_penalty": "Frequency penalty",
        "max_new_tokens": "Max new tokens",
        "system_override": "System prompt override (empty: the mode's prompt)",
        # issue 13 (history panels: chat.search, chat.history_io, chat.versions)
        "search.label": "Search conversations",
        "search.placeholder": "Words in a title or a message",
        "export.title": "Export or import",
        "export.button": "Export this conversation",
        "export.zip": "Download Markdown with images (.zip)",
        "export.json": "Download JSON (every version)",
        "import.button": "Import a conversation (.json)",
        "versions.title": "Edit and versions",
        "versions.message": "Message",
        "versions.previous": "Previous version",
        "versions.next": "Next version",
        "versions.edited": "Edited question",
        "versions.send": "Send edited question",
    },
    "zh-CN": {
        "new_chat": "新对话",
        "conversations": "对话",
        "title": "标题",
        "rename": "重命名",
        "delete": "删除",
        "cancel": "取消",
        "mode": "模式",
        "mode.general": "通用对话",
        "mode.troubleshoot": "截图排错",
        "mode.scene": "场景描述",
        "mode.product": "商品文案",  # issue 14
        "conversation": "对话内容",
        "chat_placeholder": "附加或粘贴图片并提问，或按“描述照片”。",
        "ask_next": "接着问：",
        "dismiss": "关闭",
        "describe_photo": "描述照片",
        "find.label": "在图片上查找",  # issue 14 (grounding)
        "find.button": "查找",
        "admin.usage": "各用户用量",  # issue 14 (accounts)
        "admin.refresh": "刷新",
        "image_detail": "图片细节",
        "detail.low": "低",
        "detail.auto": "自动",
        "detail.high": "高",
        "detail_info": "低：每张图片约 256 个 token。自动：截图保持原始分辨率。"
                       "高：最多约 4,096 个 token，适合密集文档。",
        "stop": "停止",
        "regenerate": "重新生成",
        "settings": "设置",
        "temperature": "温度",
        "top_p": "Top p",
        "top_k": "Top k（0：关闭）",  # issue 14: sampling panel
        "adapter": "模型（LoRA 适配器）",  # issue 14: --lora
        "presence_penalty": "存在惩罚",
        "frequency_penalty": "频率惩罚",
        "max_new_tokens": "最大新 token 数",
        "system_override": "覆盖系统提示词（留空：使用模式的提示词）",
        "search.label": "搜索对话",
        "search.placeholder": "标题或消息中的词语",
        "export.title": "导出或导入",
        "export.button": "导出此对话",
        "export.zip": "下载 Markdown 及图片（.zip）",
        "export.json": "下载 JSON（包含所有版本）",
        "import.button": "导入对话（.json）",
        "versions.title": "编辑与版本",
        "versions.message": "消息",
        "versions.previous": "上一版本",
        "versions.next": "下一版本",
        "versions.edited": "编辑后的问题",
        "versions.send": "发送编辑后的问题",
    },
}

# Strings made on the server.
SERVER = {
    "en": {
        "stats.summary": "Details",
        "stats.tokens": "Tokens",
        "stats.tokens_value": "{prompt} prompt, {generated} generated",
        "stats.ttft": "Time to first token",
        "stats.rate": "Speed",
        "stats.rate_value": "{rate} tokens/s",
        "stats.cached": "Cached prompt tokens",
        "stats.images": "Images encoded",
        "delete.question": "**Delete “{title}”?** Its messages are removed for good.",
    },
    "zh-CN": {
        "stats.summary": "详情",
        "stats.tokens": "Token",
        "stats.tokens_value": "提示 {prompt}，生成 {generated}",
        "stats.ttft": "首个 token 用时",
        "stats.rate": "速度",
        "stats.rate_value": "每秒 {rate} 个 token",
        "stats.cached": "缓存的提示 token",
        "stats.images": "编码的图片",
        "delete.question": "**删除“{title}”？** 其中的消息将被永久删除。",
    },
}

I18N = gr.I18n(**PAGE)


def label(key: str):
    """A static label translated in the browser."""
    return I18N(key)


def pick(value: str | None) -> str | None:
    """The supported language a tag or an Accept-Language header asks for first (None: none of ours)."""
    if not value:
        return None
    tags = []
    for n, part in enumerate(value.split(",")):
        tag, _, q = part.strip().partition(";q=")
        try:
            weight = float(q) if q else 1.0
        except ValueError:
            weight = 0.0
        tags.append((-weight, n, tag.strip().lower()))
    for _, _, tag in sorted(tags):
        if tag.startswith("zh") and not any(tag.startswith(t) for t in ("zh-tw", "zh-hk", "zh-mo", "zh-hant")):
            return "zh-CN"
        if tag.startswith("en"):
            return "en"
    return None


def lang_of(request) -> str:
    """The page's language for this request: the person's choice (cookie), else the browser's languages."""
    if request is None:
        return DEFAULT_LANG
    cookies = getattr(request, "cookies", None) or {}
    headers = getattr(request, "headers", None) or {}
    try:
        chosen = cookies.get(COOKIE)
        accept = headers.get("accept-language")
    except AttributeError:
        return DEFAULT_LANG
    return pick(chosen) or pick(accept) or DEFAULT_LANG


def t(lang: str, key: str, **values) -> str:
    """A server string in `lang` (English where there is no translation)."""
    text = SERVER.get(lang, {}).get(key) or SERVER[DEFAULT_LANG][key]
    return text.format(**values) if values else text


def translator(lang: str):
    """`t` bound to a language."""
    return lambda key, **values: t(lang, key, **values)
