"""Who is logged in to the page: --auth, a users file (--users), or a trusted reverse proxy's header.

- `--auth user:password` and `--users FILE` use Gradio's login form; `Accounts.login` checks a
  name and password against both (scrypt in a worker thread, so the event loop never waits on it).
  The login throttle (`chat.security.LoginThrottle`) counts the form's failures as before.
- `--trusted-user-header X-Forwarded-User` with `--trusted-proxies`: no login form; Gradio asks
  `Accounts.proxy_user` for every request, which returns the header's user only when the TCP peer
  (the connection's own address: the server never reads X-Forwarded-For) is one of the proxies.
  From anyone else the header is ignored and the page answers 401.

Either way Gradio's `request.username` is the user, and the page's owner key is "user:<name>"
(`chat.ui.owner_of`), the shape --auth has always produced, so its history carries over.
Admins (the users file's flag, or `--admins`) may read usage per user (`chat.admin`).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import re
from pathlib import Path

from chat.config import Settings
from chat.users import UsersFile

# What a proxy's user may look like: printable, no control characters, not absurdly long.
_PROXY_USER = re.compile(r"[^\x00-\x1f\x7f]{1,256}")


def parse_networks(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """The networks in a comma-separated list of addresses and CIDRs (a bare address is a /32 or /128)."""
    return tuple(ipaddress.ip_network(n.strip(), strict=False) for n in value.split(",") if n.strip())


def peer_in(host: str | None, networks) -> bool:
    """Whether the address `host` lies in one of `networks` (an IPv4-mapped IPv6 address counts as IPv4)."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in net for net in networks)


class Sessions(dict):
    """Gradio's login tokens (token -> user name), each ending when its account is removed or its password changes.

    Installed in place of the mounted Gradio app's `tokens` dict (`Accounts.attach`); Gradio reads a
    cookie's user with `tokens.get(token)`, so a stale session reads as no session (the login form).
    """

    def __init__(self, accounts: Accounts) -> None:
        super().__init__()
        self.accounts = accounts
        self.stamps: dict[str, str | None] = {}

    def __setitem__(self, token: str, name: str) -> None:
        super().__setitem__(token, name)
        self.stamps[token] = self.accounts.stamp(name)

    def __delitem__(self, token: str) -> None:
        super().__delitem__(token)
        self.stamps.pop(token, None)

    def get(self, token, default=None):
        """The user of `token`, or `default` when there is none or the account changed since the login."""
        name = super().get(token)
        if name is None:
            return default
        stamp = self.accounts.stamp(name)
        if stamp is None or stamp != self.stamps.get(token):
            self.pop(token, None)
            self.stamps.pop(token, None)
            return default
        return name


class Accounts:
    """The page's accounts, built once from the settings; `mount_options()` goes to mount_gradio_app."""

    def __init__(self, settings: Settings) -> None:
        self.single = tuple(settings.auth.split(":", 1)) if settings.auth else None
        self.file = UsersFile(Path(settings.users)) if settings.users else None
        self.header = settings.trusted_user_header.strip()
        self.proxies = parse_networks(settings.trusted_proxies)
        self.admins = frozenset(a.strip() for a in settings.admins.split(",") if a.strip())
        self.gradio = None  # the mounted Gradio app (`attach`): its login tokens name the user of a cookie

    @property
    def enabled(self) -> bool:
        """Whether the page has accounts at all (else each browser is its own anonymous owner)."""
        return bool(self.single or self.file or self.header)

    def mount_options(self) -> dict:
        """`auth` (the login form) or `auth_dependency` (the proxy's header) for gr.mount_gradio_app."""
        if self.header:
            return {"auth_dependency": self.proxy_user}
        if self.file is not None:
            return {"auth": self.login}
        if self.single is not None:
            return {"auth": self.single}  # Gradio compares it in constant time, as before
        return {}

    def check(self, name: str, password: str) -> bool:
        """Whether `name` and `password` are --auth's pair or an account of the users file."""
        if self.single is not None and hmac.compare_digest(name.encode(), self.single[0].encode()):
            return hmac.compare_digest(password.encode(), self.single[1].encode())
        return self.file is not None and self.file.verify(name, password)

    async def login(self, name: str, password: str) -> bool:
        """Gradio's login check (scrypt runs in a thread: ~50 ms that the event loop does not wait for)."""
        return await asyncio.to_thread(self.check, name, password)

    def trusted(self, request) -> bool:
        """Whether the request's TCP peer is one of --trusted-proxies."""
        client = getattr(request, "client", None)
        return peer_in(getattr(client, "host", None), self.proxies)

    def proxy_user(self, request) -> str | None:
        """The user a trusted proxy names in the header; None (Gradio: 401) from anyone else or without it."""
        if not self.header or not self.trusted(request):
            return None
        value = request.headers.get(self.header, "").strip()
        return value if _PROXY_USER.fullmatch(value) else None

    def attach(self, app) -> None:
        """Find the Gradio app mounted in `app` (a FastAPI app), whose login tokens name a cookie's user.

        With a users file its tokens become `Sessions`: removing an account or changing its password
        ends the sessions logged in before.
        """
        from gradio.routes import App

        for route in getattr(app, "routes", ()):
            if isinstance(getattr(route, "app", None), App):
                self.gradio = route.app
        if self.gradio is not None and self.file is not None and not isinstance(self.gradio.tokens, Sessions):
            sessions = Sessions(self)
            for token, name in self.gradio.tokens.items():
                sessions[token] = name
            self.gradio.tokens = sessions

    def stamp(self, name: str) -> str | None:
        """What a session of `name` depends on: --auth's pair, or the account's password hash; None: no account."""
        if self.single is not None and name == self.single[0]:
            return "--auth"
        user = self.file.users().get(name) if self.file is not None else None
        return user.hash if user is not None else None

    def user_of(self, request) -> str | None:
        """The logged-in user behind a starlette request outside Gradio's own routes (e.g. /admin/usage)."""
        if self.header:
            return self.proxy_user(request)
        if self.gradio is None or not (self.file or self.single):
            return None
        cookie_id = self.gradio.cookie_id
        token = request.cookies.get(f"access-token-{cookie_id}") or \
            request.cookies.get(f"access-token-unsecure-{cookie_id}")
        return self.gradio.tokens.get(token) if token else None

    def is_admin(self, name: str | None) -> bool:
        """Whether `name` may see usage per user (--admins, or the users file's admin flag)."""
        if not name:
            return False
        return name in self.admins or (self.file is not None and self.file.is_admin(name))

    def known_users(self) -> list[str]:
        """The names this server knows before anyone logs in: --auth's, the users file's and --admins."""
        names = set(self.admins)
        if self.single is not None:
            names.add(self.single[0])
        if self.file is not None:
            names.update(self.file.users())
        return sorted(names)
