"""The Studio tab (studio mode, admins only): accounts, monthly free generations, credits and a usage report.

Hiding the tab from non-admins is only for looks: every event checks the caller's role on the server, through the
engine's studio (GR-9), so a non-admin who calls an event directly (its fn_index is in /config) is refused.
Passwords typed here go straight to the hash; they are never echoed back, logged or shown.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from .session import user_of

USER_COLUMNS = ["name", "role", "monthly_free", "free_left", "credits", "renews_on", "locked_s"]
USAGE_COLUMNS = ["user", "free_used", "credits_spent", "credits_added", "refunds", "entries"]
NOT_ADMIN = "Only a studio admin can use the Studio tab."


class StudioHandlers:
    """What the Studio tab's buttons do; each takes the caller's name (from the request) and checks the role."""

    def __init__(self, engine):
        self.engine = engine

    def _admin(self, user: str):
        studio = getattr(self.engine, "studio", None)
        if studio is None:
            raise gr.Error("The Studio tab needs studio mode (start with --listen or --share).")
        try:
            caller = self.engine.caller(user)
            studio.require_admin(caller)
        except ValueError:
            raise gr.Error(NOT_ADMIN) from None
        return studio, caller

    def users(self, user: str) -> list[list[Any]]:
        studio, caller = self._admin(user)
        return [[r[k] for k in USER_COLUMNS] for r in studio.users(caller)]

    def usage(self, user: str) -> list[list[Any]]:
        studio, caller = self._admin(user)
        return [[r[k] for k in USAGE_COLUMNS] for r in studio.usage(caller)]

    def act(self, user: str, action: str, name: str, value: Any = None, role: str = "user") -> str:
        """add / remove / quota / credits / passwd; returns a status line (never the password)."""
        studio, caller = self._admin(user)
        name = (name or "").strip()
        if not name:
            raise gr.Error("Give a user name.")
        try:
            if action == "add":
                u = studio.add_user(caller, name, value or "", "admin" if role == "admin" else "user")
                return f"Added {u.role} **{u.name}**."
            if action == "remove":
                studio.remove_user(caller, name)
                return f"Removed **{name}**; their styles stay (admins still see them)."
            if action == "passwd":
                studio.set_password(caller, name, value or "")
                return f"Password of **{name}** changed; the account is unlocked."
            if action == "quota":
                b = studio.set_monthly_free(caller, name, value)
                return f"**{b.user}**: {b.monthly_free} free generations a month ({b.free_left} left until " \
                       f"{b.renews_on})."
            if action == "credits":
                b = studio.add_credits(caller, name, value)
                return f"**{b.user}**: {b.credits} credits."
        except ValueError as e:  # ConfigError & co.: plain words
            raise gr.Error(str(e)) from None
        raise KeyError(action)  # a wiring bug


@dataclass
class StudioTab:
    handlers: StudioHandlers
    components: dict[str, Any]
    visible_for: Any  # fn(request) -> gr.Tab update: shown to admins only (looks; the events check the role)
    refresh: Any  # fn(request) -> (users table, usage table)


def build_studio_tab(engine) -> StudioTab:
    """Lay out the Studio tab; call inside a `gr.Tab`."""
    h = StudioHandlers(engine)
    c: dict[str, Any] = {}
    c["status"] = gr.Markdown(elem_id="studio-status")
    c["users"] = gr.Dataframe(headers=USER_COLUMNS, label="Users", interactive=False, elem_id="studio-users")
    with gr.Row():
        c["name"] = gr.Textbox(label="User name", elem_id="studio-name")
        c["password"] = gr.Textbox(label="Password (new users, or a new password)", type="password",
                                   elem_id="studio-password")
        c["role"] = gr.Radio([("User", "user"), ("Admin", "admin")], value="user", label="Role")
    with gr.Row():
        add = gr.Button("Add user", size="sm", elem_id="studio-add")
        passwd = gr.Button("Set password", size="sm", elem_id="studio-passwd")
        remove = gr.Button("Remove user", size="sm", variant="stop", elem_id="studio-remove")
    with gr.Row():
        c["number"] = gr.Number(label="Number", value=0, precision=0, minimum=0, elem_id="studio-number")
        quota = gr.Button("Set monthly free generations", size="sm", elem_id="studio-quota")
        credits = gr.Button("Add credits", size="sm", elem_id="studio-credits")
    refresh = gr.Button("Refresh", size="sm", elem_id="studio-refresh")
    c["usage"] = gr.Dataframe(headers=USAGE_COLUMNS, label="Usage (from the ledger)", interactive=False,
                              elem_id="studio-usage")

    def tables(request: gr.Request):
        user = user_of(engine, request)
        return h.users(user), h.usage(user)

    def action(kind: str):
        def fn(request: gr.Request, name, password, role, number):
            value = password if kind in ("add", "passwd") else (int(number) if number is not None else None)
            status = h.act(user_of(engine, request), kind, name, value, role)
            return (status, "", *tables(request))  # the password box is cleared, never echoed
        return fn

    def visible_for(request: gr.Request):
        studio = getattr(engine, "studio", None)
        try:
            ok = studio is not None and engine.caller(user_of(engine, request)).admin
        except (gr.Error, ValueError):
            ok = False
        return gr.Tab(visible=ok)

    priv = dict(api_visibility="private", queue=False)
    outs = [c["status"], c["password"], c["users"], c["usage"]]
    for button, kind in ((add, "add"), (passwd, "passwd"), (remove, "remove"), (quota, "quota"),
                         (credits, "credits")):
        button.click(action(kind), [c["name"], c["password"], c["role"], c["number"]], outs, **priv)
    refresh.click(tables, None, [c["users"], c["usage"]], **priv)
    return StudioTab(h, c, visible_for, tables)
