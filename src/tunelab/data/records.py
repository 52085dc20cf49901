"""The one canonical record every reader produces and every later stage consumes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class Record:
    """One training example.

    A chat example has ``messages`` (system/user/assistant/tool turns, in order) and
    optionally ``tools`` (a JSON string describing callable tools). A plain-text example
    for continued pre-training has ``text`` and no messages. ``label`` is set for
    classification data. ``id`` is ``"<file name>:<row index>"`` so every stage can point
    back at the row it came from.
    """

    id: str
    messages: tuple[Message, ...] = ()
    text: str | None = None
    tools: str | None = None
    label: str | None = None
    weight: float = 1.0
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_text(self) -> bool:
        return self.text is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Reject:
    """A row that could not be used, with the reason. Written to ``rejects.jsonl``."""

    source: str  # file path
    row: int  # 0-based row index in the file (line number - 1 for JSONL)
    reason: str  # short machine-friendly reason, e.g. "missing_field"
    detail: str  # one human line: what is wrong and how to fix it
    stage: str = "read"  # read | tokenize
    raw: str = ""  # the row (truncated to 500 characters)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
