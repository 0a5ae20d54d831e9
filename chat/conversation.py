"""The message model shared by page, API and store: modes, and stored rows -> engine messages.

A stored message is a row from `Store.messages()` (role, text, image_ids, status). The engine
takes chat-template messages whose content is a list of parts; images come first in a user
turn, then its text, which is how Qwen3-VL was trained to see a question about an image.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, replace


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
        # -- issue 14 (product listing): a shop's listing from product photos --
        Mode(
            "product",
            "Product listing",
            "You write product listings for an online shop from the user's product photos and notes. Answer in "
            "exactly three parts, with these headings: '## Title' (one line of at most 80 characters: brand if "
            "visible, product type, the key attribute such as material, size or colour), '## Selling points' (3 to "
            "5 bullet points, each one concrete benefit a buyer cares about) and '## Description' (one or two short "
            "paragraphs: what it is, what it is made of, how it is used, what is included). Use only what the "
            "photos show or the user says; never invent specifications, certifications, prices or brand names. "
            "If something a buyer needs (size, material, model) cannot be seen, say what to add.",
            0.7,
            1024,
            "Write a product listing for this product: a title, selling points and a description.",
            (
                ("Shorter title", "Give me three shorter alternative titles, at most 50 characters each."),
                ("More selling points", "Suggest more selling points, each about something visible in the photos."),
                ("Friendlier tone", "Rewrite the description in a warmer, more conversational tone."),
                ("What is missing?", "Which details should I add so buyers can decide (size, material, what is "
                                     "included)?"),
            ),
        ),
        # -- end issue 14 (product listing) --
    )
}
DEFAULT_MODE = "general"

# -- issue 13 (ux): the modes in Simplified Chinese, for a page that speaks it (chat/i18n.py) ------------
# The system prompt asks for answers in Simplified Chinese unless the person asks for another language.
_ANSWER_IN_CHINESE = "除非用户要求使用其他语言，否则请用简体中文回答。"
_ZH_CN: dict[str, dict] = {
    "general": {
        "label": "通用对话",
        "system_prompt": "你是一个乐于助人的助手。准确回答关于用户图片和文字的问题；图片中有看不清的地方时要说明。",
        "describe_prompt": "请描述这张图片。",
        "follow_ups": (
            ("更多细节", "请更详细地介绍这张图片。"),
            ("读出文字", "请按原样读出图片中的所有文字。"),
            ("什么最突出？", "图片中最重要或最不寻常的是什么？"),
            ("总结", "请用一两句话总结你上一个回答。"),
        ),
    },
    "troubleshoot": {
        "label": "截图排错",
        "system_prompt": "你根据截图帮助人们解决软件问题。首先在代码块中逐字抄录截图中的错误文本。然后用通俗的话解释"
                         "可能的原因，再用编号步骤给出解决方法，命令放在代码块中。如果文字无法辨认，说明是哪一部分，"
                         "并请对方提供更清晰的截图。",
        "describe_prompt": "请读出这张截图中的确切错误，并说明如何解决。",
        "follow_ups": (
            ("解释得更简单些", "请用更简单、不带术语的话再解释一遍原因。"),
            ("其他可能的原因", "还有什么可能导致这个错误？我怎样判断是哪一个？"),
            ("读出全部文字", "请按原样抄录截图中的所有文字。"),
            ("怎样确认已修好？", "我怎样检查修复是否有效？"),
        ),
    },
    "scene": {
        "label": "场景描述",
        "system_prompt": "你为盲人或低视力者描述图片。先用两三句简短的话回答：这是什么场景，然后是任何紧急情况（危险、"
                         "障碍物、台阶、车辆，或重要的标志或警告）。到此为止：对方想知道更多时会再问。被要求详细说明时，"
                         "按重要程度依次说明：人物、文字和标志、障碍物和危险，以及物体的位置（左、右、前方、近、远）。"
                         "要具体；看不见的不要猜，图片太暗或太模糊无法判断时要说明。",
        "describe_prompt": "请简要描述这个场景。",
        "follow_ups": (
            ("更多细节", "请更详细地描述这个场景：人物、文字和标志、障碍物，以及物体的位置。"),
            ("读出文字", "请按原样读出图片中的所有文字，并说明它们在哪里。"),
            ("有哪些颜色？", "图片中的主要颜色是什么，分别是什么东西的颜色？"),
            ("有东西挡路吗？", "前方有没有挡路的东西或任何危险？请说明它在哪里、有多近。"),
        ),
    },
    # -- issue 14 (product listing) --
    "product": {
        "label": "商品文案",
        "system_prompt": "你根据用户的商品照片和说明为网店撰写商品文案。回答严格分为三部分，使用以下标题："
                         "“## 标题”（一行，不超过 40 个汉字：可见的品牌、商品类型，以及材质、尺寸或颜色等关键属性）、"
                         "“## 卖点”（3 到 5 条要点，每条写一个买家关心的具体好处）和“## 商品描述”（一两段简短文字："
                         "是什么、用什么做的、怎么用、包含什么）。只使用照片中能看到的或用户说明的内容；不要编造规格、"
                         "认证、价格或品牌。买家需要的信息（尺寸、材质、型号）看不出来时，说明需要补充什么。",
        "describe_prompt": "请为这件商品写一份商品文案：标题、卖点和商品描述。",
        "follow_ups": (
            ("更短的标题", "请给出三个更短的备选标题，每个不超过 25 个汉字。"),
            ("更多卖点", "请再提出一些卖点，每条都基于照片中能看到的内容。"),
            ("语气更亲切", "请用更亲切、更口语化的语气改写商品描述。"),
            ("还缺什么？", "我还应该补充哪些信息，买家才能做决定（尺寸、材质、包含的配件）？"),
        ),
    },
    # -- end issue 14 (product listing) --
}


def localized(mode: Mode, lang: str | None) -> Mode:
    """`mode` in the page's language: its label, prompts and follow-up questions ("en": as it is)."""
    zh = _ZH_CN.get(mode.key) if lang == "zh-CN" else None
    if zh is None:
        return mode
    return replace(mode, label=zh["label"], system_prompt=f"{zh['system_prompt']}{_ANSWER_IN_CHINESE}",
                   describe_prompt=zh["describe_prompt"], follow_ups=zh["follow_ups"])
# -- end issue 13 (ux) --

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
