"""Who is asking: the account a request runs as (studio mode), or the one local user of a single-user app."""
from __future__ import annotations

from dataclasses import dataclass

LOCAL = "local"  # the user of an app that runs on 127.0.0.1 without accounts; reserved in studio mode


@dataclass(frozen=True)
class Caller:
    """A normalised account name and whether it may see and change everything (admins; the local user)."""

    name: str
    admin: bool = False

    def can_see(self, owner: str, shared: bool = False) -> bool:
        """May this caller read something owned by `owner` (studio-shared things are readable by everyone)?"""
        return self.admin or owner == self.name or bool(shared)

    def can_change(self, owner: str) -> bool:
        """May this caller change or delete something owned by `owner`?"""
        return self.admin or owner == self.name
