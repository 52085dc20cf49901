"""User-facing errors.

Anything the *user* can fix (a bad config key, a missing file, an impossible option
combination) is raised as :class:`UserError`. The CLI prints its message on one line and
exits with status 2, without a traceback. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix. ``str(err)`` is the whole one-line message.

    Write messages as ``<where>: <what is wrong> (got <value>). <how to fix it>``.
    """

    def __init__(self, message: str):
        super().__init__(message.strip())


class ConfigError(UserError):
    """One or more problems in a config; each problem is one line of the message."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        head = f"{source}: {len(problems)} problem(s) in the config"
        super().__init__("\n".join([head] + [f"  - {p}" for p in problems]))


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (without a final full stop), or its type's name: for
    quoting a library's error inside a one-line :class:`UserError`."""
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__
