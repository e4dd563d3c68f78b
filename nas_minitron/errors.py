"""The one exception type for bad user input; the CLI turns it into one line and exit code 2."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """Bad input from the user: the message names the offending value and what would be valid."""
