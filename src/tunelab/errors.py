"""User-facing errors.

Anything the *user* can fix (a bad config key, a missing file, an impossible option
combination) is raised as :class:`UserError`. The CLI prints its message on one line and
exits with status 2, without a traceback. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations

import importlib
from types import ModuleType


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


def require(module: str, *, extra: str, verb: str | None = None, package: str | None = None) -> ModuleType:
    """Import and return ``module``, a dependency of one of tunelab's extras (``pip install 'tunelab[EXTRA]'``).

    When it is not installed, raise the one-line ``tunelab sweep needs optuna: pip install 'tunelab[sweep]'``:
    ``verb`` names what needs it (default ``tunelab EXTRA``), ``package`` the distribution (default: the
    module's top-level name).
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        message = f"{verb or 'tunelab ' + extra} needs {package or top}: pip install 'tunelab[{extra}]'"
        missing = getattr(err, "name", None)
        if not isinstance(err, ModuleNotFoundError) or (missing is not None and missing.split(".")[0] != top):
            message += f" (importing {module} failed: {first_line(err)})"  # installed, but broken
        raise UserError(message) from None
