"""Issue 13: a conversation is a tree of versions (edit a question, regenerate an answer); the chat shows one path.

Store-level rules, the upgrade of a database made before versions, and the page's handlers
(chat.versions, chat.ui.regenerate) with the tiny model.
"""

from __future__ import annotations

import sqlite3

import pytest

from chat import ui, versions
from chat.conversation import engine_messages
from chat.notices import Notice
from chat.render import chat_history
from chat.store import NotFound, Store
from tests.test_ui import OWNER, Req, drain, png, real_ctx, send, text_of

PNG = b"\x89PNG\r\n\x1a\n" + b"fake png payload"


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "store")
    yield s
    s.close()


def texts(rows):
    return [r["text"] for r in rows]


def test_versions_branch_and_the_path_follows_the_choice(store):
    conv = store.create_conversation("alice", title="t")
    q1 = store.add_message("alice", conv, role="user", text="q1")
    a1 = store.add_message("alice", conv, role="assistant", text="a1")
    store.add_message("alice", conv, role="user", text="q2")
    store.add_message("alice", conv, role="assistant", text="a2")
    # Edit q1: a sibling with its own answer; the old branch stays.
    q1b = store.add_message("alice", conv, role="user", text="q1 edited", parent_id=None)
    store.add_message("alice", conv, role="assistant", text="a1 edited", parent_id=q1b)
    rows = store.messages("alice", conv)
    assert texts(rows) == ["q1 edited", "a1 edited"]
    assert (rows[0]["version"], rows[0]["versions"]) == (2, 2)
    # The engine gets the selected path only.
    sent = engine_messages(rows, "sys")
    assert [m["role"] for m in sent] == ["system", "user", "assistant"]
    assert sent[1]["content"][-1]["text"] == "q1 edited"
    # Back to version 1: the path follows it down its newest replies.
    assert store.switch_version("alice", conv, q1b, -1) == q1
    assert texts(store.messages("alice", conv)) == ["q1", "a1", "q2", "a2"]
    assert store.switch_version("alice", conv, q1, -1) == q1  # clamped at the first
    # Regenerate a1: a sibling answer; then a new question follows the path on screen.
    a1b = store.add_message("alice", conv, role="assistant", text="a1 again", parent_id=q1)
    assert texts(store.messages("alice", conv)) == ["q1", "a1 again"]
    store.add_message("alice", conv, role="user", text="q3")
    assert texts(store.messages("alice", conv)) == ["q1", "a1 again", "q3"]
    assert store.switch_version("alice", conv, a1b, -1) == a1
    assert texts(store.messages("alice", conv)) == ["q1", "a1", "q2", "a2"]
    tree, leaf = store.message_tree("alice", conv)
    assert len(tree) == 8 and leaf == store.messages("alice", conv)[-1]["id"]
    # Another owner sees nothing and cannot switch.
    with pytest.raises(NotFound, match="conversation"):
        store.switch_version("bob", conv, q1, 1)
    with pytest.raises(NotFound):
        store.add_message("alice", conv, role="user", text="x", parent_id=10_000)


def test_deleting_the_shown_leaf_falls_back_to_the_previous_version(store):
    conv = store.create_conversation("alice", title="t")
    q = store.add_message("alice", conv, role="user", text="q")
    store.add_message("alice", conv, role="assistant", text="a1")
    a2 = store.add_message("alice", conv, role="assistant", text="a2", parent_id=q)
    store.delete_message("alice", a2)  # a refused regenerate
    assert texts(store.messages("alice", conv)) == ["q", "a1"]
    # A question with replies deleted: its replies move up to its parent, nothing is orphaned.
    store.delete_message("alice", q)
    assert texts(store.messages("alice", conv)) == ["a1"]


def test_import_is_all_or_nothing(store):
    good = {"role": "user", "text": "q", "parent": None}
    with pytest.raises(ValueError, match="earlier message"):
        store.import_conversation("alice", title="t", mode="general", settings={},
                                  messages=[good, {"role": "assistant", "text": "a", "parent": 1}], leaf=1)
    assert store.list_conversations("alice") == [] and store.db.table("messages").count == 0
    conv = store.import_conversation("alice", title="t", mode="general", settings={},
                                      messages=[good, {"role": "assistant", "text": "a1", "parent": 0},
                                                {"role": "assistant", "text": "a2", "parent": 0}], leaf=1)
    rows = store.messages("alice", conv)
    assert texts(rows) == ["q", "a1"] and (rows[1]["version"], rows[1]["versions"]) == (1, 2)


def test_a_database_from_before_versions_upgrades_and_keeps_its_conversations(tmp_path):
    """A database made by the previous schema (m001 + m002) opens as one path per conversation."""
    data = tmp_path / "old"
    data.mkdir()
    db = sqlite3.connect(data / "vlchat.db")
    db.executescript("""
        CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at TEXT);
        INSERT INTO _migrations VALUES ('m001_initial', '2026-01-01'), ('m002_image_names', '2026-01-02');
        CREATE TABLE conversations (id TEXT PRIMARY KEY, owner TEXT NOT NULL, title TEXT NOT NULL,
            mode TEXT NOT NULL, settings TEXT NOT NULL, created TEXT NOT NULL, updated TEXT NOT NULL);
        CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT NOT NULL,
            seq INTEGER NOT NULL, role TEXT NOT NULL, text TEXT NOT NULL, image_ids TEXT NOT NULL,
            status TEXT NOT NULL, mode TEXT, settings TEXT, usage TEXT, created TEXT NOT NULL, image_names TEXT);
        CREATE UNIQUE INDEX idx_messages_conversation_id_seq ON messages (conversation_id, seq);
        CREATE TABLE images (sha256 TEXT PRIMARY KEY, bytes INTEGER NOT NULL, width INTEGER NOT NULL,
            height INTEGER NOT NULL, mime TEXT NOT NULL, path TEXT NOT NULL, created TEXT NOT NULL);
        INSERT INTO conversations VALUES ('c1', 'alice', 'old one', 'general', '{}', '2026-01-01', '2026-01-01');
        INSERT INTO conversations VALUES ('c2', 'alice', 'old two', 'scene', '{}', '2026-01-01', '2026-01-02');
        INSERT INTO conversations VALUES ('c3', 'bob', 'empty', 'general', '{}', '2026-01-01', '2026-01-01');
        INSERT INTO messages (conversation_id, seq, role, text, image_ids, status, created) VALUES
            ('c1', 0, 'user', 'first', '[]', 'complete', '2026-01-01'),
            ('c2', 0, 'user', 'other', '[]', 'complete', '2026-01-01'),
            ('c1', 1, 'assistant', 'answer', '[]', 'complete', '2026-01-01'),
            ('c1', 2, 'user', 'second', '[]', 'complete', '2026-01-01'),
            ('c1', 3, 'assistant', 'half', '[]', 'pending', '2026-01-01');
    """)
    db.commit()
    db.close()
    store = Store(data)
    assert store.applied_migrations() == ["m001_initial", "m002_image_names", "m003_versions"]
    assert store.recover_interrupted() == 1
    rows = store.messages("alice", "c1")
    assert texts(rows) == ["first", "answer", "second", "half"] and rows[-1]["status"] == "interrupted"
    assert all(r["versions"] == 1 for r in rows)
    assert texts(store.messages("alice", "c2")) == ["other"] and store.messages("bob", "c3") == []
    assert [c["title"] for c in store.list_conversations("alice")] == ["old two", "old one"]
    # And it goes on: a regenerate there is a version, a new message follows the path.
    store.add_message("alice", "c1", role="assistant", text="redo", parent_id=rows[2]["id"])
    store.add_message("alice", "c1", role="user", text="third")
    assert texts(store.messages("alice", "c1")) == ["first", "answer", "second", "redo", "third"]
    store.close()
    again = Store(data)  # reopening applies nothing more and keeps the choice
    assert again.applied_migrations()[-1] == "m003_versions"
    assert texts(again.messages("alice", "c1"))[-1] == "third"
    again.close()


def test_versions_are_said_in_the_chat(store):
    conv = store.create_conversation("alice", title="t")
    q = store.add_message("alice", conv, role="user", text="q")
    store.add_message("alice", conv, role="assistant", text="a1")
    store.add_message("alice", conv, role="assistant", text="a2", parent_id=q)
    history = chat_history(store, store.messages("alice", conv))
    assert "Version" not in text_of(history[0])
    assert text_of(history[1]).endswith('<p class="answer-note vl-version">Version 2 of 2</p>')


# -- the page's handlers, with the tiny model ------------------------------------------------


@pytest.fixture
def ctx(tmp_path, loaded):
    yield from real_ctx(tmp_path, loaded)


def edit(ctx, conv_id, target, text, req=None):
    return drain(versions.edit(ctx, conv_id, str(target), text, "general", 0.0, 0.9, 16, "", req or Req()))


def test_edit_a_question_branches_and_versions_page_back(ctx, tmp_path):
    conv_id = send(ctx, None, "what colour?", [png(tmp_path)], max_new=16)[0][0]
    send(ctx, conv_id, "and the shape?", max_new=16)
    q1, a1, q2, a2 = ctx.store.messages(OWNER, conv_id)
    # The panel starts on the last answer; choosing the first question offers its text to edit.
    panel = versions.panel(ctx, conv_id, None, None, Req())
    assert panel[0]["value"] == str(a2["id"]) and "Answer 2: version 1 of 1" in panel[1] and panel[6] == a2["id"]
    # Nothing new since (the same newest message): the chosen message stays; a new one moves the panel on.
    assert versions.panel(ctx, conv_id, str(q2["id"]), a2["id"], Req())[0]["value"] == str(q2["id"])
    assert versions.panel(ctx, conv_id, str(q2["id"]), a1["id"], Req())[0]["value"] == str(a2["id"])
    chosen = versions.choose(ctx, conv_id, str(q1["id"]), Req())
    assert chosen[4]["value"] == "what colour?" and chosen[4]["visible"] is True
    assert [label for label, _ in chosen[0]["choices"]][:2] == ["Question 1: what colour?", "Answer 1"]

    updates = edit(ctx, conv_id, q1["id"], "what size?")
    assert updates[0][0] == conv_id and "Answering" in updates[0][4]
    rows = ctx.store.messages(OWNER, conv_id)
    assert texts(rows)[0] == "what size?" and len(rows) == 2 and rows[1]["status"] == "complete"
    assert rows[0]["image_ids"] == q1["image_ids"] and rows[0]["image_names"] == ["a.png"]  # same image
    assert (rows[0]["version"], rows[0]["versions"]) == (2, 2)
    assert rows[1]["usage"]["prompt_tokens"] < a2["usage"]["prompt_tokens"]  # the later turns are not in it
    # Previous version: the original branch, whole.
    out = versions.previous_version(ctx, conv_id, str(rows[0]["id"]), Req())
    assert texts(ctx.store.messages(OWNER, conv_id)) == [q1["text"], a1["text"], q2["text"], a2["text"]]
    assert "<p>what colour?</p>" in text_of(out[0][0]) and "Version 1 of 2" in text_of(out[0][0])
    assert out[1]["value"] == str(q1["id"]) and "version 1 of 2" in out[2]
    assert out[3]["interactive"] is False and out[4]["interactive"] is True
    out = versions.next_version(ctx, conv_id, str(q1["id"]), Req())
    assert texts(ctx.store.messages(OWNER, conv_id))[0] == "what size?"
    # Only questions are edited; another browser cannot touch it.
    with pytest.raises(Notice, match="Only a question"):
        edit(ctx, conv_id, rows[1]["id"], "hm")
    with pytest.raises(Notice):
        edit(ctx, conv_id, rows[0]["id"], "mine now", Req(browser="c" * 32))
    with pytest.raises(Notice):
        versions.previous_version(ctx, conv_id, str(rows[0]["id"]), Req(browser="c" * 32))
    assert len(ctx.store.message_tree(OWNER, conv_id)[0]) == 6


def test_regenerate_twice_gives_three_versions_to_page_through(ctx):
    conv_id = send(ctx, None, "tell me", max_new=16)[0][0]
    for _ in range(2):
        drain(ui.regenerate(ctx, conv_id, "general", 1.0, 0.9, 16, "", Req()))
    answer = ctx.store.messages(OWNER, conv_id)[-1]
    assert (answer["version"], answer["versions"]) == (3, 3)
    panel = versions.panel(ctx, conv_id, None, None, Req())
    assert "Answer 1: version 3 of 3" in panel[1] and panel[2]["interactive"] and not panel[3]["interactive"]
    assert text_of(versions.redraw(ctx, conv_id, Req())[-1]).endswith("Version 3 of 3</p>")
    out = versions.previous_version(ctx, conv_id, str(answer["id"]), Req())
    assert "Version 2 of 3" in text_of(out[0][-1])
    assert ctx.store.messages(OWNER, conv_id)[-1]["version"] == 2
