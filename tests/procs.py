"""Child processes for tests that signal them: start them with known signal dispositions.

A shell starts background jobs (and `nohup`, some CI runners start everything) with SIGINT ignored, and a
child inherits that: a test that sends Ctrl-C would then test the runner, not nr-study. `with_signals(cmd)`
runs `cmd` through a tiny Python wrapper that sets SIGINT/SIGTERM to the default (or to ignored, on purpose)
and then execs `cmd` in the same process (same pid, same process group).
"""
from __future__ import annotations

import sys

_WRAPPER = ("import os, signal, sys; "
            "h = signal.SIG_IGN if sys.argv[1] == 'ignore' else signal.SIG_DFL; "
            "signal.signal(signal.SIGINT, h); signal.signal(signal.SIGTERM, signal.SIG_DFL); "
            "os.execvp(sys.argv[2], sys.argv[2:])")


def with_signals(cmd: list[str], sigint: str = "default") -> list[str]:
    """`cmd` started with SIGTERM at its default and SIGINT at `sigint` ('default' or 'ignore')."""
    assert sigint in ("default", "ignore"), sigint
    return [sys.executable, "-c", _WRAPPER, sigint, *map(str, cmd)]
