"""Issue 13 (ux), in a real browser against a real server: per-answer details, send turns into Stop, Delete asks
first, no Share/Clear in the chat, the theme choice kept, and axe clean on all of it."""

from __future__ import annotations

import time

import pytest

from tests.servers import Server, data_dir
from tests.test_a11y_axe import AXE_JS, assert_clean
from tests.test_e2e_browser import open_settings, send, set_setting, wait_idle


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    srv = Server(data_dir(tmp_path_factory, model_dir, "ux-data")).start()
    yield srv
    srv.stop()


def open_page(browser, server, **context_options):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, **context_options)
    context.add_init_script(path=str(AXE_JS))
    page = context.new_page()
    page.goto(server.base + "/")
    page.locator("#input textarea").wait_for(timeout=60_000)
    page.wait_for_function("() => !document.querySelector('#input textarea').disabled", timeout=60_000)
    return context, page


@pytest.fixture
def page(browser, server):
    context, pg = open_page(browser, server)
    yield pg
    context.close()


def focused_id(page) -> str:
    return page.evaluate("() => document.activeElement && document.activeElement.id")


def test_each_answer_has_its_details_collapsed_and_reachable_by_keyboard(page):
    send(page, "How fast is this?")
    wait_idle(page)
    details = page.locator("#chat .bot-row .vl-stats").last
    details.wait_for()
    summary = details.locator("summary")
    assert summary.inner_text() == "Details"
    assert not details.locator("dl").is_visible()  # collapsed by default
    summary.focus()
    assert page.evaluate("() => document.activeElement.tagName") == "SUMMARY"  # a keyboard stop
    page.keyboard.press("Enter")
    dl = details.locator("dl")
    dl.wait_for(state="visible")
    text = dl.inner_text()
    for label in ("Tokens", "Time to first token", "Speed", "Cached prompt tokens", "Images encoded"):
        assert label in text, text
    assert "generated" in text and "tokens/s" in text
    # The live region said the answer, not its details.
    said = page.locator("#vl-announcer").inner_text()
    assert "Answer complete" in said and "Details" not in said and "generated" not in said, said
    assert_clean(page, "with an answer's details open")
    # Reloaded and reopened, the details are still there.
    page.reload()
    page.locator("#conversation-list label").first.click()
    page.locator("#chat .vl-stats").first.wait_for()


def test_send_turns_into_stop_while_an_answer_streams_and_stops_it(page):
    submit, stop = page.locator("#input .submit-button"), page.locator("#input .stop-button")
    assert submit.is_visible() and not stop.is_visible()
    open_settings(page)
    set_setting(page, "max-new-tokens", "4096")
    send(page, "Talk for a long time.")
    stop.wait_for(state="visible", timeout=20_000)
    assert not submit.is_visible()
    assert page.locator("#input textarea").is_editable()  # the box stays usable while it streams
    stop.click()
    page.locator("#chat .bot-row").last.get_by_text("Stopped.").wait_for(timeout=20_000)
    submit.wait_for(state="visible")
    assert not stop.is_visible()
    assert page.locator("#stop").is_visible()  # the page's own Stop button (keys.js, tests) stays


def conversations(page) -> list[str]:
    return page.locator("#conversation-list label").all_inner_texts()


def test_delete_asks_first_cancel_keeps_confirm_deletes_and_works_by_keyboard(page):
    send(page, "Keep or delete me")
    wait_idle(page)
    page.wait_for_function("() => document.querySelectorAll('#conversation-list label').length === 1")
    confirm = page.locator("#delete-confirm")
    # The mouse: Delete asks; Cancel keeps it and gives the focus back to Delete.
    page.locator("#delete").click()
    confirm.wait_for(state="visible")
    assert "Delete “Keep or delete me”?" in page.locator("#delete-confirm-text").inner_text()
    assert confirm.get_attribute("role") == "alertdialog"
    page.wait_for_function("() => document.activeElement && document.activeElement.id === 'delete-confirm-no'")
    assert_clean(page, "with Delete's confirmation open")
    page.locator("#delete-confirm-no").click()
    confirm.wait_for(state="hidden")
    page.wait_for_function("() => document.activeElement && document.activeElement.id === 'delete'")
    assert conversations(page) == ["Keep or delete me"]
    # The keyboard: Enter on Delete asks, Escape cancels.
    page.keyboard.press("Enter")
    confirm.wait_for(state="visible")
    page.wait_for_function("() => document.activeElement && document.activeElement.id === 'delete-confirm-no'")
    page.keyboard.press("Escape")
    confirm.wait_for(state="hidden")
    page.wait_for_function("() => document.activeElement && document.activeElement.id === 'delete'")
    assert conversations(page) == ["Keep or delete me"]
    # Enter, Shift+Tab to the confirming Delete, Enter: it is gone and the focus is in the message box.
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.activeElement && document.activeElement.id === 'delete-confirm-no'")
    page.keyboard.press("Shift+Tab")
    assert focused_id(page) == "delete-confirm-yes"
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelectorAll('#conversation-list label').length === 0")
    confirm.wait_for(state="hidden")
    page.wait_for_function("() => document.activeElement && document.activeElement.matches('#input textarea')")
    assert page.locator("#chat .bot-row").count() == 0
    page.reload()
    page.locator("#input textarea").wait_for()
    time.sleep(1)
    assert conversations(page) == []


def test_the_chat_has_no_share_or_clear_button(page):
    send(page, "hello")
    wait_idle(page)
    names = page.evaluate("""() => Array.from(document.querySelectorAll('#chat button'))
        .filter(b => b.getClientRects().length).map(b => b.getAttribute('aria-label') || b.textContent.trim())""")
    assert "Share" not in names and "Clear" not in names, names
    assert "Copy message" in names


def test_the_theme_choice_is_kept_across_reloads(browser, server):
    context, page = open_page(browser, server, color_scheme="light")
    try:
        dark = "() => document.body.classList.contains('dark')"
        select = page.locator("#vl-display #vl-theme")
        select.wait_for()
        assert select.input_value() == "system" and not page.evaluate(dark)
        assert page.locator("label[for=vl-theme]").inner_text() == "Theme"
        select.select_option("dark")
        page.wait_for_function(dark)
        page.reload()
        page.locator("#vl-theme").wait_for()
        page.wait_for_function(dark)
        assert page.locator("#vl-theme").input_value() == "dark"
        time.sleep(1)  # Gradio applies its own theme when it mounts: the choice stays
        assert page.evaluate(dark)
        assert_clean(page, "in the dark theme chosen on the page")
        # Light wins over a dark system setting; System follows it again.
        page.emulate_media(color_scheme="dark")
        page.locator("#vl-theme").select_option("light")
        page.wait_for_function(f"() => !({dark})()")
        page.reload()
        page.locator("#vl-theme").wait_for()
        time.sleep(1)
        assert not page.evaluate(dark)
        page.locator("#vl-theme").select_option("system")
        page.wait_for_function(dark)
    finally:
        context.close()


def test_a_reopened_conversation_brings_back_its_settings(page):
    open_settings(page)
    set_setting(page, "temperature", "1.35")
    set_setting(page, "max-new-tokens", "64")
    page.locator("#detail label").filter(has_text="High").click()
    send(page, "Remember my settings")
    wait_idle(page)
    page.locator("#new-chat").click()
    page.locator("#mode label").filter(has_text="Scene description").click()  # loads that mode's defaults
    page.wait_for_function("() => document.querySelector('#temperature input[type=number]').value === '0.3'")
    page.locator("#detail label").filter(has_text="Low").click()
    page.locator("#conversation-list label").filter(has_text="Remember my settings").click()
    page.wait_for_function("() => document.querySelector('#temperature input[type=number]').value === '1.35'")
    assert page.locator("#max-new-tokens input[type=number]").input_value() == "64"
    assert page.locator("#detail input[value=high]").is_checked()
    assert page.locator("#mode input[value=general]").is_checked()
