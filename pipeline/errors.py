"""User-facing errors: one line, exit code 2, no traceback (the CLI catches them)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a bad setting that the user can fix. The message must say what and where."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration value is missing, unknown or invalid."""


def where(file: object, row: int | None = None, column: str | None = None) -> str:
    """Format a location as 'FILE, row R, column 'C'' for error messages (rows are 1-based, header not counted)."""
    parts = [str(file)]
    if row is not None:
        parts.append(f"row {row}")
    if column is not None:
        parts.append(f"column '{column}'")
    return ", ".join(parts)
