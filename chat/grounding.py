"""Grounding (issue 14): Qwen3-VL's JSON boxes and points found in an answer, and drawn on its image.

Asked where something is, Qwen3-VL answers with JSON, usually in a ```json fence:
`[{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}, {"point_2d": [x, y], "label": "door"}]`, with
coordinates relative to the original image on a 0-1000 scale (not pixels).

`parse` finds every such object anywhere in a text (fenced or bare, one or several blocks, nested in
other JSON). What is not valid JSON is skipped, not guessed at: a list cut short by the length limit
still gives the complete objects in it. Coordinates are clamped to 0-1000 and a box's corners put in
order (x1 <= x2, y1 <= y2). `draw` puts them on a copy of the image (Pillow), each label in its own
colour with a dark outline and a filled label background, so they read on light and dark pictures.
`summary` is the text alternative ("Boxes: cat, red car (2)"); `api_field` the API's parsed form.

No web framework and no store here: `chat.grounding_page` shows the drawn image in the page.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections import Counter
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from chat.i18n_text import say

SCALE = 1000  # Qwen3-VL's coordinates: 0..1000 of the image's width and height
MAX_SCAN_CHARS = 200_000  # an answer longer than this is only searched in its beginning
MAX_MARKS = 100
MAX_LABEL = 80
_KEYS = ("bbox_2d", "point_2d")
_LABEL_KEYS = ("label", "text_content", "text", "name", "category", "description")
_START = re.compile(r"[\[{]")
# Colours that stay apart from each other and from the black outline; text on them in black or white.
PALETTE = ((255, 59, 48), (0, 122, 255), (52, 199, 89), (255, 204, 0), (175, 82, 222), (255, 149, 0),
           (90, 200, 250), (255, 45, 85), (162, 132, 94), (0, 199, 190))
OUTLINE = (0, 0, 0)


@dataclass(frozen=True)
class Mark:
    """One box and/or point from an answer, relative 0-1000 of the image."""

    label: str
    box: tuple[float, float, float, float] | None = None
    point: tuple[float, float] | None = None

    def as_json(self) -> dict:
        """The mark as the model wrote it (relative, clamped, ordered)."""
        out: dict = {"label": self.label}
        if self.box is not None:
            out["bbox_2d"] = [_num(v) for v in self.box]
        if self.point is not None:
            out["point_2d"] = [_num(v) for v in self.point]
        return out


def _num(value: float) -> int | float:
    return int(value) if float(value).is_integer() else round(value, 2)


# -- parsing --------------------------------------------------------------------------------


def _coords(value, n: int) -> tuple[float, ...] | None:
    """`n` finite numbers (numbers in strings too), clamped to 0..SCALE; None when it is not that."""
    if not isinstance(value, (list, tuple)) or len(value) != n:
        return None
    out = []
    for v in value:
        if isinstance(v, bool):
            return None
        if isinstance(v, str):
            try:
                v = float(v.strip())
            except ValueError:
                return None
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            return None
        out.append(min(max(float(v), 0.0), float(SCALE)))
    return tuple(out)


def _label(obj: dict) -> str:
    for key in _LABEL_KEYS:
        value = obj.get(key)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            text = " ".join(str(value).split())
            if text:
                return text[:MAX_LABEL]
    return ""


def _mark(obj: dict) -> Mark | None:
    box = _coords(obj.get("bbox_2d"), 4)
    point = _coords(obj.get("point_2d"), 2)
    if box is not None:
        x1, y1, x2, y2 = box
        box = (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
    if box is None and point is None:
        return None
    return Mark(_label(obj), box, point)


def _walk(value) -> list[Mark]:
    """Every mark inside a decoded JSON value, in order (without recursion: any nesting depth is fine)."""
    out, todo = [], [value]
    while todo and len(out) < MAX_MARKS:
        item = todo.pop()
        if isinstance(item, dict):
            mark = _mark(item) if any(k in item for k in _KEYS) else None
            if mark is not None:
                out.append(mark)
            else:
                todo.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            todo.extend(reversed(item))
    return out


def parse(text: str | None) -> list[Mark]:
    """The boxes and points in an answer text (fenced or bare JSON, several blocks); [] when there are none."""
    if not text or not any(k in text for k in _KEYS):
        return []
    text = text[:MAX_SCAN_CHARS]
    decoder = json.JSONDecoder()
    marks: list[Mark] = []
    pos = 0
    while len(marks) < MAX_MARKS and (found := _START.search(text, pos)) is not None:
        start = found.start()
        try:
            value, end = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            pos = start + 1  # not JSON from here (or cut short): look inside it
            continue
        marks.extend(_walk(value))
        pos = end
    return marks[:MAX_MARKS]


# -- words ----------------------------------------------------------------------------------


def _listing(labels: list[str]) -> str:
    counts = Counter(label or say("unlabelled") for label in labels)
    return say(", ").join(name if n == 1 else f"{name} ({n})" for name, n in counts.items())


def summary(marks: list[Mark]) -> str:
    """What is drawn, for the image's text alternative: "Boxes: cat, red car (2). Points: door".

    In the language of the page being drawn (chat.i18n_text.say; issue 13): the caption and alt text are made
    whenever the chat is drawn, not stored.
    """
    boxes = [m.label for m in marks if m.box is not None]
    points = [m.label for m in marks if m.box is None and m.point is not None]
    parts = []
    if boxes:
        parts.append(say("Boxes: {labels}", labels=_listing(boxes)))
    if points:
        parts.append(say("Points: {labels}", labels=_listing(points)))
    return say(". ").join(parts)


# -- pixels ---------------------------------------------------------------------------------


def to_pixels(values: tuple[float, ...], width: int, height: int) -> list[int]:
    """Relative 0-1000 coordinates (x, y, x, y, ...) as whole pixels of a width x height image."""
    return [round(v * (width if i % 2 == 0 else height) / SCALE) for i, v in enumerate(values)]


def api_field(marks: list[Mark], size: tuple[int, int] | None) -> list[dict]:
    """The API's `message.grounding`: each mark with pixel coordinates (when the image size is known) and relative."""
    out = []
    for mark in marks:
        entry: dict = {"label": mark.label, "type": "box" if mark.box is not None else "point"}
        rel = mark.as_json()
        for key in _KEYS:
            if key in rel:
                entry[key] = to_pixels(getattr(mark, "box" if key == "bbox_2d" else "point"), *size) if size else None
                entry[f"{key}_rel"] = rel[key]
        out.append(entry)
    return out


def image_size(data: bytes) -> tuple[int, int] | None:
    """An encoded image's (width, height) from its header; None when it cannot be read."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:  # noqa: BLE001 - any undecodable image just has no size
        return None


def request_image_size(request) -> tuple[int, int] | None:
    """(width, height) of the newest image in an engine ChatRequest (what its answer's boxes are about), or None."""
    for message in reversed(getattr(request, "messages", None) or []):
        content = message.get("content") if message.get("role") == "user" else None
        for part in reversed(content if isinstance(content, list) else []):
            data = (getattr(request, "images", None) or {}).get(part.get("image_id")) if part.get("type") == "image" \
                else None
            if data:
                return image_size(data)
    return None


def for_api(text: str, size: tuple[int, int] | None) -> list[dict]:
    """`message.grounding` for an answer text: its boxes and points in pixels of an image of `size`, and relative."""
    return api_field(parse(text), size)


def _colour_of(labels: dict[str, int], label: str) -> tuple[int, int, int]:
    if label not in labels:
        labels[label] = len(labels)
    return PALETTE[labels[label] % len(PALETTE)]


def _ink(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white text, whichever reads better on `colour`."""
    r, g, b = colour
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def _tag(draw: ImageDraw.ImageDraw, font, text: str, x: int, y_top: int, y_inside: int, colour,
         size: tuple[int, int], pad: int) -> None:
    """A label on a filled background: above (x, y_top) when it fits, else just inside at y_inside."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    y = y_top - h if y_top - h >= 0 else y_inside
    x = min(max(x, 0), max(size[0] - w, 0))
    y = min(max(y, 0), max(size[1] - h, 0))
    draw.rectangle((x, y, x + w, y + h), fill=colour, outline=OUTLINE)
    draw.text((x + pad - left, y + pad - top), text, fill=_ink(colour), font=font)


def draw(image: Image.Image, marks: list[Mark]) -> Image.Image:
    """A copy of `image` (RGB) with the marks drawn on it: outlined boxes, points, labels on a background."""
    out = image.convert("RGB")  # always a new image
    w, h = out.size
    pen = ImageDraw.Draw(out)
    line = max(2, round(min(w, h) / 250))
    edge = max(1, line // 2)  # the dark outline on both sides of a box's colour
    font = ImageFont.load_default(size=min(max(14, round(min(w, h) / 28)), 48))
    pad = max(2, line)
    colours: dict[str, int] = {}
    for mark in marks:
        colour = _colour_of(colours, mark.label)
        if mark.box is not None:
            x1, y1, x2, y2 = to_pixels(mark.box, w, h)
            x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
            pen.rectangle((x1 - edge, y1 - edge, x2 + edge, y2 + edge), outline=OUTLINE, width=line + 2 * edge)
            pen.rectangle((x1, y1, x2, y2), outline=colour, width=line)
            if mark.label:
                _tag(pen, font, mark.label, x1 - edge, y1 - edge, y1 + line + edge, colour, (w, h), pad)
        if mark.point is not None:
            x, y = to_pixels(mark.point, w, h)
            r = 3 * line
            pen.ellipse((x - r - edge, y - r - edge, x + r + edge, y + r + edge), fill=OUTLINE)
            pen.ellipse((x - r, y - r, x + r, y + r), fill=colour, outline=(255, 255, 255), width=max(1, edge))
            if mark.label and mark.box is None:
                _tag(pen, font, mark.label, x + r + edge, y - r, y + r + edge, colour, (w, h), pad)
    return out
