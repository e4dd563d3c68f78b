"""The one exception type for bad user input, and how other errors are quoted in its messages.

The CLI turns a `UserError` into one line and exit code 2. It is deliberately not a `ValueError`: an
`except ValueError` written for a library's errors must never relabel (or swallow) a user error.
"""

from __future__ import annotations

__all__ = ["UserError", "first_line"]


class UserError(Exception):
    """Bad input from the user: the message names the offending value and what would be valid."""


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first line of `err`'s message (its type name when the message is empty), cut to `limit` characters."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line[:limit] if limit is not None else line
