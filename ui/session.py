"""Who is asking, for every event: the account Gradio's login put on the request, never a form field.

Without accounts (the app on 127.0.0.1) every request is the one local user. In studio mode (--listen, --share)
Gradio's `auth=` has checked the session cookie before any handler runs; `request.username` is the name that
logged in, and the engine maps it to a current account on every call (a removed user loses access at once).
Headers (`Host`, `X-Forwarded-For`) and the client address play no part (GR-7).
"""
from __future__ import annotations

import gradio as gr

from engine.core.caller import LOCAL


def user_of(engine, request: gr.Request | None) -> str:
    """The normalised account name for this request ("local" without accounts); gr.Error when nobody is logged
    in or the account is gone."""
    if getattr(engine, "studio", None) is None:
        return LOCAL
    name = getattr(request, "username", None) if request is not None else None
    if not name:
        raise gr.Error("Log in first: this Stylebooth has user accounts.")
    try:
        return engine.caller(name).name
    except ValueError as e:  # AccessDenied: removed account
        raise gr.Error(str(e)) from None


def is_admin(engine, request: gr.Request | None) -> bool:
    """True for studio admins (checked against the database on every call) and for the local user."""
    if getattr(engine, "studio", None) is None:
        return True
    try:
        return engine.caller(user_of(engine, request)).admin
    except gr.Error:
        return False
