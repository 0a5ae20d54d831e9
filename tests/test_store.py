"""Tests for chat/store.py: migrations, images, ownership, ordering, recovery, threads."""

import hashlib
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import pytest

from chat.store import NotFound, Store

PNG = b"\x89PNG\r\n\x1a\n" + b"fake png payload"
JPEG = b"\xff\xd8\xff" + b"fake jpeg payload"


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path)
    yield s
    s.close()


def image_files(data_dir):
    return sorted(p for p in (data_dir / "images").rglob("*") if p.is_file())


def test_migrations_on_blank_database(tmp_path):
    store = Store(tmp_path / "data")
    assert store.applied_migrations() == ["m001_initial", "m002_image_names", "m003_versions"]
    assert set(store.db.table_names()) >= {"_migrations", "conversations", "messages", "images"}
    assert (tmp_path / "data" / "images").is_dir()
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    unique = {tuple(i.columns): i.unique for i in store.db.table("messages").indexes}
    assert unique[("conversation_id", "seq")] == 1
    store.close()


def test_reopen_applies_nothing_and_keeps_data(tmp_path):
    store = Store(tmp_path)
    conv = store.create_conversation("alice", title="kept")
    store.add_message("alice", conv, role="user", text="hello")
    store.close()

    again = Store(tmp_path)
    rows = list(again.db.query("SELECT name FROM _migrations"))
    assert [r["name"] for r in rows] == ["m001_initial", "m002_image_names", "m003_versions"]
    assert again.applied_migrations() == ["m001_initial", "m002_image_names", "m003_versions"]
    assert again.get_conversation("alice", conv)["title"] == "kept"
    assert [m["text"] for m in again.messages("alice", conv)] == ["hello"]
    again.close()


def test_round_trip_with_two_images(store):
    a = store.put_image(PNG, mime="image/png", width=10, height=20)
    b = store.put_image(JPEG, mime="image/jpeg", width=30, height=40)
    conv = store.create_conversation("alice", title="  Two   cats ", mode="describe",
                                     settings={"temperature": 0.2})
    store.add_message("alice", conv, role="system", text="be brief")
    store.add_message("alice", conv, role="user", text="compare", image_ids=[b, a],
                      mode="describe", settings={"max_tokens": 64})
    reply = store.add_message("alice", conv, role="assistant", text="", status="pending")
    store.add_message("alice", conv, role="user", text="again", image_ids=[a])
    store.update_message(reply, text="one is a cat", status="complete",
                         usage={"prompt_tokens": 900, "completion_tokens": 4})

    got = store.get_conversation("alice", conv)
    assert got["title"] == "Two cats" and got["mode"] == "describe"
    assert got["settings"] == {"temperature": 0.2}
    assert set(got) == {"id", "title", "mode", "settings", "created", "updated"}
    msgs = store.messages("alice", conv)
    assert [m["seq"] for m in msgs] == [0, 1, 2, 3]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[1]["image_ids"] == [b, a]  # order as sent, not sorted
    assert msgs[3]["image_ids"] == [a] and msgs[0]["image_ids"] == []
    assert msgs[1]["settings"] == {"max_tokens": 64} and msgs[1]["mode"] == "describe"
    assert msgs[0]["settings"] is None and msgs[0]["usage"] is None
    assert msgs[2]["id"] == reply
    assert msgs[2]["status"] == "complete" and msgs[2]["text"] == "one is a cat"
    assert msgs[2]["usage"] == {"prompt_tokens": 900, "completion_tokens": 4}
    assert set(msgs[0]) == {"id", "seq", "parent_id", "role", "text", "image_ids", "image_names", "status",
                            "mode", "settings", "usage", "created", "version", "versions"}
    assert store.image_bytes(b) == JPEG
    assert store.image_path(b).name == f"{b}.jpg"
    assert store.image_row(a)["width"] == 10 and store.image_row(a)["height"] == 20


def test_update_conversation_mode_and_settings(store):
    conv = store.create_conversation("alice", settings={"a": 1})
    store.update_conversation("alice", conv, mode="ocr")
    assert store.get_conversation("alice", conv)["settings"] == {"a": 1}
    store.update_conversation("alice", conv, settings={"b": [1, 2]})
    got = store.get_conversation("alice", conv)
    assert got["mode"] == "ocr" and got["settings"] == {"b": [1, 2]}


def test_put_image_dedup(store, tmp_path):
    sha = store.put_image(PNG, mime="image/png", width=1, height=1)
    again = store.put_image(PNG, mime="image/png", width=1, height=1)
    assert sha == again == hashlib.sha256(PNG).hexdigest()
    assert store.db.table("images").count == 1
    assert image_files(tmp_path) == [tmp_path / "images" / sha[:2] / f"{sha}.png"]
    assert image_files(tmp_path)[0].read_bytes() == PNG
    row = store.image_row(sha)
    assert row["bytes"] == len(PNG) and row["path"] == f"images/{sha[:2]}/{sha}.png"
    assert store.has_image(sha)
    assert not store.has_image(hashlib.sha256(b"other").hexdigest())


def test_put_image_rejects_unknown_mime(store, tmp_path):
    with pytest.raises(ValueError):
        store.put_image(PNG, mime="image/svg+xml", width=1, height=1)
    assert store.db.table("images").count == 0
    assert image_files(tmp_path) == []


def test_other_owner_sees_nothing(store):
    conv = store.create_conversation("alice", title="secret")
    mid = store.add_message("alice", conv, role="user", text="hi")

    assert store.list_conversations("mallory") == []
    with pytest.raises(NotFound):
        store.get_conversation("mallory", conv)
    with pytest.raises(NotFound):
        store.rename_conversation("mallory", conv, "pwned")
    with pytest.raises(NotFound):
        store.update_conversation("mallory", conv, mode="x")
    with pytest.raises(NotFound):
        store.add_message("mallory", conv, role="user", text="injected")
    with pytest.raises(NotFound):
        store.messages("mallory", conv)
    with pytest.raises(NotFound):
        store.delete_message("mallory", mid)
    with pytest.raises(NotFound):
        store.delete_conversation("mallory", conv)

    got = store.get_conversation("alice", conv)  # nothing changed for the real owner
    assert got["title"] == "secret" and got["mode"] == "general"
    assert [m["text"] for m in store.messages("alice", conv)] == ["hi"]
    assert [c["id"] for c in store.list_conversations("alice")] == [conv]


def test_newest_first_after_bump(store):
    old = store.create_conversation("alice", title="old")
    new = store.create_conversation("alice", title="new")
    assert [c["id"] for c in store.list_conversations("alice")] == [new, old]
    before = store.get_conversation("alice", old)["updated"]
    store.add_message("alice", old, role="user", text="bump")
    listed = store.list_conversations("alice")
    assert [c["id"] for c in listed] == [old, new]
    assert listed[0]["updated"] > before
    assert set(listed[0]) == {"id", "title", "mode", "created", "updated"}


def test_rename_rules(store):
    conv = store.create_conversation("alice")
    store.rename_conversation("alice", conv, "  a\n\tb  " + "x" * 300)
    title = store.get_conversation("alice", conv)["title"]
    assert title.startswith("a b x") and len(title) == 120
    with pytest.raises(ValueError):
        store.rename_conversation("alice", conv, " \n ")
    assert store.get_conversation("alice", conv)["title"] == title


def test_bad_role_status_and_missing_image(store):
    conv = store.create_conversation("alice")
    with pytest.raises(ValueError):
        store.add_message("alice", conv, role="tool", text="x")
    with pytest.raises(ValueError):
        store.add_message("alice", conv, role="user", text="x", status="done")
    with pytest.raises(NotFound):
        store.add_message("alice", conv, role="user", text="x",
                          image_ids=[hashlib.sha256(b"never stored").hexdigest()])
    mid = store.add_message("alice", conv, role="user", text="ok")
    with pytest.raises(ValueError):
        store.update_message(mid, status="finished")
    assert [(m["text"], m["status"]) for m in store.messages("alice", conv)] == [("ok", "complete")]


def test_recover_interrupted(store, tmp_path):
    conv = store.create_conversation("alice")
    store.add_message("alice", conv, role="user", text="q")
    store.add_message("alice", conv, role="assistant", text="half an ans", status="pending")
    store.close()

    reopened = Store(tmp_path)  # as after a kill -9 mid-stream
    assert reopened.recover_interrupted() == 1
    msgs = reopened.messages("alice", conv)
    assert [m["status"] for m in msgs] == ["complete", "interrupted"]
    assert msgs[1]["text"] == "half an ans"
    assert reopened.recover_interrupted() == 0
    reopened.close()


def test_delete_conversation_removes_messages_keeps_images(store):
    sha = store.put_image(PNG, mime="image/png", width=1, height=1)
    conv = store.create_conversation("alice")
    keep = store.create_conversation("alice")
    store.add_message("alice", conv, role="user", text="a", image_ids=[sha])
    store.add_message("alice", keep, role="user", text="b")
    store.delete_conversation("alice", conv)
    with pytest.raises(NotFound):
        store.messages("alice", conv)
    count = store.db.execute("SELECT count(*) FROM messages WHERE conversation_id = ?",
                             [conv]).fetchone()[0]
    assert count == 0
    assert [c["id"] for c in store.list_conversations("alice")] == [keep]
    assert [m["text"] for m in store.messages("alice", keep)] == ["b"]
    assert store.image_bytes(sha) == PNG


def test_delete_message_and_ids_not_reused(store):
    conv = store.create_conversation("alice")
    first = store.add_message("alice", conv, role="user", text="a")
    last = store.add_message("alice", conv, role="assistant", text="b", status="pending")
    store.delete_message("alice", last)
    assert [m["id"] for m in store.messages("alice", conv)] == [first]
    newer = store.add_message("alice", conv, role="user", text="c")
    assert newer > last  # so a late finish callback for `last` cannot land on `newer`
    with pytest.raises(NotFound):
        store.update_message(last, status="complete")
    with pytest.raises(NotFound):
        store.delete_message("alice", last)
    assert [m["text"] for m in store.messages("alice", conv)] == ["a", "c"]


@pytest.mark.parametrize("bad", ["../x", "../" + "a" * 61, "A" * 64, "a" * 63,
                                 "a" * 64 + "\n", "", None, "/etc/passwd"])
def test_invalid_sha_is_not_found(store, bad):
    with pytest.raises(NotFound):
        store.image_row(bad)
    with pytest.raises(NotFound):
        store.image_path(bad)
    with pytest.raises(NotFound):
        store.image_bytes(bad)
    assert not store.has_image(bad)
    conv = store.create_conversation("alice")
    with pytest.raises(NotFound):
        store.add_message("alice", conv, role="user", text="x", image_ids=[bad])


def test_concurrent_writers(store):
    conv = store.create_conversation("alice")

    def writer(n: int) -> None:
        for i in range(50):
            store.add_message("alice", conv, role="user", text=f"{n}-{i}")

    with ThreadPoolExecutor(max_workers=4) as pool:
        for future in [pool.submit(writer, n) for n in range(4)]:
            future.result()  # re-raises anything a writer hit

    msgs = store.messages("alice", conv)
    assert [m["seq"] for m in msgs] == list(range(200))
    assert len({m["id"] for m in msgs}) == 200
    for n in range(4):  # each thread's own messages keep its order
        mine = [m["text"] for m in msgs if m["text"].startswith(f"{n}-")]
        assert mine == [f"{n}-{i}" for i in range(50)]


def test_writes_are_committed_for_other_connections(store, tmp_path):
    conv = store.create_conversation("alice", title="durable")
    store.add_message("alice", conv, role="user", text="seen")
    other = sqlite3.connect(tmp_path / "vlchat.db")
    try:
        title = other.execute("SELECT title FROM conversations WHERE id = ?", [conv]).fetchone()
        texts = other.execute("SELECT text FROM messages").fetchall()
    finally:
        other.close()
    assert title == ("durable",) and texts == [("seen",)]


def test_tampered_rows_never_reach_outside_images(store):
    evil = {"bytes": 1, "width": 1, "height": 1, "mime": "image/png",
            "path": "../../etc/passwd", "created": "x"}
    store.db.table("images").insert({"sha256": "../../etc/passwd", **evil})
    with pytest.raises(NotFound):
        store.image_path("../../etc/passwd")
    sha = "ab" * 32  # a well-formed sha whose stored path column was tampered with
    store.db.table("images").insert({"sha256": sha, **evil})
    assert store.image_path(sha) == store.images_dir / "ab" / f"{sha}.png"


def test_delete_unused_images_keeps_referenced_ones(store, tmp_path):
    used = store.put_image(PNG, mime="image/png", width=10, height=20)
    unused = store.put_image(JPEG, mime="image/jpeg", width=30, height=40)
    conv = store.create_conversation("alice", title="t")
    store.add_message("alice", conv, role="user", text="q", image_ids=[used])
    assert store.delete_unused_images([used, unused, unused, "not-a-sha"]) == [unused]
    assert store.has_image(used) and not store.has_image(unused)
    assert image_files(tmp_path) == [store.image_path(used)]
    # Once its message is gone, the other one can go too; a second call finds nothing more.
    store.delete_conversation("alice", conv)
    assert store.delete_unused_images([used]) == [used]
    assert image_files(tmp_path) == [] and store.delete_unused_images([used]) == []


def test_image_names_kept_and_old_databases_upgraded(tmp_path):
    """Each attached image's file name is kept beside its id (for its text alternative); a database made
    before the column existed gets it on opening, its old rows reading as no names."""
    data = tmp_path / "old"
    data.mkdir()
    db = sqlite3.connect(data / "vlchat.db")
    db.executescript("""
        CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at TEXT);
        INSERT INTO _migrations VALUES ('m001_initial', '2026-01-01');
        CREATE TABLE conversations (id TEXT PRIMARY KEY, owner TEXT NOT NULL, title TEXT NOT NULL,
            mode TEXT NOT NULL, settings TEXT NOT NULL, created TEXT NOT NULL, updated TEXT NOT NULL);
        CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT NOT NULL,
            seq INTEGER NOT NULL, role TEXT NOT NULL, text TEXT NOT NULL, image_ids TEXT NOT NULL,
            status TEXT NOT NULL, mode TEXT, settings TEXT, usage TEXT, created TEXT NOT NULL);
        CREATE TABLE images (sha256 TEXT PRIMARY KEY, bytes INTEGER NOT NULL, width INTEGER NOT NULL,
            height INTEGER NOT NULL, mime TEXT NOT NULL, path TEXT NOT NULL, created TEXT NOT NULL);
        INSERT INTO conversations VALUES ('c1', 'alice', 'old', 'general', '{}', '2026-01-01', '2026-01-01');
        INSERT INTO messages (conversation_id, seq, role, text, image_ids, status, created)
            VALUES ('c1', 0, 'user', 'before', '[]', 'complete', '2026-01-01');
    """)
    db.commit()
    db.close()
    store = Store(data)
    assert store.applied_migrations()[-1] == "m003_versions"
    assert store.messages("alice", "c1")[0]["image_names"] is None
    sha = store.put_image(PNG, mime="image/png", width=10, height=20)
    store.add_message("alice", "c1", role="user", text="now", image_ids=[sha], image_names=["street.png"])
    assert store.messages("alice", "c1")[-1]["image_names"] == ["street.png"]
    store.close()


def test_image_names_are_shown_as_text(store):
    from chat.render import chat_history

    sha = store.put_image(PNG, mime="image/png", width=10, height=20)
    conv = store.create_conversation("alice", title="t")
    store.add_message("alice", conv, role="user", text="what is it?", image_ids=[sha],
                      image_names=["<img src=x onerror=alert(1)>.png"])
    user = chat_history(store, store.messages("alice", conv))[0]
    text = [part for part in user["content"] if part["type"] == "text"][0]["text"]
    assert '<span class="vl-file">&lt;img src=x onerror=alert(1)&gt;.png</span>' in text
    assert "<img" not in text
