"""Issue 13: export (ZIP of Markdown + images, JSON) and import of a conversation, and sidebar search.

Handlers over a real Store (no model needed): an export imported again is the same conversation,
every version included; a hostile file (huge, deep, a bad image, unknown fields such as an owner,
broken parents) is refused with a clear notice and stores nothing.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from chat import history_io, search, ui
from chat.config import Settings
from chat.notices import Notice
from chat.store import Store
from tests.test_ui import OTHER, OWNER, Req

OTHER_OWNER = "browser:" + OTHER


def png_bytes(size=(64, 48), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def ctx(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    store = Store(tmp_path / "data")
    settings = Settings(data_dir=tmp_path / "data", max_images_per_message=2, max_images_per_conversation=3)
    yield ui.Ctx(store=store, engine=SimpleNamespace(ready=threading.Event()), settings=settings)
    store.close()


def clean_png(ctx, colour=(200, 30, 30)) -> str:
    from chat.images import sanitize

    image = sanitize(png_bytes(colour=colour))
    return ctx.store.put_image(image.data, mime=image.mime, width=image.width, height=image.height)


def sample(ctx, owner=OWNER) -> str:
    """A conversation with an image, two turns, a regenerated answer and an edited question."""
    s = ctx.store
    sha = clean_png(ctx)
    conv = s.create_conversation(owner, title="Red square", mode="scene", settings={"temperature": 0.3})
    q1 = s.add_message(owner, conv, role="user", text="What is *this*?", image_ids=[sha], image_names=["red.png"],
                       mode="scene", settings={"detail": "high", "temperature": 0.3})
    s.add_message(owner, conv, role="assistant", text="A red square.", usage={"prompt_tokens": 300})
    s.add_message(owner, conv, role="assistant", text="Red.", parent_id=q1, status="stopped")
    s.add_message(owner, conv, role="user", text="Sure?")
    s.add_message(owner, conv, role="assistant", text="Yes.")
    s.add_message(owner, conv, role="user", text="Which colour?", image_ids=[sha], image_names=["red.png"],
                  parent_id=None)
    s.add_message(owner, conv, role="assistant", text="Red, again.")
    s.switch_version(owner, conv, s.messages(owner, conv)[0]["id"], -1)  # the first question's branch on screen
    return conv


def comparable(store, owner, conv):
    rows, leaf = store.message_tree(owner, conv)
    index = {r["id"]: n for n, r in enumerate(rows)}
    keep = ("role", "text", "status", "mode", "settings", "usage", "image_names")
    return ([{**{k: r[k] for k in keep}, "parent": index.get(r["parent_id"]),
              "images": [store.image_bytes(sha) for sha in r["image_ids"]]} for r in rows], index[leaf],
            [r["text"] for r in store.messages(owner, conv)])


def export_files(ctx, conv, req=None) -> tuple[Path, Path]:
    zip_update, json_update, line = history_io.export(ctx, conv, req or Req())
    assert zip_update["visible"] and "Ready" in line
    return Path(zip_update["value"]), Path(json_update["value"])


def test_export_then_import_is_the_same_conversation(ctx, tmp_path):
    conv = sample(ctx)
    zip_path, json_path = export_files(ctx, conv)
    assert zip_path.parent == json_path.parent and len(zip_path.parent.name) == 32  # 128 random bits
    with zipfile.ZipFile(zip_path) as z:
        md = z.read("conversation.md").decode()
        names = z.namelist()
    sha = ctx.store.messages(OWNER, conv)[0]["image_ids"][0]
    assert names == ["conversation.md", f"images/{sha}.png"]
    assert md.startswith("# Red square\n") and "![red.png](images/" in md and "What is *this*?" in md
    assert "Sure?" in md and "Which colour?" not in md  # the path on screen
    data = json.loads(json_path.read_text())
    assert data["format"] == "vlchat.conversation" and len(data["messages"]) == 7 and "owner" not in data

    upload = tmp_path / "upload.json"
    upload.write_bytes(json_path.read_bytes())
    other = Req(browser=OTHER)  # another browser imports it: a new conversation of its own
    out = history_io.import_conversation(ctx, str(upload), other)
    new = out[0]
    assert new != conv and not upload.exists()  # the uploaded copy is not kept
    assert out[2] == "Red square" and out[3] == "scene" and out[4]["value"] == new
    assert "Imported" in out[5]
    assert comparable(ctx.store, OTHER_OWNER, new) == comparable(ctx.store, OWNER, conv)
    assert ctx.store.get_conversation(OTHER_OWNER, new)["settings"] == {"temperature": 0.3}
    assert [c["id"] for c in ctx.store.list_conversations(OWNER)] == [conv]  # the exporter's list is unchanged


def test_export_is_the_owners_only(ctx):
    conv = sample(ctx)
    with pytest.raises(Notice, match="no longer exists"):
        history_io.export(ctx, conv, Req(browser=OTHER))
    with pytest.raises(Notice, match="Open or start"):
        history_io.export(ctx, None, Req())


def hostile_files(ctx, conv) -> dict[str, tuple[bytes, str]]:
    _, json_path = export_files(ctx, conv)
    good = json.loads(json_path.read_text())

    def variant(change) -> bytes:
        data = json.loads(json.dumps(good))
        change(data)
        return json.dumps(data).encode()

    bad_png = png_bytes()[:40] + b"\0" * 200  # a PNG signature, then garbage
    return {
        "huge": (b'{"format": "vlchat.conversation", "pad": "' + b"x" * history_io.IMPORT_MAX_BYTES + b'"}',
                 "the limit is 16 MB"),
        "deep": (b'{"format": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nests deeper"),
        "not json": (b"{ this is not json", "not valid JSON"),
        "not an export": (b'{"hello": 1}', "not a vlchat conversation export"),
        "bad image": (variant(lambda d: d["images"][0].update(data=base64.b64encode(bad_png).decode())),
                      "image 1: "),
        "owner field": (variant(lambda d: d.update(owner=OWNER, id=conv)), "fields an export does not have (owner)"),
        "message owner": (variant(lambda d: d["messages"][0].update(owner=OWNER)), "fields an export does not have"),
        "bad parent": (variant(lambda d: d["messages"][0].update(parent=5)), "parent is not an earlier message"),
        "missing image": (variant(lambda d: d["messages"][0].update(image_ids=["0" * 64])),
                          "names an image the file does not hold"),
        "too many images": (variant(lambda d: d["messages"][0].update(image_ids=[d["images"][0]["sha256"]] * 3)),
                            "a message may carry 2"),
        "long text": (variant(lambda d: d["messages"][1].update(text="x" * 200_001)), "the limit is"),
        "bad role": (variant(lambda d: d["messages"][1].update(role="tool")), "no valid role"),
        "nested settings": (variant(lambda d: d["messages"][0].update(settings={"a": {"b": 1}})),
                            "not a plain value"),
    }


def test_hostile_imports_are_refused_and_store_nothing(ctx, tmp_path):
    conv = sample(ctx)
    before = (ctx.store.db.table("conversations").count, ctx.store.db.table("messages").count,
              ctx.store.db.table("images").count)
    for name, (raw, expected) in hostile_files(ctx, conv).items():
        upload = tmp_path / "hostile.json"
        upload.write_bytes(raw)
        with pytest.raises(Notice, match="cannot be imported") as refused:
            history_io.import_conversation(ctx, str(upload), Req(browser=OTHER))
        assert expected in refused.value.message, (name, refused.value.message)
        assert "Nothing was imported" in refused.value.message
        after = (ctx.store.db.table("conversations").count, ctx.store.db.table("messages").count,
                 ctx.store.db.table("images").count)
        assert after == before, name
        assert not upload.exists()
    assert ctx.store.list_conversations(OTHER_OWNER) == []


def test_an_imported_id_never_reaches_another_owners_conversation(ctx, tmp_path):
    conv = sample(ctx)  # mine
    _, json_path = export_files(ctx, conv)
    data = json.loads(json_path.read_text())
    data["id"] = conv
    data["title"] = "Overwritten?"
    upload = tmp_path / "x.json"
    upload.write_text(json.dumps(data))
    new = history_io.import_conversation(ctx, str(upload), Req(browser=OTHER))[0]
    assert new != conv
    assert ctx.store.get_conversation(OWNER, conv)["title"] == "Red square"
    assert ctx.store.get_conversation(OTHER_OWNER, new)["title"] == "Overwritten?"
    # A title is shown as typed in the status line (Markdown there), never as markup or a link.
    data["title"] = "[click](https://evil.test) <img src=x>"
    upload.write_text(json.dumps(data))
    line = history_io.import_conversation(ctx, str(upload), Req(browser=OTHER))[5]
    assert "](" not in line and "<img" not in line and "\\[click\\]" in line


def test_nesting_depth_skips_strings():
    assert history_io.nesting_depth('{"a": "[[[[{{{{\\"[["}') == 1
    assert history_io.nesting_depth("[" * 100) == history_io.MAX_DEPTH + 1  # stops counting early


# -- search -----------------------------------------------------------------------------------


def test_search_titles_and_text_of_the_owner_only(ctx):
    s = ctx.store
    a = s.create_conversation(OWNER, title="Kitchen sink")
    s.add_message(OWNER, a, role="user", text="Why is the tap dripping?")
    b = s.create_conversation(OWNER, title="Holiday")
    s.add_message(OWNER, b, role="user", text="What does 100% mean on this_sign?")
    c = s.create_conversation(OTHER_OWNER, title="Tap secrets")
    s.add_message(OTHER_OWNER, c, role="user", text="tap tap")

    def found(query, req=None):
        update, line = search.search(ctx, query, None, req or Req())
        return [cid for _, cid in update["choices"]], line

    assert found("TAP") == ([a], "1 conversation matches.")
    assert found("holiday") == ([b], "1 conversation matches.")
    assert found("100%") == ([b], "1 conversation matches.")
    assert found("%") == ([b], "1 conversation matches.")  # a literal %, not a wildcard
    assert found("ap_dr") == ([], "No conversations match.")  # _ is literal too ("tap dripping")
    assert found("this_sign") == ([b], "1 conversation matches.")
    assert found("secrets") == ([], "No conversations match.")  # another owner's title
    assert found("  ") == ([b, a], "")  # empty: the whole list
    assert found("tap", Req(browser=OTHER)) == ([c], "1 conversation matches.")
    # Older versions count too: an edited-away question is still found.
    q = s.messages(OWNER, a)[0]["id"]
    s.add_message(OWNER, a, role="user", text="Sink is blocked", parent_id=None)
    assert found("dripping")[0] == [a]
    assert s.messages(OWNER, a)[0]["id"] != q
    # The open conversation stays selected when it matches.
    update, _ = search.search(ctx, "sink", a, Req())
    assert update["value"] == a


def test_old_export_folders_are_cleared_at_the_next_export(ctx):
    import os

    conv = sample(ctx)
    first, _ = export_files(ctx, conv)
    assert oct(first.parent.stat().st_mode & 0o777) == "0o700"
    old = first.parent.stat().st_mtime - history_io.EXPORT_KEEP_SECONDS - 5
    os.utime(first.parent, (old, old))
    second, _ = export_files(ctx, conv)
    assert not first.parent.exists() and second.exists()
