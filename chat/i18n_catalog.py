"""The server's page sentences in other languages, keyed by the English (chat/i18n_text.py reads it).

A key is the English sentence exactly as the code writes it, with `{name}` (or `{name:,}`) where a
value goes; the translation uses the same names. Add a sentence here when you add one to the page.
"""

from __future__ import annotations

ZH_CN: dict[str, str] = {
    # -- the status line while an answer comes (chat/stream.py); assets/announce.js: it starts with t("answering")
    "Answering…": "正在回答…",
    "Answering… your next message is waiting for this answer.": "正在回答… 你的下一条消息正在等这个回答结束。",
    "Answering… waiting for the model: you are next.": "正在回答… 正在等待模型：下一个就是你。",
    "Answering… waiting for the model: {ahead} ahead of you.": "正在回答… 正在等待模型：前面还有 {ahead} 个。",
    "Stopped.": "已停止。",
    "The answer reached the length limit (Settings → Max new tokens).":
        "回答达到了长度上限（设置 → 最大新 token 数）。",
    "Renamed.": "已重命名。",
    "Conversation deleted.": "对话已删除。",
    # -- notes in an answer (chat/render.py) --
    "⏹ Stopped.": "⏹ 已停止。",
    "⚠ Interrupted (the server restarted).": "⚠ 已中断（服务器重启了）。",
    "The answer failed.": "回答失败。",
    "⚠ Stopped by the content filter.": "⚠ 已被内容过滤器停止。",
    "The answer was stopped by the content filter.": "回答已被内容过滤器停止。",
    "Version {k} of {n}": "第 {k} 版，共 {n} 版",
    # -- start-up (chat/engine/types.py LoadStatus, chat/engine/upstreams.py) --
    "Starting…": "正在启动…",
    "Starting, {pct}%…": "正在启动，{pct}%…",
    "Loading the model…": "正在加载模型…",
    "Loading the model, {pct}%…": "正在加载模型，{pct}%…",
    "Warming up the model…": "正在预热模型…",
    "Warming up the model, {pct}%…": "正在预热模型，{pct}%…",
    "Ready.": "就绪。",
    "The model could not start: {error}": "模型无法启动：{error}",
    "The model is loading…": "模型正在加载…",
    "Connecting to the model server…": "正在连接模型服务器…",
    "The model server is not reachable; vlchat keeps trying and answers again as soon as it is back.":
        "无法连接模型服务器；vlchat 会继续尝试，服务器恢复后立即继续回答。",
    # -- notices (chat/ui.py, chat/stream.py, chat/engine) --
    "This browser has no identity yet; reload the page.": "此浏览器还没有身份标识；请重新加载页面。",
    "Your message is {n} characters; the limit is {limit}. Shorten it or split it into several messages. "
    "Nothing was sent.": "你的消息有 {n} 个字符；上限是 {limit}。请缩短或分成几条消息。没有发送任何内容。",
    "The system prompt override is {n} characters; the limit is {limit}. Shorten it or split it into several "
    "messages. Nothing was sent.": "覆盖的系统提示词有 {n} 个字符；上限是 {limit}。请缩短它。没有发送任何内容。",
    "Nothing was sent; your message is still in the box.": "没有发送任何内容；你的消息还在输入框里。",
    "The model is not ready yet, so nothing was sent; try again when the box is enabled.":
        "模型尚未就绪，因此没有发送任何内容；输入框可用后请再试。",
    "That conversation does not exist (it may have been deleted).": "该对话不存在（可能已被删除）。",
    "Open or start a conversation first.": "请先打开或开始一个对话。",
    "A title cannot be empty.": "标题不能为空。",
    "That conversation no longer exists.": "该对话已不存在。",
    "That conversation no longer exists; start a new chat.": "该对话已不存在；请开始新对话。",
    "Your message is still in the box.": "你的消息还在输入框里。",
    "Type a question or attach an image.": "请输入问题或附加图片。",
    "This conversation would hold {n} images; the limit is {limit}. Start a new chat.":
        "这个对话将包含 {n} 张图片；上限是 {limit}。请开始新对话。",
    "Nothing to regenerate yet.": "还没有可以重新生成的内容。",
    "A message is already waiting for the answer on screen. Press Stop to end that answer sooner.":
        "已有一条消息在等待屏幕上的回答。按“停止”可以提前结束那个回答。",
    "The answer on screen is still going; press Stop, then send your message again.":
        "屏幕上的回答仍在进行；请按“停止”，然后再次发送你的消息。",
    "The server is busy: {n} requests are waiting. Try again in a moment.":
        "服务器正忙：有 {n} 个请求在等待。请稍后再试。",
    "The model is still loading; try again in a moment.": "模型仍在加载；请稍后再试。",
    "The server is restarting; your answer was cut short. Try again in a minute.":
        "服务器正在重启；你的回答被中断了。请一分钟后再试。",
    "This conversation is {n} tokens and the answer may take {m}; together that is {over} over the {limit}-token "
    "limit. Choose a lower image detail, remove an image, ask for a shorter answer (Max new tokens) or start a new "
    "chat.": "这个对话有 {n} 个 token，回答可能需要 {m} 个；合计超出 {limit} token 上限 {over} 个。"
             "请选择较低的图片细节、移除图片、要求更短的回答（最大新 token 数）或开始新对话。",
    "This conversation's text is {n} characters, more than the {limit}-token context can hold. Send a shorter text "
    "(or attach it in parts) or start a new chat.":
        "这个对话的文字有 {n} 个字符，超过了 {limit} token 上下文所能容纳的。"
        "请发送更短的文字（或分几次发送），或开始新对话。",
    "This conversation needs more KV memory than the server has; start a new chat or ask for a shorter answer.":
        "这个对话需要的 KV 内存超过了服务器所有；请开始新对话或要求更短的回答。",
    "The model failed while answering; the error is in the server log.": "模型在回答时出错；错误记录在服务器日志中。",
    # -- images (chat/uploads.py; the preview under the box: chat/conversation.py attachment_preview) --
    "- **{name}**: {w}×{h} → model sees {mw}×{mh}, {n} tokens":
        "- **{name}**：{w}×{h} → 模型看到 {mw}×{mh}，{n} 个 token",
    "- **{name}**: {w}×{h} → model sees {mw}×{mh}, {n} tokens (scaled down)":
        "- **{name}**：{w}×{h} → 模型看到 {mw}×{mh}，{n} 个 token（已缩小）",
    "Images: {n} tokens.": "图片：{n} 个 token。",
    "Conversation so far: about {used}; room for the answer ({answer}) included, about {left} of {limit} tokens are "
    "left.": "目前的对话：约 {used} 个；算上回答的空间（{answer}），{limit} 个 token 中约剩 {left} 个。",
    "**This is about {over} tokens over the limit**: choose a lower detail, remove an image, ask for a shorter answer "
    "or start a new chat.": "**约超出上限 {over} 个 token**：请选择较低的细节、移除图片、要求更短的回答或开始新对话。",
    "Scaled-down images lose small text; choose High detail for documents and screenshots.":
        "缩小的图片会丢失小字；文档和截图请选择“高”细节。",
    "Sent as it is, the oldest turns are left out to make room (the answer says so).":
        "照样发送时，最早的几轮会被略去以腾出空间（回答下方会注明）。",
    "{name} could not be read; attach it again.": "无法读取 {name}；请重新附加。",
    "{n} images attached; a message may carry {limit}.": "附加了 {n} 张图片；一条消息最多 {limit} 张。",
    "{name}: the file is {size} MB; the limit is {limit} MB.": "{name}：文件大小为 {size} MB；上限是 {limit} MB。",
    # -- describe, follow-ups, versions, delete (chat/describe.py, versions.py, ui_conversation.py) --
    "An answer is still coming. Wait for it to finish, or press Stop, then try again.":
        "回答还在生成。请等它结束，或按“停止”，然后再试。",
    "Choose a photo to describe.": "请选择要描述的照片。",
    "That follow-up question is not available in this mode.": "这个追问在当前模式下不可用。",
    "Describe a photo or ask a question first; follow-up questions are about its answer.":
        "请先描述一张照片或提一个问题；追问是针对它的回答的。",
    "Choose a message that has versions first.": "请先选择一条有多个版本的消息。",
    "That message is no longer there; open the conversation again.": "该消息已不存在；请重新打开对话。",
    "Choose the question to edit first.": "请先选择要编辑的问题。",
    "Only a question can be edited; choose one under Message.": "只能编辑问题；请在“消息”中选择一个问题。",
    "The edited question is empty; type it, or choose Previous version to go back.":
        "编辑后的问题是空的；请输入内容，或选择“上一版本”返回。",
    "Open a conversation first; there is nothing to delete.": "请先打开一个对话；没有可删除的内容。",
    "Nothing to edit yet: send a message first.": "还没有可编辑的内容：请先发送一条消息。",
    "Question {n}": "问题 {n}",  # the versions panel's message names ("Question 2: what is…")
    "Answer {n}": "回答 {n}",
    ": ": "：",
    "Question {n}: version {k} of {m}.": "问题 {n}：第 {k} 版，共 {m} 版。",
    "Answer {n}: version {k} of {m}.": "回答 {n}：第 {k} 版，共 {m} 版。",
    "Edit it below to ask it another way; the answers so far stay as versions.":
        "可在下方编辑，换一种方式提问；已有的回答会作为版本保留。",
    # -- search, export and import (chat/search.py, chat/history_io.py) --
    "No conversations match.": "没有匹配的对话。",
    "1 conversation matches.": "有 1 个对话匹配。",
    "{n} conversations match.": "有 {n} 个对话匹配。",
    "Open or start a conversation first; then it can be exported.": "请先打开或开始一个对话，然后才能导出。",
    "Ready: download the Markdown (ZIP, with images) or the JSON (every version; it can be imported).":
        "已就绪：下载 Markdown（ZIP，含图片）或 JSON（包含所有版本；可以导入）。",
    "The file could not be read; choose it again.": "无法读取该文件；请重新选择。",
    "Choose a vlchat JSON export to import.": "请选择要导入的 vlchat JSON 导出文件。",
    "This file cannot be imported: {why} Nothing was imported.": "无法导入此文件：{why}没有导入任何内容。",
    "Imported “{title}” ({n} messages shown).": "已导入“{title}”（显示 {n} 条消息）。",
    # -- describe conversations' titles (chat/versions.py / chat/describe.py) --
    "Photo: {name}": "照片：{name}",
    # -- other issue 14 features' page sentences (rate limits, content filter, grounding) --
    "The message contains a word or phrase this server's content filter blocks, so it was not sent.":
        "消息中含有本服务器内容过滤器屏蔽的词语，因此没有发送。",
    "The content filter failed, so nothing was sent; try again later.":
        "内容过滤器出错，因此没有发送任何内容；请稍后再试。",
    "The content filter failed, so the answer was stopped; the details are in the server log.":
        "内容过滤器出错，因此回答已停止；详情记录在服务器日志中。",
    "Type what to find on the image, for example: the Save button.": "请输入要在图片上查找的内容，例如：保存按钮。",
    "Name what to find in at most {n} characters.": "要查找的内容最多 {n} 个字符。",
    "Find looks at the latest image in the conversation: send a screenshot first (attach it and press Enter), then "
    "name what to find.": "查找针对对话中最新的图片：请先发送一张截图（附加后按 Enter），再说明要查找什么。",
    # -- issue 14: over-long conversations (chat/trim.py) --
    "Earlier messages (1 turn) were left out to fit the model's context.":
        "为了放进模型的上下文，较早的消息（1 轮）未发送给模型。",
    "Earlier messages ({n} turns) were left out to fit the model's context.":
        "为了放进模型的上下文，较早的消息（{n} 轮）未发送给模型。",
    "The most recent image, with its question and answer, was kept.": "最近的一张图片及其问答已保留。",
    # -- the model server, adapters, the GPU (chat/engine: types.py UnknownAdapter, wire.py, remote.py, retry.py) --
    "The model '{name}' is not served here (LoRA adapters: none are loaded).":
        "这里没有提供模型“{name}”（没有加载任何 LoRA 适配器）。",
    "The model '{name}' is not served here (LoRA adapters: {listed}).":
        "这里没有提供模型“{name}”（LoRA 适配器：{listed}）。",
    "The model server is not reachable; try again in a moment.": "无法连接模型服务器；请稍后再试。",
    "The model server refused the request (HTTP {status}).": "模型服务器拒绝了请求（HTTP {status}）。",
    "The conversation is too long for the model.": "对话太长，模型无法处理。",
    "An image of this conversation could not be read; start a new chat.":
        "无法读取这个对话中的一张图片；请开始新对话。",
    "The GPU ran out of memory, so the images were read at lower detail.":
        "GPU 内存不足，因此以较低的细节读取了图片。",
    "The GPU ran out of memory for this request. Try fewer images, lower detail or a shorter conversation.":
        "GPU 内存不足，无法处理这个请求。请减少图片、降低细节或缩短对话。",
    # -- boxes drawn on an answer's image: caption and alt text (chat/grounding.py summary) --
    "Boxes: {labels}": "框：{labels}",
    "Points: {labels}": "点：{labels}",
    ", ": "、",
    ". ": "。",
    "unlabelled": "未标注",
    # -- why an import was refused (chat/history_io.py: "This file cannot be imported: {why} Nothing was imported.")
    "it is {size} MB; the limit is {limit} MB.": "它有 {size} MB；上限是 {limit} MB。",
    "it is not UTF-8 text (a vlchat JSON export is).": "它不是 UTF-8 文本（vlchat 的 JSON 导出文件是）。",
    "it nests deeper than {n} levels; a vlchat export does not.": "它的嵌套超过 {n} 层；vlchat 导出文件不会这样。",
    "it is not valid JSON.": "它不是有效的 JSON。",
    'it is not a vlchat conversation export (its "format" is not "vlchat.conversation").':
        '它不是 vlchat 对话导出文件（它的 "format" 不是 "vlchat.conversation"）。',
    "its format version is {found}; this server reads version {n}.": "它的格式版本是 {found}；本服务器读取版本 {n}。",
    "{what} is not an object.": "{what}不是对象。",
    "{what} has fields an export does not have ({fields}).": "{what}含有导出文件没有的字段（{fields}）。",
    "{what} is not text.": "{what}不是文本。",
    "{what} is {n} characters; the limit is {limit}.": "{what}有 {n} 个字符；上限是 {limit}。",
    "{what} is not a small object.": "{what}不是小型对象。",
    "{what}: {key} is not a plain value.": "{what}：{key} 不是简单的值。",
    '"images" is not a list.': '"images" 不是列表。',
    "it holds {n} images; a conversation may hold {limit}.": "它含有 {n} 张图片；一个对话最多 {limit} 张。",
    "image {n} has no valid sha256 or data.": "图片 {n} 没有有效的 sha256 或数据。",
    "image {n} is not valid base64.": "图片 {n} 不是有效的 base64。",
    "image {n}: {why}": "图片 {n}：{why}",  # why: the image's refusal (chat/images.py, below)
    "it has no messages.": "它没有消息。",
    "it has {n} messages; the limit is {limit}.": "它有 {n} 条消息；上限是 {limit}。",
    '"current" does not name one of its messages.': '"current" 没有指向它的任何一条消息。',
    "{what}'s parent is not an earlier message.": "{what}的上一条不是更早的消息。",
    "{what} has no valid role.": "{what}没有有效的角色。",
    "{what}'s images are not lists.": "{what}的图片不是列表。",
    "{what} carries {n} images; a message may carry {limit}.": "{what}带有 {n} 张图片；一条消息最多 {limit} 张。",
    "{what} names an image the file does not hold.": "{what}引用了文件中没有的图片。",
    "its messages do not fit together.": "它的消息无法拼接在一起。",
    # ... and what they name ({what})
    "the file": "该文件",
    "the title": "标题",
    "the settings": "设置",
    "image {n}": "图片 {n}",
    "message {n}": "消息 {n}",
    "message {n}'s text": "消息 {n} 的文字",
    "message {n}'s settings": "消息 {n} 的设置",
    "message {n}'s usage": "消息 {n} 的用量",
    "message {n}'s file name": "消息 {n} 的文件名",
}

# A refused image (chat/images.py ImageError, its MESSAGES): alone (an import's "image 2: ...") and as the page
# shows an attachment's ("cat.png: ...", chat/uploads.py).
IMAGE_ERRORS: dict[str, str] = {
    "Unsupported image format; use PNG, JPEG, WebP, GIF or BMP.":
        "不支持的图片格式；请使用 PNG、JPEG、WebP、GIF 或 BMP。",
    "The image file is damaged or incomplete.": "图片文件已损坏或不完整。",
    "The image file is empty.": "图片文件是空的。",
    "Image has too many pixels; the limit is {limit} megapixels.": "图片像素太多；上限是 {limit} 百万像素。",
    "Image is {size} MB; the limit is {limit} MB.": "图片有 {size} MB；上限是 {limit} MB。",
    "Image is {width}x{height} pixels; both sides must be at least 1 pixel.":
        "图片为 {width}x{height} 像素；两边都必须至少 1 像素。",
    "Image is {width}x{height} pixels; the aspect ratio must be at most {aspect}:1.":
        "图片为 {width}x{height} 像素；宽高比最多为 {aspect}:1。",
    "Image is {width}x{height} pixels ({pixels} megapixels); the limit is {limit} megapixels.":
        "图片为 {width}x{height} 像素（{pixels} 百万像素）；上限是 {limit} 百万像素。",
    "Unknown detail level '{detail}'; use low, auto or high.": "未知的细节级别“{detail}”；请使用 low、auto 或 high。",
}
for _en, _zh in IMAGE_ERRORS.items():
    ZH_CN[_en] = _zh
    ZH_CN["{name}: " + _en] = "{name}：" + _zh

# Rate limits (chat/ratelimit_gate.py page_message): each reason with each unit of the wait.
for _what, _zh in (("Too many messages", "消息太多"), ("Too much text asked and answered", "提问和回答的文字太多")):
    for _unit, _zh_unit in (("second", "秒"), ("seconds", "秒"), ("minutes", "分钟"), ("hours", "小时")):
        ZH_CN[f"{_what}; try again in {{n}} {_unit}. Your message is still in the box."] = \
            f"{_zh}；请 {{n}} {_zh_unit}后再试。你的消息还在输入框里。"

CATALOG: dict[str, dict[str, str]] = {"zh-CN": ZH_CN}
