"""The one error type for user mistakes.

A ``UserError`` is printed as a single line on stderr (message, then a hint) and the process
exits with code 2. Anything else that escapes a command is a runtime failure: exit 1.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or bad usage: printed as one line, exit code 2."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message
