"""Several people, one server (issue 14): the users file, its command, logins, the proxy's header, usage for admins."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import httpx
import pytest

from chat import users
from chat.accounts import parse_networks, peer_in
from chat.store import Store
from tests.servers import ROOT, Server, data_dir, running

ALICE_PW, BOB_PW, ERIN_PW = "alice-correct-horse", "bob-battery-staple", "erin-sees-sessions-end"


# -- hashing and the file ----------------------------------------------------------------------------


def test_hash_and_verify():
    one, two = users.hash_password("s3cret-words"), users.hash_password("s3cret-words")
    assert one != two and one.startswith("scrypt$16384$8$1$")  # a fresh salt each time
    assert "s3cret" not in one
    assert users.verify_password("s3cret-words", one) and users.verify_password("s3cret-words", two)
    assert not users.verify_password("s3cret-word", one)
    assert not users.verify_password("", one)
    assert not users.verify_password("s3cret-words", "plain-text-password")  # never compared as text
    assert not users.verify_password("s3cret-words", one.replace("scrypt$16384", "scrypt$16385"))


def test_users_file_is_parsed_strictly_and_reread_when_it_changes(tmp_path):
    path = tmp_path / "users.txt"
    users.write(path, {"alice": users.User("alice", users.hash_password(ALICE_PW), admin=True)})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    live = users.UsersFile(path)
    assert live.verify("alice", ALICE_PW) and live.is_admin("alice")
    assert not live.verify("alice", BOB_PW) and not live.verify("bob", BOB_PW) and not live.is_admin("bob")

    current = users.read(path)
    current["bob"] = users.User("bob", users.hash_password(BOB_PW))
    users.write(path, current)
    assert live.verify("bob", BOB_PW) and not live.is_admin("bob")  # no restart needed

    good = path.read_text()
    path.write_text(good + "mallory:not-a-hash\n")  # a broken edit keeps the accounts read before
    assert live.verify("bob", BOB_PW)
    with pytest.raises(users.UsersFileError, match="line"):
        users.read(path)
    for bad in ("bad name:" + users.hash_password("x" * 8), "alice", "alice:" + users.hash_password("x" * 8) + ":root"):
        with pytest.raises(users.UsersFileError):
            users.parse(bad)


def test_trusted_networks():
    nets = parse_networks("127.0.0.1, 10.0.0.0/8,::1")
    assert peer_in("127.0.0.1", nets) and peer_in("10.20.30.40", nets) and peer_in("::1", nets)
    assert peer_in("::ffff:10.1.2.3", nets)  # an IPv4 peer on a dual-stack socket
    assert not peer_in("127.0.0.2", nets) and not peer_in("192.168.1.1", nets)
    assert not peer_in("not-an-address", nets) and not peer_in(None, nets) and not peer_in("", nets)


# -- the command ---------------------------------------------------------------------------------------


def users_cmd(path, *args: str, password: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLCHAT_")}
    return subprocess.run([sys.executable, str(ROOT / "app.py"), "users", "--file", str(path), *args],
                          input=None if password is None else password + "\n", capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=60)


def test_the_users_command_adds_changes_and_removes_accounts(tmp_path):
    path = tmp_path / "conf" / "users.txt"
    done = users_cmd(path, "add", "alice", "--admin", password=ALICE_PW)
    assert done.returncode == 0, done.stderr
    assert ALICE_PW not in done.stdout + done.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ALICE_PW not in path.read_text()
    assert users.UsersFile(path).verify("alice", ALICE_PW) and users.UsersFile(path).is_admin("alice")

    again = users_cmd(path, "add", "alice", password="another-password")
    assert again.returncode == 1 and "passwd" in again.stderr
    short = users_cmd(path, "add", "bob", password="short")
    assert short.returncode != 0 and "at least 8" in short.stderr and "bob" not in users.read(path)
    bad_name = users_cmd(path, "add", "bob smith", password=BOB_PW)
    assert bad_name.returncode == 2 and "not a user name" in bad_name.stderr

    assert users_cmd(path, "add", "bob", password=BOB_PW).returncode == 0
    assert users_cmd(path, "passwd", "bob", password="bob-new-password").returncode == 0
    live = users.UsersFile(path)
    assert live.verify("bob", "bob-new-password") and not live.verify("bob", BOB_PW) and not live.is_admin("bob")
    assert users_cmd(path, "admin", "bob", "on").returncode == 0 and users.UsersFile(path).is_admin("bob")
    listed = users_cmd(path, "list")
    assert listed.stdout.split("\n")[:2] == ["alice  (admin)", "bob  (admin)"]
    assert users_cmd(path, "remove", "bob").returncode == 0 and set(users.read(path)) == {"alice"}
    missing = users_cmd(path, "remove", "bob")
    assert missing.returncode == 1 and "no account" in missing.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".users-")]  # no temporary file left


# -- real servers --------------------------------------------------------------------------------------

TITLES = {"user:alice": "Alice's tax receipts", "user:bob": "Bob's holiday photos", "user:carol": "Carol's plans",
          "browser:" + "0" * 32: "A browser's question"}


def seeded(tmp_path_factory, model_dir, name: str):
    """A data folder with one conversation (question + answer with usage) for each owner of TITLES."""
    data = data_dir(tmp_path_factory, model_dir, name)
    store = Store(data)
    for n, (owner, title) in enumerate(TITLES.items(), 1):
        conv = store.create_conversation(owner, title=title)
        store.add_message(owner, conv, role="user", text=f"secret words of {title}")
        answer = store.add_message(owner, conv, role="assistant", text=f"secret answer for {title}")
        store.update_message(answer, status="complete", usage={"prompt_tokens": 100 * n, "completion_tokens": 10 * n})
    store.close()
    return data


@pytest.fixture(scope="module")
def servers(tmp_path_factory, model_dir):
    file_dir = tmp_path_factory.mktemp("users-file")
    users_file = file_dir / "users.txt"
    users.write(users_file, {"alice": users.User("alice", users.hash_password(ALICE_PW), admin=True),
                             "bob": users.User("bob", users.hash_password(BOB_PW)),
                             "erin": users.User("erin", users.hash_password(ERIN_PW))})
    group = {
        "file": Server(seeded(tmp_path_factory, model_dir, "accounts-file"), "--users", str(users_file),
                       "--login-failures-per-minute", "3"),
        "proxy": Server(seeded(tmp_path_factory, model_dir, "accounts-proxy"), "--trusted-user-header",
                        "X-Forwarded-User", "--trusted-proxies", "10.0.0.0/8,127.0.0.1", "--admins", "carol"),
        "elsewhere": Server(seeded(tmp_path_factory, model_dir, "accounts-elsewhere"), "--trusted-user-header",
                            "X-Forwarded-User", "--trusted-proxies", "10.0.0.0/8", "--admins", "carol"),
    }
    with running(group):
        yield group


def login(base: str, name: str, password: str) -> httpx.Client:
    """A client that logged in through Gradio's login form's POST /login, as a browser does."""
    client = httpx.Client(base_url=base, timeout=10)
    with httpx.Client(base_url=base, timeout=10) as first:
        r = first.post("/login", data={"username": name, "password": password})
    assert r.status_code == 200, r.text
    client.cookies = r.cookies  # the login's cookies (Gradio's access token), as the browser keeps them
    return client


def test_admin_usage_endpoint_with_the_users_file(servers):
    base = servers["file"].base
    assert httpx.get(base + "/admin/usage").status_code == 401
    with login(base, "bob", BOB_PW) as bob:
        r = bob.get("/admin/usage")
        assert r.status_code == 403 and "admins" in r.json()["error"]
        assert bob.get("/").status_code == 200  # logged in: the page itself
    with login(base, "alice", ALICE_PW) as alice:
        r = alice.get("/admin/usage")
        alice.cookies.clear()
        assert alice.get("/admin/usage").status_code == 401  # the cookie is what says who it is
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    report = r.json()
    rows = {row["user"]: row for row in report["users"]}
    assert set(rows) - {"erin"} == {"alice", "bob", "carol"}  # the accounts, and the owner left from before
    assert rows["alice"]["admin"] and not rows["bob"]["admin"]
    assert (rows["alice"]["conversations"], rows["alice"]["messages"], rows["alice"]["questions"],
            rows["alice"]["answers"], rows["alice"]["tokens_in"], rows["alice"]["tokens_out"]) == (1, 2, 1, 1, 100, 10)
    assert (rows["bob"]["tokens_in"], rows["bob"]["tokens_out"]) == (200, 20)
    assert report["anonymous"]["owners"] == 1 and report["anonymous"]["tokens_in"] == 400
    assert report["totals"]["tokens_out"] == 100 and report["totals"]["conversations"] == 4
    assert "secret" not in r.text and "receipts" not in r.text and "holiday" not in r.text  # no one's content


def test_a_changed_password_or_a_removed_account_ends_its_sessions(servers):
    server = servers["file"]
    path = server.args[server.args.index("--users") + 1]
    erin = login(server.base, "erin", ERIN_PW)
    try:
        assert erin.get("/admin/usage").status_code == 403  # logged in, no admin
        assert users_cmd(path, "passwd", "erin", password="erin-new-password").returncode == 0
        assert erin.get("/admin/usage").status_code == 401  # that session ended
        again = login(server.base, "erin", "erin-new-password")  # the file was re-read: no restart
        assert again.get("/admin/usage").status_code == 403
        assert users_cmd(path, "remove", "erin").returncode == 0
        assert again.get("/admin/usage").status_code == 401
        again.close()
    finally:
        erin.close()


def test_the_proxy_header_is_the_user_only_from_a_trusted_proxy(servers):
    trusted, elsewhere = servers["proxy"].base, servers["elsewhere"].base
    as_carol, as_dave = {"X-Forwarded-User": "carol"}, {"X-Forwarded-User": "dave"}
    # From 127.0.0.1, one of --trusted-proxies: the header names the user, no login form.
    page = httpx.get(trusted + "/", headers=as_carol)
    assert page.status_code == 200 and "auth_required" not in page.text
    assert httpx.get(trusted + "/", headers={}).status_code == 401  # the proxy sent nobody
    assert httpx.get(trusted + "/", headers={"X-Forwarded-User": ""}).status_code == 401
    assert httpx.get(trusted + "/admin/usage", headers=as_dave).status_code == 403
    r = httpx.get(trusted + "/admin/usage", headers=as_carol)
    assert r.status_code == 200
    assert {row["user"]: row["tokens_in"] for row in r.json()["users"]} == {"alice": 100, "bob": 200, "carol": 300}
    # Not from a trusted proxy: the header means nothing, whoever it names.
    for headers in (as_carol, as_dave, {}):
        assert httpx.get(elsewhere + "/", headers=headers).status_code == 401
        assert httpx.get(elsewhere + "/admin/usage", headers=headers).status_code == 401
        assert httpx.get(elsewhere + "/gradio_api/info", headers=headers).status_code in (401, 404)


def test_start_up_refuses_mixed_or_unsafe_account_flags(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLCHAT_")}

    def start(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "app.py"), "--model", "tiny-random", "--data-dir",
                               str(tmp_path), *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)

    r = start("--trusted-user-header", "X-Forwarded-User")
    assert r.returncode == 2 and "needs --trusted-proxies" in r.stderr
    r = start("--trusted-proxies", "10.0.0.300")
    assert r.returncode == 2 and "--trusted-proxies (VLCHAT_TRUSTED_PROXIES) must be" in r.stderr
    r = start("--users", str(tmp_path / "missing.txt"))
    assert r.returncode == 2 and "python app.py users" in r.stderr
    r = start("--trusted-user-header", "X-Forwarded-User", "--trusted-proxies", "127.0.0.1", "--auth", "a:b")
    assert r.returncode == 2 and "cannot be combined" in r.stderr


# -- in the browser: each user sees their own conversations; only admins see usage ------------------------


def browser_login(browser, base: str, name: str, password: str):
    """A fresh browser context logged in through the page's own login form; (context, page)."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(base + "/")
    page.get_by_label("username").fill(name)
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()
    page.locator("#conversation-list").wait_for(timeout=60_000)
    return context, page


def conversation_titles(page) -> list[str]:
    page.locator("#conversation-list label").first.wait_for(timeout=30_000)
    return page.locator("#conversation-list label").all_inner_texts()


def test_each_user_sees_only_their_conversations_and_only_admins_see_usage(servers, browser):
    base = servers["file"].base
    alice_ctx, alice = browser_login(browser, base, "alice", ALICE_PW)
    bob_ctx, bob = browser_login(browser, base, "bob", BOB_PW)
    try:
        assert [t.strip() for t in conversation_titles(alice)] == [TITLES["user:alice"]]
        assert [t.strip() for t in conversation_titles(bob)] == [TITLES["user:bob"]]
        # Alice (admin) has the usage panel, with counts and no one's words; Bob has none.
        alice.locator("#admin-usage").wait_for(timeout=30_000)
        alice.locator("#admin-usage button").first.click()
        table = alice.locator("#admin-usage-table table")
        table.wait_for(timeout=10_000)
        text = table.inner_text()
        assert "alice (admin)" in text and "bob" in text and "Browsers without an account (1)" in text
        assert "200" in text and "secret" not in text and "holiday" not in text
        assert bob.locator("#admin-usage").count() == 0 or not bob.locator("#admin-usage").is_visible()
        assert bob.locator("#admin-usage-table table").count() == 0
        # What Bob writes is Bob's: the new conversation is stored under user:bob, and Alice never sees it.
        bob.locator("#input textarea:not([disabled])").wait_for(timeout=60_000)
        bob.locator("#input textarea").fill("Bob asks about his ledger")
        bob.locator("#input textarea").press("Enter")
        bob.locator("#conversation-list label", has_text="Bob asks about his ledger").wait_for(timeout=60_000)
        alice.reload()
        assert all("ledger" not in t for t in conversation_titles(alice))
        owners = {o for (o,) in owners_of(servers["file"], "Bob asks about his ledger")}
        assert owners == {"user:bob"}
    finally:
        alice_ctx.close()
        bob_ctx.close()


def test_the_proxy_user_owns_the_same_history_in_the_browser(servers, browser):
    context = browser.new_context(extra_http_headers={"X-Forwarded-User": "alice"})
    try:
        page = context.new_page()
        page.goto(servers["proxy"].base + "/")
        assert [t.strip() for t in conversation_titles(page)] == [TITLES["user:alice"]]  # user:alice, as with --users
        assert page.locator("#admin-usage-table table").count() == 0  # alice is no admin here (--admins carol)
    finally:
        context.close()


def owners_of(server, title: str) -> list[tuple]:
    import sqlite3

    db = sqlite3.connect(f"file:{server.data_dir / 'vlchat.db'}?mode=ro", uri=True)
    try:
        return db.execute("select owner from conversations where title = ?", [title]).fetchall()
    finally:
        db.close()


# Last: its failures block 127.0.0.1's logins on this server for a minute.
def test_wrong_passwords_fail_and_are_throttled(servers):
    base = servers["file"].base

    def attempt(name: str, password: str) -> int:
        return httpx.post(base + "/login", data={"username": name, "password": password}).status_code

    assert attempt("bob", ALICE_PW) == 400  # another user's password
    assert attempt("nobody", BOB_PW) == 400
    assert attempt("bob", "") in (400, 422)
    assert attempt("bob", BOB_PW) == 429  # the login throttle counts the users file's failures too
