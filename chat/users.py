"""The users file (`--users FILE`): page accounts with scrypt-hashed passwords, and the command that edits it.

One account a line, `NAME:HASH[:admin]`; blank lines and lines starting with '#' are skipped.
HASH is `scrypt$N$r$p$SALT$KEY` (stdlib `hashlib.scrypt`, a random 16-byte salt per user,
base64 without padding), so the file never holds a password. Checks compare in constant time,
and an unknown name costs the same scrypt as a known one (no telling which names exist).

The server reads the file at start and again whenever it changes on disk (its size, mtime or
inode), so `add`, `passwd` and `remove` take effect without a restart; a file that became
unreadable keeps the accounts read last (and says so in the log).

The command (`python app.py users ...` or `python -m chat.users ...`) writes the file atomically
(a temporary file in the same folder, fsync, rename) with mode 0600. Passwords are read twice
with getpass (never echoed), or one line from standard input when it is not a terminal (scripts).
"""

from __future__ import annotations

import argparse
import base64
import functools
import getpass
import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("vlchat")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
MIN_PASSWORD = 8
MAX_PASSWORD = 1024  # scrypt's work does not depend on it, but nobody needs more
# scrypt parameters: 16 MiB and about 50 ms per check on one core (OWASP's minimum is N=2^17, r=8 with
# 128 MiB; this keeps a login burst on a small server cheap; raise N in new hashes when you like:
# old hashes keep their own parameters).
N, R, P = 2**14, 8, 1
SALT_BYTES, KEY_BYTES = 16, 32
MAX_MEM = 256 * 1024 * 1024


class UsersFileError(ValueError):
    """The users file (or a line of it) is not what this module writes."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def hash_password(password: str, *, n: int = N, r: int = R, p: int = P) -> str:
    """`scrypt$N$r$p$SALT$KEY` for `password`, with a fresh random salt."""
    salt = secrets.token_bytes(SALT_BYTES)
    key = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=KEY_BYTES, maxmem=MAX_MEM)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(key)}"


def _parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt" or not all(x.isdigit() for x in parts[1:4]):
        raise UsersFileError("a password hash is not scrypt$N$r$p$SALT$KEY")
    n, r, p = (int(x) for x in parts[1:4])
    if n < 2 or n & (n - 1) or n > 2**20 or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise UsersFileError("a password hash has scrypt parameters out of range")
    try:
        salt, key = _unb64(parts[4]), _unb64(parts[5])
    except ValueError:
        raise UsersFileError("a password hash has a salt or key that is not base64") from None
    if len(salt) < 8 or len(key) < 16:
        raise UsersFileError("a password hash has a salt or key that is too short")
    return n, r, p, salt, key


def verify_password(password: str, stored: str) -> bool:
    """Whether `password` matches `stored` (constant-time compare of the derived keys)."""
    try:
        n, r, p, salt, key = _parse_hash(stored)
    except UsersFileError:
        return False
    if len(password) > MAX_PASSWORD:
        return False
    got = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(key), maxmem=MAX_MEM)
    return hmac.compare_digest(got, key)


@dataclass(frozen=True)
class User:
    """One account: its name, password hash and whether it may see usage per user."""

    name: str
    hash: str
    admin: bool = False

    def line(self) -> str:
        """Its line in the users file."""
        return f"{self.name}:{self.hash}" + (":admin" if self.admin else "")


def parse(text: str) -> dict[str, User]:
    """The accounts in a users file's text (UsersFileError naming the line when one is malformed)."""
    users: dict[str, User] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        if len(fields) not in (2, 3) or (len(fields) == 3 and fields[2] not in ("admin", "")):
            raise UsersFileError(f"line {number} is not NAME:HASH or NAME:HASH:admin")
        name, stored = fields[0], fields[1]
        if not NAME_RE.fullmatch(name):
            raise UsersFileError(f"line {number}: {name[:40]!r} is not a user name (letters, digits, . _ @ + -)")
        try:
            _parse_hash(stored)
        except UsersFileError as exc:
            raise UsersFileError(f"line {number}: {exc}") from None
        if name in users:
            raise UsersFileError(f"line {number}: {name!r} appears twice")
        users[name] = User(name, stored, admin=len(fields) == 3 and fields[2] == "admin")
    return users


def read(path: Path) -> dict[str, User]:
    """The accounts in the file at `path` (FileNotFoundError when there is none)."""
    return parse(Path(path).read_text(encoding="utf-8"))


def write(path: Path, users: dict[str, User]) -> None:
    """Write `users` to `path` atomically with mode 0600 (a reader sees the old file or the new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# vlchat users: NAME:scrypt-hash[:admin]. Edit with: python app.py users --help\n"
    text += "".join(u.line() + "\n" for u in sorted(users.values(), key=lambda u: u.name))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".users-")  # created 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@functools.cache
def _dummy() -> str:
    """A hash verified against when a name is unknown, so that answer takes as long as a wrong password."""
    return hash_password(secrets.token_hex(16))


class UsersFile:
    """The accounts of a users file, re-read when the file changes on disk; safe to call from any thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen: tuple | None = None
        self._users = read(self.path)  # at start a broken file is an error, not an empty list
        self._seen = self._stamp()

    def _stamp(self) -> tuple | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def users(self) -> dict[str, User]:
        """The accounts as the file says now (the last good reading if it is missing or malformed)."""
        with self._lock:
            stamp = self._stamp()
            if stamp != self._seen:
                try:
                    self._users = read(self.path)
                    log.info("users file %s re-read: %d accounts", self.path, len(self._users))
                except (OSError, UnicodeDecodeError, UsersFileError) as exc:
                    log.warning("users file %s could not be re-read (%s); keeping the %d accounts read before",
                                self.path, exc, len(self._users))
                self._seen = stamp
            return self._users

    def verify(self, name: str, password: str) -> bool:
        """Whether `name` is an account and `password` its password (as slow for unknown names)."""
        user = self.users().get(name)
        ok = verify_password(password, user.hash if user else _dummy())
        return ok and user is not None

    def is_admin(self, name: str) -> bool:
        """Whether `name` is an account marked admin."""
        user = self.users().get(name)
        return bool(user and user.admin)


# -- the command ---------------------------------------------------------------------------------


def _read_password(name: str) -> str:
    """A new password: typed twice at a terminal (not echoed), else the first line of standard input."""
    if not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"Password for {name}: ")
        if getpass.getpass("The same again: ") != password:
            raise SystemExit("The two passwords differ; nothing was changed.")
    if len(password) < MIN_PASSWORD:
        raise SystemExit(f"A password needs at least {MIN_PASSWORD} characters; nothing was changed.")
    if len(password) > MAX_PASSWORD:
        raise SystemExit(f"A password may have at most {MAX_PASSWORD} characters; nothing was changed.")
    return password


def _arguments() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="app.py users", description="Add, remove and list page accounts in a vlchat users file (--users FILE).")
    ap.add_argument("--file", default=os.environ.get("VLCHAT_USERS") or "data/users.txt",
                    help="The users file (default: $VLCHAT_USERS, else data/users.txt).")
    sub = ap.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="Add an account; asks for its password twice (or reads a line from stdin).")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="The account may see usage per user.")
    sub.add_parser("passwd", help="Set an account's password.").add_argument("name")
    sub.add_parser("remove", help="Remove an account (its conversations stay in the history).").add_argument("name")
    admin = sub.add_parser("admin", help="Make an account an admin (on) or not (off).")
    admin.add_argument("name")
    admin.add_argument("state", choices=("on", "off"))
    sub.add_parser("list", help="List the accounts (names and admin flags).")
    return ap


def main(argv: list[str] | None = None) -> int:
    """`app.py users add|passwd|remove|admin|list`; returns the exit code."""
    args = _arguments().parse_args(argv)
    path = Path(args.file)
    try:
        users = read(path) if path.exists() else {}
    except (OSError, UnicodeDecodeError, UsersFileError) as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 2
    name = getattr(args, "name", None)
    if name is not None and not NAME_RE.fullmatch(name):
        print(f"{name!r} is not a user name: 1-64 letters, digits, '.', '_', '@', '+' or '-', starting with a "
              "letter or digit.", file=sys.stderr)
        return 2
    if args.command == "list":
        for user in sorted(users.values(), key=lambda u: u.name):
            print(user.name + ("  (admin)" if user.admin else ""))
        return 0
    if args.command == "add" and name in users:
        print(f"{name} already has an account; set its password with: app.py users passwd {name}", file=sys.stderr)
        return 1
    if args.command != "add" and name not in users:
        print(f"{name} has no account in {path}.", file=sys.stderr)
        return 1
    if args.command == "add":
        users[name] = User(name, hash_password(_read_password(name)), admin=args.admin)
        done = f"added {name}" + (" (admin)" if args.admin else "")
    elif args.command == "passwd":
        users[name] = User(name, hash_password(_read_password(name)), admin=users[name].admin)
        done = f"changed the password of {name}"
    elif args.command == "remove":
        del users[name]
        done = f"removed {name}"
    else:
        users[name] = User(name, users[name].hash, admin=args.state == "on")
        done = f"{name} is {'now' if args.state == 'on' else 'no longer'} an admin"
    write(path, users)
    print(f"{path}: {done}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
