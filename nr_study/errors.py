"""Errors a user can fix. The CLI prints them as one line each (`error: ...`) — never a traceback.

Exit codes (`nr-study`): 2 bad input (config, paths, checkpoint, model/data mismatch: fix and rerun), 1 a fault
while running (divergence, tracking server lost, disk full: the checkpoint is intact, rerun with --resume),
130 interrupted (Ctrl-C; 143 for SIGTERM), the run ends KILLED.
"""


class UserError(Exception):
    """Bad input: the message names the field/file, the value, and what is allowed."""

    exit_code = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, `kill PID`): handled like Ctrl-C — runs end KILLED — but exit 143."""


class ConfigError(UserError):
    """A bad configuration or search-space value."""


class UnsupportedGraphError(UserError):
    """A model graph the channel analysis cannot reason about; names the node and the reason."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read, is not ours, or belongs to another configuration."""


class FaultError(UserError):
    """A fault while running (not bad input): one clear line, exit code 1, the last checkpoint kept."""

    exit_code = 1


class TrackingError(FaultError):
    """The MLflow tracking store/server cannot be reached or refused a call."""


class DiskFullError(FaultError):
    """Too little free space where a sweep writes (its folder, the tracking store): nothing more can be saved."""


class CheckpointWriteError(FaultError):
    """A checkpoint could not be written (disk full, folder gone); the previous one is intact."""


def one_line(text, limit: int = 400) -> str:
    """The first non-empty line of `text`, shortened to `limit` characters (for wrapping foreign errors)."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    s = lines[0] if lines else ""
    return s if len(s) <= limit else s[: limit - 3] + "..."
