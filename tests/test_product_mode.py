"""Issue 14: the 'Product listing' mode: a title, selling points and a description, in English and Chinese."""

from __future__ import annotations

import pytest

from chat import ui
from chat.conversation import MODES, localized, mode_for
from chat.describe import MAX_FOLLOW_UPS, question_for
from chat.i18n import PAGE
from tests.test_ui import OWNER, Req, png, real_ctx


def test_the_prompt_asks_for_a_title_selling_points_and_a_description():
    m = MODES["product"]
    assert m.label == "Product listing" and mode_for("product") is m
    for heading in ("## Title", "## Selling points", "## Description"):
        assert heading in m.system_prompt
    assert "never invent" in m.system_prompt  # no made-up specifications or prices
    assert "title" in m.describe_prompt and "selling points" in m.describe_prompt
    assert 0 < len(m.follow_ups) <= MAX_FOLLOW_UPS


def test_it_speaks_chinese_on_a_chinese_page():
    zh = localized(MODES["product"], "zh-CN")
    assert zh.label == "商品文案" and zh.key == "product" and zh.temperature == MODES["product"].temperature
    for heading in ("## 标题", "## 卖点", "## 商品描述"):
        assert heading in zh.system_prompt
    assert "简体中文" in zh.system_prompt and zh.describe_prompt == "请为这件商品写一份商品文案：标题、卖点和商品描述。"
    assert len(zh.follow_ups) == len(MODES["product"].follow_ups)
    assert localized(MODES["product"], "en") is MODES["product"]
    # The page's label in both languages, and either language's follow-up button is understood.
    assert PAGE["en"]["mode.product"] == "Product listing" and PAGE["zh-CN"]["mode.product"] == "商品文案"
    assert question_for("product", zh.follow_ups[0][0]) == zh.follow_ups[0][1]
    assert question_for("product", "Shorter title") == MODES["product"].follow_ups[0][1]


@pytest.fixture
def ctx(tmp_path, loaded):
    yield from real_ctx(tmp_path, loaded)


def test_a_photo_in_product_mode_asks_for_a_listing(ctx, tmp_path):
    sent = []
    submit = ctx.engine.submit

    def watching(request, **kwargs):
        sent.append(request)
        return submit(request, **kwargs)

    ctx.engine.submit = watching
    updates = list(ui.send(ctx, None, {"text": "", "files": [png(tmp_path)]}, "product", 0.0, 0.9, 16, "", "auto",
                           Req()))
    conv_id = updates[0][0]
    system, question = sent[0].messages[0], sent[0].messages[-1]
    assert system == {"role": "system", "content": MODES["product"].system_prompt}
    assert question["content"][-1]["text"] == MODES["product"].describe_prompt
    assert ctx.store.get_conversation(OWNER, conv_id)["mode"] == "product"
