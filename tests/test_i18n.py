"""Issue 13 (ux): the page speaks the person's language (English, Simplified Chinese)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from chat import i18n
from chat.conversation import MODES, localized
from tests.servers import Server, data_dir
from tests.test_a11y_axe import AXE_JS, assert_clean
from tests.test_e2e_browser import send, wait_idle

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


def open_page(browser, server, locale: str):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale=locale)
    context.add_init_script(path=str(AXE_JS))
    page = context.new_page()
    page.goto(server.base + "/")
    page.locator("#input textarea").wait_for(timeout=60_000)
    page.wait_for_function("() => !document.querySelector('#input textarea').disabled", timeout=60_000)
    return context, page


def test_a_chinese_browser_gets_a_chinese_page_and_can_choose_english(browser, server):
    context, page = open_page(browser, server, "zh-CN")
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
    context, page = open_page(browser, server, "en-US")
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
