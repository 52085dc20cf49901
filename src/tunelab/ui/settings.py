"""Options of ``tunelab ui`` and the rule on where it may listen.

The server binds the loopback interface by default. Any other address is reachable from the network,
so it needs a login (``--auth USER:PASS`` or ``--auth-file F``); there is never a public share link.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import UserError

__all__ = ["UiOptions", "check_bind", "read_auth"]


class UiOptions(BaseModel):
    """``tunelab ui``."""

    model_config = ConfigDict(extra="forbid")

    workspace: str = Field(".", description="The folder the UI works in: data files, configs/ and runs/ are read and "
                           "written there, and no path outside it is accepted.")
    host: str = Field("127.0.0.1", description="Address to listen on. Anything but loopback needs --auth or --auth-file.")
    port: int = Field(7860, ge=1, le=65535, description="Port to listen on.")
    auth: str | None = Field(None, description="Require a login, USER:PASS.", json_schema_extra={"cli": {"metavar": "USER:PASS"}})
    auth_file: str | None = Field(None, description="Require a login: a file of USER:PASS lines (one account per line).")
    lang: Literal["zh", "en"] = Field("en", description="Label language of the page opened at / (both are served: "
                                      "/zh and /en, with a link to switch).")


def is_loopback(host: str) -> bool:
    """Whether ``host`` names the loopback interface (127.0.0.0/8, ::1 or localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_auth(o: UiOptions) -> list[tuple[str, str]]:
    """The accounts of ``--auth`` / ``--auth-file`` as (user, password) pairs; [] without a login."""
    if o.auth and o.auth_file:
        raise UserError("--auth and --auth-file are both given. Choose one")
    lines: list[tuple[str, str]] = []
    if o.auth_file:
        path = Path(o.auth_file)
        if not path.is_file():
            raise UserError(f"--auth-file: {path} not found. Name a file of USER:PASS lines")
        entries = [(f"{path} line {i}", t.strip()) for i, t in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                   if t.strip() and not t.strip().startswith("#")]
    else:
        entries = [("--auth", o.auth)] if o.auth else []
    for where, text in entries:
        user, sep, password = text.partition(":")
        if not sep or not user or not password:
            raise UserError(f"{where}: expected USER:PASS with both parts non-empty (got {len(text)} characters "
                            "without that shape). Fix it")
        lines.append((user, password))
    if o.auth_file and not lines:
        raise UserError(f"--auth-file: {o.auth_file} holds no USER:PASS line. Add one")
    return lines


def check_bind(o: UiOptions) -> list[tuple[str, str]]:
    """The accounts to require; refuses a non-loopback ``--host`` without a login (one line)."""
    accounts = read_auth(o)
    if not is_loopback(o.host) and not accounts:
        raise UserError(f"--host {o.host}: listening beyond this machine without a login would let anyone on the "
                        "network train and read your data. Add --auth USER:PASS or --auth-file F, or use --host 127.0.0.1")
    return accounts
