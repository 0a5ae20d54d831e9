"""Grounding (issue 14): Qwen3-VL's JSON boxes and points parsed, drawn on the image, shown on the page, in the API.

The tiny random model never answers with boxes, so the page and API tests put a vlchat in front of a fake
model server (`--engine-url`, tests/fake_upstream.py) whose answer holds them: "answer from <its name>".
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import time
from pathlib import Path
from urllib.parse import unquote

import httpx
import openai
import pytest
from PIL import Image

from chat import grounding
from chat.grounding import Mark, parse, summary
from chat.grounding_page import find_prompt, latest_image
from chat.render import chat_history
from chat.store import Store
from tests.fake_upstream import FakeUpstream
from tests.servers import Server, data_dir
from tests.test_a11y_speech import ANNOUNCED

BOXES = [{"bbox_2d": [250, 500, 750, 900], "label": "cat"}, {"bbox_2d": [10, 10, 200, 200], "label": "red car"},
         {"bbox_2d": [600, 10, 900, 200], "label": "red car"}]
ANSWER = "Here they are:\n```json\n" + json.dumps(BOXES) + "\n```\nThe cat sits in front."
BACKGROUND = (230, 230, 230)


def png(width: int, height: int, colour=BACKGROUND) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, "PNG")
    return out.getvalue()


# -- parsing ----------------------------------------------------------------------------------


def test_fenced_json_boxes_are_found_in_order():
    marks = parse(ANSWER)
    assert [m.label for m in marks] == ["cat", "red car", "red car"]
    assert marks[0].box == (250, 500, 750, 900) and marks[0].point is None
    assert summary(marks) == "Boxes: cat, red car (2)"


def test_bare_objects_several_blocks_and_points():
    text = ('The button {"bbox_2d": [100, 200, 300, 400], "label": "Save"} is left of\n'
            '```json\n[{"point_2d": [500, 250], "label": "close"}, {"point_2d": [10, 20]}]\n```\n'
            'and ```\n{"objects": [{"bbox_2d": [1, 2, 3, 4], "text_content": "OK"}]}\n```')
    marks = parse(text)
    assert [(m.label, m.box, m.point) for m in marks] == [
        ("Save", (100, 200, 300, 400), None), ("close", None, (500, 250)), ("", None, (10, 20)),
        ("OK", (1, 2, 3, 4), None)]
    assert summary(marks) == "Boxes: Save, OK. Points: close, unlabelled"


def test_coordinates_are_clamped_and_put_in_order():
    [mark] = parse('[{"bbox_2d": [900, 1200, -5, 300.5], "label": "x"}]')
    assert mark.box == (0, 300.5, 900, 1000)
    assert grounding.to_pixels(mark.box, 200, 100) == [0, 30, 180, 100]


def test_junk_is_ignored_and_complete_objects_of_a_cut_list_are_kept():
    text = ('no JSON here [1, 2] {"label": "no box"} {"bbox_2d": [1, 2, 3]} {"bbox_2d": "wide"} '
            '{"bbox_2d": [true, 1, 2, 3]} {"bbox_2d": [1, 2, 3, NaN]} {bbox_2d: [1, 2, 3, 4]} '
            '```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "kept"}, {"bbox_2d": [50, 60')
    marks = parse(text)
    assert [(m.label, m.box) for m in marks] == [("kept", (10, 20, 30, 40))]
    assert parse("") == [] and parse(None) == [] and parse("a plain answer about a bbox_2d") == []
    assert parse("[" * 5000 + '{"bbox_2d": [1, 2, 3, 4]}') == [Mark("", (1, 2, 3, 4))]


def test_numbers_in_strings_count_and_labels_are_short_single_lines():
    [mark] = parse('{"bbox_2d": ["10", " 20", "30", "40"], "label": "a\\n  long   ' + "x" * 200 + '"}')
    assert mark.box == (10, 20, 30, 40)
    assert "\n" not in mark.label and mark.label.startswith("a long x") and len(mark.label) == grounding.MAX_LABEL


# -- drawing ----------------------------------------------------------------------------------


def test_a_box_is_drawn_at_its_place_in_pixels_on_a_copy():
    image = Image.new("RGB", (400, 200), BACKGROUND)
    drawn = grounding.draw(image, [Mark("cat", (250, 500, 750, 900))])
    # 0-1000 of 400 x 200: x 100..300, y 100..180
    assert image.getpixel((100, 140)) == BACKGROUND  # the original is untouched
    colour = grounding.PALETTE[0]
    for edge in ((100, 140), (300, 140), (200, 100), (200, 180)):
        assert drawn.getpixel(edge) == colour, edge
    assert drawn.getpixel((99, 140)) == drawn.getpixel((102, 140)) == grounding.OUTLINE  # dark on both sides
    for outside in ((200, 140), (90, 140), (310, 140), (200, 190), (20, 20)):  # inside, and around it
        assert drawn.getpixel(outside) == BACKGROUND, outside
    # The label sits on a filled background just above the box's top left corner.
    assert drawn.getpixel((101, 95)) != BACKGROUND and drawn.getpixel((101, 60)) == BACKGROUND


def test_points_and_labels_get_their_colour_and_a_box_at_the_top_labels_inside():
    image = Image.new("RGB", (300, 300), (10, 10, 10))
    marks = [Mark("a", (0, 0, 500, 500)), Mark("b", None, (800, 800)), Mark("a", None, (100, 900))]
    drawn = grounding.draw(image, marks)
    assert drawn.getpixel((240, 240)) == grounding.PALETTE[1]  # the point's centre, in b's colour
    assert drawn.getpixel((30, 270)) == grounding.PALETTE[0]  # same label, same colour
    assert drawn.getpixel((5, 8)) != (10, 10, 10)  # no room above: the label is inside the box


def test_the_api_field_in_pixels_and_relative():
    marks = parse(ANSWER + ' {"point_2d": [500, 500], "label": "nose"}')
    field = grounding.api_field(marks, (400, 200))
    assert field[0] == {"label": "cat", "type": "box", "bbox_2d": [100, 100, 300, 180],
                        "bbox_2d_rel": [250, 500, 750, 900]}
    assert field[-1] == {"label": "nose", "type": "point", "point_2d": [200, 100], "point_2d_rel": [500, 500]}
    assert grounding.api_field(marks[:1], None)[0]["bbox_2d"] is None  # no image: relative only


# -- the page, at the function level ---------------------------------------------------------------


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store(tmp_path)
    yield s
    s.close()


def conversation(store: Store, *answers: tuple[str, str], sizes=((400, 200),)) -> tuple[str, list[str]]:
    shas = [store.put_image(png(w, h), mime="image/png", width=w, height=h) for w, h in sizes]
    conv = store.create_conversation("me")
    store.add_message("me", conv, role="user", text="Where?", image_ids=shas[:1])
    for n, (text, status) in enumerate(answers):
        if n and len(shas) > n:
            store.add_message("me", conv, role="user", text="And here?", image_ids=[shas[n]])
        elif n:
            store.add_message("me", conv, role="user", text="Again?")
        store.add_message("me", conv, role="assistant", text=text, status=status)
    return conv, shas


def drawn_path(message: dict) -> Path:
    """The file of the drawn image in an answer's HTML (its src: Gradio's file route)."""
    found = re.search(r'<img src="gradio_api/file=([^"]+)"', message["content"]["text"])
    assert found, message["content"]["text"]
    return Path(unquote(html.unescape(found.group(1))))


def test_an_answer_with_boxes_shows_the_drawn_image_under_it_with_the_labels(store):
    conv, [sha] = conversation(store, (ANSWER, "complete"))
    [_, answer] = chat_history(store, store.messages("me", conv))
    text = answer["content"]["text"]  # one message: the answer, then its figure
    assert text.index("The cat sits in front.") < text.index('<figure class="answer-note vl-grounding">')
    assert 'alt="Boxes: cat, red car (2)"' in text and ">Boxes: cat, red car (2)</p>" in text
    path = drawn_path(answer)
    assert path.is_relative_to(store.images_dir)  # served like the images themselves (app.py's allowed_paths)
    with Image.open(path) as drawn:
        assert drawn.size == (400, 200)
        assert drawn.getpixel((100, 140)) == grounding.PALETTE[0] and drawn.getpixel((200, 140)) == BACKGROUND
    # Drawn once: the next time the chat is drawn (a reload) the same file is shown, not drawn again.
    stamp = path.stat().st_mtime_ns
    again = chat_history(store, store.messages("me", conv))
    assert drawn_path(again[1]) == path and path.stat().st_mtime_ns == stamp


def test_no_figure_without_boxes_while_pending_or_without_an_image(store):
    conv, _ = conversation(store, ("A cat on a mat.", "complete"), (ANSWER, "pending"))
    history = chat_history(store, store.messages("me", conv))
    assert not any("vl-grounding" in m["content"]["text"] for m in history if m["role"] == "assistant")
    plain = store.create_conversation("me")
    store.add_message("me", plain, role="user", text="Where is it?")
    store.add_message("me", plain, role="assistant", text=ANSWER, status="complete")
    assert "vl-grounding" not in chat_history(store, store.messages("me", plain))[1]["content"]["text"]


def test_boxes_are_drawn_on_the_latest_image_before_the_answer(store):
    conv, shas = conversation(store, (ANSWER, "complete"), (ANSWER, "complete"), sizes=((400, 200), (120, 90)))
    history = chat_history(store, store.messages("me", conv))
    sizes = []
    for message in history:
        if message["role"] == "assistant":
            with Image.open(drawn_path(message)) as drawn:
                sizes.append(drawn.size)
    assert sizes == [(400, 200), (120, 90)]
    assert latest_image(store.messages("me", conv)) == shas[1]


def test_the_find_prompt_asks_for_qwens_json_boxes():
    prompt = find_prompt('the "Save" button')
    assert "bbox_2d" in prompt and "JSON" in prompt and "the 'Save' button" in prompt


# -- real servers: the API and the page -----------------------------------------------------------------


@pytest.fixture(scope="module")
def front(tmp_path_factory, model_dir):
    """A vlchat whose model server (a fake) answers 'answer from <boxes as JSON>'."""
    fake = FakeUpstream("\n```json\n" + json.dumps(BOXES) + "\n```\n").start()
    srv = Server(data_dir(tmp_path_factory, model_dir, "grounding-front"), "--engine-url", fake.base).start()
    yield srv
    srv.stop()
    fake.stop()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def ask(width: int = 400, height: int = 200) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png(width, height))}},
                                         {"type": "text", "text": "Where is the cat?"}]}]


def test_api_gives_the_parsed_boxes_only_when_asked(front):
    client = openai.OpenAI(base_url=front.base + "/v1", api_key="none", max_retries=0, timeout=60)
    asked = client.chat.completions.create(model="vlchat", messages=ask(), extra_body={"grounding": True})
    message = asked.choices[0].message
    assert "bbox_2d" in message.content
    assert message.model_extra["grounding"] == [
        {"label": "cat", "type": "box", "bbox_2d": [100, 100, 300, 180], "bbox_2d_rel": [250, 500, 750, 900]},
        {"label": "red car", "type": "box", "bbox_2d": [4, 2, 80, 40], "bbox_2d_rel": [10, 10, 200, 200]},
        {"label": "red car", "type": "box", "bbox_2d": [240, 2, 360, 40], "bbox_2d_rel": [600, 10, 900, 200]}]
    plain = client.chat.completions.create(model="vlchat", messages=ask())
    assert "grounding" not in plain.choices[0].message.model_extra
    assert "grounding" not in plain.choices[0].message.to_dict()
    # Streaming: the finish chunk carries them.
    chunks = list(client.chat.completions.create(model="vlchat", messages=ask(800, 100), stream=True,
                                                 extra_body={"grounding": True}))
    finals = [c.choices[0].delta.model_extra.get("grounding") for c in chunks if c.choices and
              c.choices[0].finish_reason]
    assert finals and finals[0][0]["bbox_2d"] == [200, 50, 600, 90]
    assert all("grounding" not in (c.choices[0].delta.model_extra or {}) for c in chunks
               if c.choices and not c.choices[0].finish_reason)


def test_api_refuses_a_grounding_flag_that_is_not_true_or_false(front):
    r = httpx.post(front.base + "/v1/chat/completions", timeout=30,
                   json={"model": "vlchat", "messages": ask(), "grounding": "yes"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "grounding"


def wait_answer_done(page, count: int, timeout: float = 30) -> None:
    """Until `count` answers are in the chat and the status line no longer says 'Answering'."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (page.locator("#chat .bot-row").count() >= count
                and "Answering" not in page.locator("#status").inner_text()):
            return
        time.sleep(0.2)
    raise AssertionError(f"no {count} finished answers: {page.locator('#chat').inner_text()[-500:]}")


def drawn_images(page):
    return page.locator("#chat .bot-row img[alt='Boxes: cat, red car (2)']")


def test_page_draws_the_boxes_finds_in_screenshot_mode_and_keeps_them_after_a_reload(front, browser, tmp_path):
    shot = tmp_path / "screen.png"
    shot.write_bytes(png(400, 200))
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.add_init_script(ANNOUNCED)  # what the page's live region says
    page = context.new_page()
    page.goto(front.base + "/")
    page.locator("#input textarea:not([disabled])").wait_for(timeout=60_000)
    assert not page.locator("#find").is_visible()  # general chat: no Find
    page.locator("#mode label", has_text="Screenshot troubleshooting").click()
    find = page.get_by_label("Find on the image")
    find.wait_for(timeout=10_000)
    # Nothing to look at yet: Find says so.
    find.fill("the cat")
    find.press("Enter")
    page.locator("#notice [role=alert]", has_text="send a screenshot first").wait_for(timeout=10_000)

    page.set_input_files("#input input[type=file]", str(shot))
    page.locator("#input .thumbnails img").first.wait_for(timeout=10_000)
    page.locator("#input textarea").fill("What is on this screen?")
    page.locator("#input textarea").press("Enter")
    wait_answer_done(page, 1)
    drawn_images(page).first.wait_for(timeout=20_000)  # under the answer, once it is finished
    assert page.locator("#chat .bot-row .vl-grounding").first.inner_text() == "Boxes: cat, red car (2)"
    assert drawn_images(page).first.evaluate("img => img.complete && img.naturalWidth") == 400
    # The figure is part of the answer: the announcer still says it is complete, and not the caption.
    page.wait_for_function("() => window.__announced.some(a => a.startsWith('Answer complete'))", timeout=10_000)
    assert not any("Boxes:" in line for line in page.evaluate("() => window.__announced"))

    # Find: the question in Qwen's grounding words, answered and drawn like any answer.
    find.fill("the cat")
    find.press("Enter")
    page.locator("#chat .user-row", has_text='Locate every "the cat"').wait_for(timeout=20_000)
    wait_answer_done(page, 2)
    page.wait_for_function("() => document.querySelectorAll(\"#chat .bot-row img[alt^='Boxes:']\").length >= 2",
                           timeout=20_000)
    assert find.input_value() == "the cat"  # what was named stays, to refine it

    page.reload()
    item = page.locator("#conversation-list label", has_text="What is on this screen?").first
    item.wait_for(timeout=20_000)
    item.click()
    page.wait_for_function("() => document.querySelectorAll(\"#chat .bot-row img[alt^='Boxes:']\").length >= 2",
                           timeout=20_000)
    assert drawn_images(page).count() == 2
    context.close()
