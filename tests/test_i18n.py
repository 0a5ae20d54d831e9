"""Issue 13 (ux): the page speaks the person's language (English, Simplified Chinese)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from chat import i18n
from chat.conversation import MODES, localized
from tests.servers import Server, data_dir
from tests.test_a11y_axe import AXE_JS, assert_clean
from tests.test_e2e_browser import send, wait_idle


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
