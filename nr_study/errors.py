"""Errors a user can fix. The CLI prints them as one line and exits 2 — never a traceback."""


class UserError(Exception):
    """Bad input: the message names the field/file, the value, and what is allowed."""

    exit_code = 2


class ConfigError(UserError):
    """A bad configuration or search-space value."""


class UnsupportedGraphError(UserError):
    """A model graph the channel analysis cannot reason about; names the node and the reason."""
