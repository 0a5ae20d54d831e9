"""Usage per user, for admins: GET /admin/usage (JSON) and a panel on the page that only admins see.

Counted from the history alone (the page's conversations; /v1 stores nothing): per user, the
conversations, the messages (every stored version; questions and answers apart) and the tokens
the answers' usage recorded (prompt tokens in, generated tokens out), and when they last wrote.
Nothing of what anyone wrote is read or sent: no titles, no texts, no images. Owners that are
not users (browsers without an account, from before accounts were turned on) are summed in one
"anonymous" line.

Who asks is `chat.accounts.Accounts.user_of` (the login cookie or the trusted proxy's header):
nobody 401, a user who is not an admin 403.
"""

from __future__ import annotations

import gradio as gr

from chat.conversation import md_escape
from chat.i18n import label as L
from chat.i18n import lang_of

_FIELDS = ("conversations", "messages", "questions", "answers", "tokens_in", "tokens_out")

# Read-only, one statement, under the store's lock (the store's single connection is shared by threads).
_QUERY = """
SELECT c.owner AS owner,
       COUNT(DISTINCT c.id) AS conversations,
       COUNT(m.id) AS messages,
       COALESCE(SUM(m.role = 'user'), 0) AS questions,
       COALESCE(SUM(m.role = 'assistant'), 0) AS answers,
       COALESCE(SUM(CASE WHEN json_valid(m.usage) THEN json_extract(m.usage, '$.prompt_tokens') END), 0) AS tokens_in,
       COALESCE(SUM(CASE WHEN json_valid(m.usage) THEN json_extract(m.usage, '$.completion_tokens') END), 0)
           AS tokens_out,
       MAX(COALESCE(m.created, c.updated)) AS last_active
FROM conversations AS c LEFT JOIN messages AS m ON m.conversation_id = c.id
GROUP BY c.owner
"""


def usage_by_owner(store) -> dict[str, dict]:
    """{owner key: {conversations, messages, questions, answers, tokens_in, tokens_out, last_active}}."""
    with store._lock:
        cursor = store.db.execute(_QUERY)
        columns = [d[0] for d in cursor.description]
        rows = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
    return {row.pop("owner"): {k: (int(v) if k in _FIELDS else v) for k, v in row.items()} for row in rows}


def _zero() -> dict:
    return {**dict.fromkeys(_FIELDS, 0), "last_active": None}


def usage_report(store, accounts) -> dict:
    """The /admin/usage body: every known user (zero when idle), the anonymous owners summed, the totals."""
    by_owner = usage_by_owner(store)
    users: dict[str, dict] = {name: _zero() for name in accounts.known_users()}
    anonymous = {**_zero(), "owners": 0}
    totals = _zero()
    for owner, row in by_owner.items():
        if owner.startswith("user:"):
            users[owner[5:]] = row
        else:
            anonymous["owners"] += 1
            for k in _FIELDS:
                anonymous[k] += row[k]
            if row["last_active"] and (anonymous["last_active"] or "") < row["last_active"]:
                anonymous["last_active"] = row["last_active"]
        for k in _FIELDS:
            totals[k] += row[k]
        if row["last_active"] and (totals["last_active"] or "") < row["last_active"]:
            totals["last_active"] = row["last_active"]
    listed = [{"user": name, "admin": accounts.is_admin(name), **users[name]} for name in sorted(users)]
    return {"users": listed, "anonymous": anonymous, "totals": totals}


def add_route(app, ctx, accounts) -> None:
    """GET /admin/usage on the FastAPI app: the report for an admin; 401 for nobody, 403 for other users."""
    from starlette.responses import JSONResponse

    def usage(request) -> JSONResponse:
        user = accounts.user_of(request)
        headers = {"cache-control": "no-store"}
        if user is None:
            return JSONResponse({"error": "Log in to the page first (an admin account sees usage per user)."},
                                status_code=401, headers=headers)
        if not accounts.is_admin(user):
            return JSONResponse({"error": "Only admins see usage per user."}, status_code=403, headers=headers)
        return JSONResponse(usage_report(ctx.store, accounts), headers=headers)

    app.add_route("/admin/usage", usage, methods=["GET"], include_in_schema=False)


# -- the page's panel -----------------------------------------------------------------------------------------

# The panel's words (the page's languages, chat.i18n.LANGS); times are UTC.
WORDS = {
    "en": {"head": ("User", "Conversations", "Messages", "Tokens in", "Tokens out", "Last active (UTC)"),
           "admin": "admin", "browsers": "Browsers without an account", "total": "Total", "never": "never"},
    "zh-CN": {"head": ("用户", "对话", "消息", "输入 token", "输出 token", "最近活动（UTC）"),
              "admin": "管理员", "browsers": "未登录的浏览器", "total": "合计", "never": "从未"},
}


def _line(name: str, row: dict, never: str) -> str:
    cells = [name, f"{row['conversations']:,}", f"{row['messages']:,}", f"{row['tokens_in']:,}",
             f"{row['tokens_out']:,}", (row["last_active"] or never)[:16].replace("T", " ")]
    return "| " + " | ".join(cells) + " |"


def usage_markdown(report: dict, lang: str = "en") -> str:
    """The report as a Markdown table (names escaped), one line per user, then anonymous and the total."""
    w = WORDS.get(lang, WORDS["en"])
    lines = ["| " + " | ".join(w["head"]) + " |", "|" + " --- |" * len(w["head"])]
    for row in report["users"]:
        lines.append(_line(md_escape(row["user"]) + (f" ({w['admin']})" if row["admin"] else ""), row, w["never"]))
    anonymous = report["anonymous"]
    if anonymous["owners"]:
        lines.append(_line(f"{w['browsers']} ({anonymous['owners']:,})", anonymous, w["never"]))
    lines.append(_line(f"**{w['total']}**", report["totals"], w["never"]))
    return "\n".join(lines)


def panel_update(ctx, accounts, request: gr.Request | None):
    """(panel visibility, table): shown with the table to an admin; hidden and empty for everyone else."""
    user = getattr(request, "username", None) if request is not None else None
    if not accounts.is_admin(user):
        return gr.update(visible=False), ""
    return gr.update(visible=True), usage_markdown(usage_report(ctx.store, accounts), lang_of(request))


def panel(ctx, demo: gr.Blocks, private: dict) -> None:
    """Inside `demo`'s layout: the admins' "Usage per user" panel, filled when the page loads and on Refresh.

    Added only when the page has accounts (`ctx.accounts`); hidden until an admin's page loads.
    """
    accounts = getattr(ctx, "accounts", None)
    if accounts is None or not accounts.enabled:
        return
    with gr.Accordion(L("admin.usage"), open=False, visible=False, elem_id="admin-usage") as box:
        table = gr.Markdown("", elem_id="admin-usage-table", sanitize_html=True)
        refresh = gr.Button(L("admin.refresh"), size="sm", elem_id="admin-usage-refresh")

    def update(request: gr.Request):
        return panel_update(ctx, accounts, request)

    demo.load(update, None, [box, table], show_progress="hidden", **private)
    refresh.click(update, None, [box, table], show_progress="hidden", **private)
