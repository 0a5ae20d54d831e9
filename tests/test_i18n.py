"""Issue 13 (ux): the page speaks the person's language (English, Simplified Chinese)."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from chat import i18n
from chat.conversation import MODES, localized
from tests.servers import Server, data_dir
from tests.test_a11y_axe import assert_clean
from tests.test_e2e_browser import send, wait_idle
from tests.test_page_ux import open_page

ROOT = Path(__file__).resolve().parent.parent


def test_the_language_comes_from_the_choice_then_the_browser():
    assert i18n.pick("zh-CN,zh;q=0.9,en;q=0.8") == "zh-CN"
    assert i18n.pick("en-GB,en;q=0.9,zh-CN;q=0.8") == "en"
    assert i18n.pick("fr-FR,zh;q=0.5") == "zh-CN"
    assert i18n.pick("zh-TW") is None and i18n.pick("de") is None and i18n.pick("") is None
    req = SimpleNamespace(cookies={}, headers={"accept-language": "zh-CN,zh;q=0.9"})
    assert i18n.lang_of(req) == "zh-CN"
    req.cookies = {"vlchat_lang": "en"}
    assert i18n.lang_of(req) == "en"
    assert i18n.lang_of(None) == "en"
    assert i18n.t("zh-CN", "delete.question", title="x").startswith("**删除“x”？**")
    assert set(i18n.PAGE["zh-CN"]) == set(i18n.PAGE["en"])  # every label has its translation
    assert set(i18n.SERVER["zh-CN"]) == set(i18n.SERVER["en"])


def test_the_modes_speak_chinese_on_a_chinese_page():
    for mode in MODES.values():
        zh = localized(mode, "zh-CN")
        assert zh.key == mode.key and zh.temperature == mode.temperature
        assert "简体中文" in zh.system_prompt and zh.describe_prompt != mode.describe_prompt
        assert len(zh.follow_ups) == len(mode.follow_ups)
        assert all(any("\u4e00" <= c <= "\u9fff" for c in label + question) for label, question in zh.follow_ups)
        assert localized(mode, "en") == mode


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    srv = Server(data_dir(tmp_path_factory, model_dir, "i18n-data")).start()
    yield srv
    srv.stop()


def test_a_chinese_browser_gets_a_chinese_page_and_can_choose_english(browser, server):
    context, page = open_page(browser, server, locale="zh-CN")
    try:
        assert page.evaluate("() => document.documentElement.lang") == "zh-CN"
        assert page.locator("#new-chat").inner_text() == "新对话"
        assert "场景描述" in page.locator("#mode").inner_text()
        assert page.locator("#delete").inner_text() == "删除"
        page.wait_for_function("() => document.querySelector('#input textarea').placeholder.startsWith('询问图片')")
        page.locator("#vl-lang").wait_for()
        assert page.locator("label[for=vl-lang]").inner_text() == "语言"
        assert page.locator("label[for=vl-theme]").inner_text() == "主题"
        # The answer's details in Chinese; the mode's prompt made the question in Chinese.
        send(page, "你好")
        wait_idle(page)
        details = page.locator("#chat .vl-stats").last
        details.wait_for()
        page.wait_for_function("() => document.querySelector('#chat .vl-stats summary').textContent === '详情'")
        assert_clean(page, "in Simplified Chinese")
        # The person's choice wins over the browser's language, and is kept.
        page.locator("#vl-lang").select_option("en")
        page.wait_for_load_state()
        page.locator("#input textarea").wait_for(timeout=60_000)
        page.wait_for_function("() => document.documentElement.lang === 'en'")
        assert page.locator("#new-chat").inner_text() == "New chat"
        page.reload()
        page.locator("#vl-lang").wait_for()
        assert page.locator("#vl-lang").input_value() == "en"
        assert page.locator("#new-chat").inner_text() == "New chat"
    finally:
        context.close()


def test_an_english_browser_can_choose_chinese(browser, server):
    context, page = open_page(browser, server, locale="en-US")
    try:
        assert page.evaluate("() => document.documentElement.lang") == "en"
        assert page.locator("#new-chat").inner_text() == "New chat"
        page.locator("#vl-lang").wait_for()
        page.locator("#vl-lang").select_option("zh-CN")
        page.wait_for_load_state()
        page.locator("#input textarea").wait_for(timeout=60_000)
        page.wait_for_function("() => document.documentElement.lang === 'zh-CN'")
        assert page.locator("#new-chat").inner_text() == "新对话"
        # The server follows the choice too (the cookie vlchat_lang, read by chat.i18n.lang_of).
        assert "vlchat_lang=zh-CN" in page.evaluate("() => document.cookie")
    finally:
        context.close()


@pytest.fixture
def ctx(tmp_path, loaded):
    from tests.test_ui import real_ctx

    yield from real_ctx(tmp_path, loaded)


def test_a_chinese_page_asks_in_chinese_and_the_model_is_told_to_answer_in_it(ctx, tmp_path):
    from chat import describe, ui, ui_conversation
    from tests.test_ui import OWNER, Req, png

    sent = []
    submit = ctx.engine.submit

    def spy(request, **kwargs):
        sent.append(request)
        return submit(request, **kwargs)

    ctx.engine.submit = spy
    zh = Req()
    zh.headers, zh.cookies = {"accept-language": "zh-CN,zh;q=0.9"}, {}
    updates = list(ui.send(ctx, None, {"text": "", "files": [png(tmp_path)]}, "scene", 0.0, 0.9, 16, "", "auto",
                           zh))
    conv_id = updates[0][0]
    assert ctx.store.messages(OWNER, conv_id)[0]["text"] == "请简要描述这个场景。"
    system = sent[-1].messages[0]["content"]
    assert system.startswith("你为盲人或低视力者描述图片") and "请用简体中文回答" in system
    # The follow-up buttons in Chinese; pressed, they send their Chinese question.
    row, *buttons = describe.follow_ups(ctx, conv_id, "scene", zh)
    assert row["visible"] is True and buttons[3]["value"] == "有东西挡路吗？"
    assert describe.question_for("scene", "有东西挡路吗？").startswith("前方有没有挡路的东西")
    # The delete question too; an English page keeps English (regenerate included).
    assert ui_conversation.ask_delete(ctx, conv_id, zh)[1].startswith("**删除“")
    list(ui.regenerate(ctx, conv_id, "scene", 0.0, 0.9, 16, "", Req()))
    assert sent[-1].messages[0]["content"].startswith("You describe images for a blind")


# -- issue 13, finished: what the server writes (status lines, notices, notes) in the page's language ------------

ANSWERING_ZH = re.search(r'"answering": "([^"]+)"', (ROOT / "assets" / "i18n.js").read_text().split('"zh-CN": {')[1])[1]


def zh_request():
    from tests.test_ui import Req

    req = Req()
    req.headers, req.cookies = {"accept-language": "zh-CN,zh;q=0.9"}, {}
    return req


def test_the_server_s_sentences_have_translations_that_keep_their_values():
    from chat import i18n_text
    from chat.i18n_catalog import CATALOG

    fields = re.compile(r"\{(\w+)")
    for english, chinese in CATALOG["zh-CN"].items():
        assert set(fields.findall(english)) == set(fields.findall(chinese)), english
        assert chinese != english, english
    # The status while an answer comes starts with i18n.js's "answering" (announce.js, ux.js and keys.js look
    # for it, without its ellipsis), the queue lines too.
    word = ANSWERING_ZH.rstrip("….")
    assert word == "正在回答"
    for line in ("Answering…", "Answering… your next message is waiting for this answer.",
                 "Answering… waiting for the model: you are next."):
        assert i18n_text.say(line, "zh-CN").startswith(word), line
    assert i18n_text.say("Answering… waiting for the model: {ahead} ahead of you.", "zh-CN", ahead=3) == \
        "正在回答… 正在等待模型：前面还有 3 个。"
    # A finished English notice is translated whole or sentence by sentence, its numbers kept.
    busy = "The server is busy: 3 requests are waiting. Try again in a moment. Your message is still in the box."
    assert i18n_text.translate(busy, "zh-CN") == "服务器正忙：有 3 个请求在等待。请稍后再试。你的消息还在输入框里。"
    assert i18n_text.translate("Loading the model, 43%… The model is not ready yet, so nothing was sent; try "
                               "again when the box is enabled.", "zh-CN").startswith("正在加载模型，43%…模型尚未就绪")
    assert i18n_text.translate("Something new.", "zh-CN") == "Something new."  # unknown: as it was
    assert i18n_text.translate("Stopped.", "en") == "Stopped."
    # Every plain notice the page's modules raise has its translation.
    plain = re.compile(r'Notice\(\s*"((?:[^"\\]|\\.)*)"(?:\s*"((?:[^"\\]|\\.)*)")?\s*\)')
    for name in ("ui.py", "stream.py", "describe.py", "versions.py", "history_io.py", "ui_conversation.py"):
        for m in plain.finditer((ROOT / "chat" / name).read_text()):
            text = m[1] + (m[2] or "")
            assert i18n_text.translate(text, "zh-CN") != text, (name, text)


def test_a_chinese_page_s_handlers_answer_in_chinese(ctx, tmp_path):
    from chat import page, ui
    from tests.test_ui import OWNER, Req, png

    send = page.bind(ui.send, ctx, 6)
    # A notice, shown in the page's language.
    out = list(send(None, {"text": "", "files": []}, "general", 0.0, 0.9, 16, "", "auto", request=zh_request()))
    assert out[-1][-1].endswith("⚠ 请输入问题或附加图片。</div>")
    # The status line while the answer comes; a photo sent alone is titled by its file name, in Chinese.
    outs = list(send(None, {"text": "", "files": [png(tmp_path, "猫.png")]}, "general", 0.0, 0.9, 16, "", "auto",
                     request=zh_request()))
    statuses = [o[4] for o in outs if isinstance(o[4], str)]
    assert statuses[0] == "正在回答…", statuses
    conv_id = outs[0][0]
    assert ctx.store.get_conversation(OWNER, conv_id)["title"] == "照片：猫.png"
    # Rename's status; regenerate with nothing to regenerate: a Chinese notice; an English page stays English.
    rename = page.bind(ui.rename, ctx, 2)
    assert rename(conv_id, "新标题", request=zh_request())[1] == "已重命名。"
    assert rename(conv_id, "New", request=Req())[1] == "Renamed."
    regen = page.bind(ui.regenerate, ctx, 6)
    assert "还没有可以重新生成的内容。" in list(regen(None, "general", 0.0, 0.9, 16, "", request=zh_request()))[-1][-1]
    assert "Nothing to regenerate yet." in list(regen(None, "general", 0.0, 0.9, 16, "", request=Req()))[-1][-1]
    # An edited question on a Chinese page gets the Chinese prompt (chat.versions passes the language).
    from chat import versions

    sent = []
    submit = ctx.engine.submit
    ctx.engine.submit = lambda request, **kw: sent.append(request) or submit(request, **kw)
    question = next(r for r in ctx.store.messages(OWNER, conv_id) if r["role"] == "user")
    list(page.bind(versions.edit, ctx, 6)(conv_id, str(question["id"]), "", "general", 0.0, 0.9, 16, "",
                                          request=zh_request()))
    assert sent[-1].messages[0]["content"].startswith("你是一个乐于助人的助手")
    assert sent[-1].messages[-1]["content"][-1]["text"] == "请描述这张图片。"
    # The versions panel names the messages and their versions in Chinese.
    choice, line = page.bind(versions.choose, ctx)(conv_id, str(question["id"]), request=zh_request())[:2]
    assert choice["choices"][0][0].startswith("问题 1：") and choice["choices"][1][0] == "回答 1", choice
    assert line.startswith("问题 1：第 2 版，共 2 版。可在下方编辑"), line


def test_a_chinese_browser_hears_and_reads_chinese(browser, server):
    from tests.test_a11y_speech import ANNOUNCED

    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="zh-CN")
    context.add_init_script(ANNOUNCED)
    page = context.new_page()
    try:
        page.goto(server.base + "/")
        page.locator("#input textarea").wait_for(timeout=60_000)
        page.wait_for_function("() => !document.querySelector('#input textarea').disabled", timeout=60_000)
        # The radio groups' names, the Display group, the history panels' labels.
        page.wait_for_function("() => document.getElementById('mode').getAttribute('aria-label') === '模式'")
        assert page.locator("#detail").get_attribute("aria-label") == "图片细节"
        assert page.locator("#conversation-list").get_attribute("aria-label") == "对话"
        page.locator("#vl-display").wait_for()
        assert page.locator("#vl-display").get_attribute("aria-label") == "显示"
        assert page.locator("label[for=high-contrast]").inner_text() == "高对比度"
        assert "搜索对话" in page.locator("#search").inner_text()
        search = page.locator("#search textarea, #search input").first
        assert search.get_attribute("placeholder") == "标题或消息中的词语"
        assert "导出或导入" in page.locator("#export-import").inner_text()
        assert "编辑与版本" in page.locator("#versions").inner_text()
        # A notice in Chinese.
        page.locator("#regenerate").click()
        page.locator("#notice [role=alert]", has_text="还没有可以重新生成的内容。").wait_for(timeout=10_000)
        page.locator("#dismiss-notice").click()
        # The status while answering, in Chinese; announce.js knows it is busy, so it says when the answer ends.
        page.locator("#settings").click()
        slider = page.locator("#max-new-tokens input[type=number]")
        slider.fill("1500")
        slider.press("Enter")
        page.locator("#input textarea").fill("你好")
        page.locator("#input textarea").press("Enter")
        page.wait_for_function("() => document.querySelector('#status').innerText.trim().startsWith('正在回答')",
                               timeout=30_000)
        page.wait_for_function("() => window.__announced.includes('正在回答…')", timeout=30_000)
        page.wait_for_function("() => window.__announced.some(a => a.startsWith('回答完毕'))", timeout=120_000)
        assert not any("Answering" in a for a in page.evaluate("() => window.__announced"))
    finally:
        context.close()


# -- issue 13, leftovers: refused images and imports, the LoRA/engine refusals, the boxes' caption ----------------

# Words that stay as they are in a Chinese sentence: formats, units, names of fields in a JSON export.
_KEPT = {"PNG", "JPEG", "WebP", "GIF", "BMP", "MB", "UTF", "JSON", "vlchat", "sha256", "base64", "format",
         "conversation", "images", "current", "low", "auto", "high", "HTTP", "GPU", "LoRA", "KV"}


def english_left(chinese: str, *values: str) -> list[str]:
    """English words left in a translated sentence, other than the kept ones and the values carried over."""
    for value in values:
        chinese = chinese.replace(value, "")
    return [w for w in re.findall(r"[A-Za-z][A-Za-z0-9]+", chinese) if w not in _KEPT]


def assert_chinese(english: str, *values: str) -> str:
    from chat.i18n_text import translate

    chinese = translate(english, "zh-CN")
    assert chinese != english and not english_left(chinese, *values), (english, chinese)
    assert any("\u4e00" <= c <= "\u9fff" for c in chinese), chinese
    return chinese


def refused_images() -> list[str]:
    """What chat.images says about each kind of refused file (the real errors, values and all)."""
    from chat import images

    tall = io.BytesIO()
    Image.new("RGB", (1, 300)).save(tall, format="PNG")
    big = io.BytesIO()
    Image.new("RGB", (300, 300)).save(big, format="PNG")
    attempts = [lambda: images.sanitize(b""), lambda: images.sanitize(b"not an image at all"),
                lambda: images.sanitize(b"\x89PNG\r\n\x1a\n" + b"\0" * 40),
                lambda: images.sanitize(tall.getvalue()),
                lambda: images.sanitize(big.getvalue(), max_pixels=50_000),
                lambda: images.sanitize(big.getvalue(), max_bytes=100),
                lambda: images.smart_resize(0, 10, min_pixels=1, max_pixels=100),
                lambda: images.detail_pixels("medium")]
    out = []
    for attempt in attempts:
        with pytest.raises(images.ImageError) as err:
            attempt()
        assert err.value.template in images.MESSAGES and str(err.value) == err.value.template.format(**err.value.values)
        out.append(str(err.value))
    return out


def test_every_refused_image_is_told_in_chinese_as_the_page_shows_it():
    from chat import images
    from chat.i18n_catalog import CATALOG

    for template in images.MESSAGES:  # each template: alone (imports) and after the file name (attachments)
        assert template in CATALOG["zh-CN"] and "{name}: " + template in CATALOG["zh-CN"], template
    seen = refused_images()
    assert len(set(seen)) == len(seen)
    for message in seen:
        values = re.findall(r"\d+(?:\.\d+)?(?:x\d+)?|'[^']*'", message)
        values = [value.strip("'") for value in values]
        chinese = assert_chinese(f"猫 cat.png: {message} Your message is still in the box.", "猫 cat.png", *values)
        assert chinese.startswith("猫 cat.png：") and chinese.endswith("你的消息还在输入框里。"), chinese
        for value in values:
            assert value in chinese, (value, chinese)


def test_a_chinese_page_refuses_an_attachment_in_chinese(ctx, tmp_path):
    from chat import page, ui
    from tests.test_ui import Req

    broken = tmp_path / "坏了.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    thin = tmp_path / "thin.png"
    Image.new("RGB", (1, 300)).save(thin)
    send = page.bind(ui.send, ctx, 6)
    out = list(send(None, {"text": "看", "files": [str(broken)]}, "general", 0.0, 0.9, 16, "", "auto",
                    request=zh_request()))
    assert "⚠ 坏了.png：图片文件已损坏或不完整。" in out[-1][-1], out[-1][-1]
    out = list(send(None, {"text": "看", "files": [str(thin)]}, "general", 0.0, 0.9, 16, "", "auto",
                    request=zh_request()))
    assert "thin.png：图片为 1x300 像素；宽高比最多为 200:1。" in out[-1][-1], out[-1][-1]
    out = list(send(None, {"text": "look", "files": [str(thin)]}, "general", 0.0, 0.9, 16, "", "auto",
                    request=Req()))
    assert "thin.png: Image is 1x300 pixels; the aspect ratio must be at most 200:1." in out[-1][-1]


def import_refusals(monkeypatch) -> list[str]:
    """Every reason chat.history_io gives for refusing a file, from the real checks."""
    from chat import history_io
    from chat.config import Settings
    from chat.notices import Notice

    png_bytes = io.BytesIO()
    Image.new("RGB", (40, 30)).save(png_bytes, format="PNG")
    sha = "a" * 64

    def export(**changes):
        data = {"format": history_io.FORMAT, "version": history_io.FORMAT_VERSION, "title": "t",
                "messages": [{"role": "user", "text": "hi"}]}
        data.update(changes)
        return data

    def message(**changes):
        return export(messages=[{"role": "user", "text": "hi", **changes}])

    def image(data: bytes):
        return [{"sha256": sha, "data": base64.b64encode(data).decode()}]

    settings = Settings(max_images_per_message=2, max_images_per_conversation=3)
    raws = [b"\xff\xfe\xfa", b"[" * 20 + b"]" * 20, b"{nope", b'{"format": "other"}',
            json.dumps(export(version=99)).encode(), b"x" * 2_000_000]
    plans = [export(extra=1), export(messages=[]), export(title=5), export(title="t" * 1001), export(current=7),
             export(images={"a": 1}), export(images=image(b"")[:1] * 4), export(images=[{"sha256": "no", "data": ""}]),
             export(images=[{"sha256": sha, "data": "###"}]), export(images=image(b"not an image")),
             export(images=[[]]), message(parent=0), message(role="robot"), message(image_ids="x"),
             export(images=image(png_bytes.getvalue()), messages=[{"role": "user", "image_ids": [sha] * 3}]),
             message(image_ids=[sha]), message(text=["x"]), message(settings=[1]), message(settings={"k y": [1]}),
             export(settings="x"), export(messages=[{"role": "user"}] * 3)]
    out = []
    monkeypatch.setattr(history_io, "IMPORT_MAX_BYTES", 1_500_000)
    for raw in raws:
        with pytest.raises(Notice) as err:
            history_io.parse(raw)
        out.append(err.value.message)
    monkeypatch.setattr(history_io, "MAX_MESSAGES", 2)
    for data in plans:
        with pytest.raises(Notice) as err:
            history_io.checked(data, settings, 1000)
        out.append(err.value.message)
    out.append(history_io._refuse("its messages do not fit together.").message)
    return out


def test_every_import_refusal_is_told_in_chinese(monkeypatch):
    from chat.i18n_text import translate

    reasons = import_refusals(monkeypatch)
    assert len(set(reasons)) == len(reasons), reasons  # each check above hit a reason of its own
    for message in reasons:
        assert message.startswith("This file cannot be imported: ") and message.endswith(" Nothing was imported.")
        values = re.findall(r"(?<![\w.,])\d(?:[\d.,]*\d)?|'[^']*'|\[[^\]]*\]", message)
        chinese = assert_chinese(message, *values, "extra")  # extra: the unknown field's name, as it was
        assert chinese.startswith("无法导入此文件：") and chinese.endswith("没有导入任何内容。"), chinese
    # The refused image inside, and the message's part, named in Chinese.
    chinese = [translate(m, "zh-CN") for m in reasons]
    assert any("：图片 1：不支持的图片格式；" in m for m in chinese), chinese
    assert any("：消息 1 的设置：'k y' 不是简单的值。" in m for m in chinese), chinese


def test_the_engine_s_refusals_and_the_other_features_notices_are_told_in_chinese():
    from chat import ratelimit_gate
    from chat.engine import types, wire
    from chat.engine.filtered import BROKEN, ContentFiltered
    from chat.engine.local import engine, retry
    from chat.ratelimit import Refusal

    box = " Your message is still in the box."
    for error in (types.UnknownAdapter("my-lora", ()), types.Busy(3), types.NotReady(), types.ShuttingDown(),
                  ContentFiltered()):
        assert assert_chinese(f"{error}{box}", "my-lora").endswith("你的消息还在输入框里。"), error
    assert assert_chinese(f"{types.UnknownAdapter('x', ('lo-a', 'lo-b'))}{box}", "lo-a, lo-b").startswith(
        "这里没有提供模型“x”（LoRA 适配器：lo-a, lo-b）。")
    for line in (wire.UNREACHABLE, BROKEN, engine.GENERIC_FAILURE, retry.OUT_OF_MEMORY, retry.LOWERED_NOTICE,
                 "The model server refused the request (HTTP 418).", "The conversation is too long for the model.",
                 "An image of this conversation could not be read; start a new chat.",
                 "The content filter failed, so nothing was sent; try again later. Your message is still in the box."):
        assert_chinese(line, "418")
    for what in ("requests", "tokens"):
        for seconds in (1, 5, 119, 600, 9000):
            message = ratelimit_gate.page_message(Refusal(what, seconds))
            number = re.search(r"\d+", message)[0]
            assert number in assert_chinese(message, number), message


def test_the_boxes_caption_and_alt_text_are_in_the_page_s_language_each_time_the_chat_is_drawn(tmp_path):
    from chat.i18n_text import speaking
    from chat.render import chat_history
    from chat.store import Store
    from tests.test_grounding import ANSWER, conversation

    store = Store(tmp_path)
    try:
        conv, _ = conversation(store, (ANSWER, "complete"))
        english = chat_history(store, store.messages("me", conv))[1]["content"]["text"]
        with speaking("zh-CN"):
            chinese = chat_history(store, store.messages("me", conv))[1]["content"]["text"]
        again = chat_history(store, store.messages("me", conv))[1]["content"]["text"]
    finally:
        store.close()
    assert 'alt="Boxes: cat, red car (2)"' in english and ">Boxes: cat, red car (2)</p>" in english
    assert 'alt="框：cat、red car (2)"' in chinese and ">框：cat、red car (2)</p>" in chinese, chinese
    assert again == english  # nothing of the Chinese view was kept: the caption is made per view
    src = re.compile(r'<img src="([^"]+)"')
    assert src.search(english)[1] == src.search(chinese)[1]  # the same drawn file (keyed by content)


def test_points_and_unlabelled_marks_in_chinese():
    from chat.grounding import Mark, summary
    from chat.i18n_text import speaking

    marks = [Mark("", box=(1.0, 2.0, 3.0, 4.0)), Mark("door", point=(5.0, 6.0)), Mark("door", point=(7.0, 8.0))]
    assert summary(marks) == "Boxes: unlabelled. Points: door (2)"
    with speaking("zh-CN"):
        assert summary(marks) == "框：未标注。点：door (2)"


def test_a_chinese_page_hears_of_an_adapter_it_does_not_serve_in_chinese(ctx):
    from chat import page, ui
    from tests.test_ui import Req

    send = page.bind(ui.send, ctx, 6)
    args = (None, {"text": "你好", "files": []}, "general", 0.0, 0.9, 16, "", "auto")
    out = list(send(*args, request=zh_request(), adapter="my-lora"))
    assert out[-1][-1].endswith("⚠ 这里没有提供模型“my-lora”（没有加载任何 LoRA 适配器）。你的消息还在输入框里。</div>")
    out = list(send(*args, request=Req(), adapter="my-lora"))
    assert "The model &#x27;my-lora&#x27; is not served here (LoRA adapters: none are loaded). Your" in out[-1][-1]
