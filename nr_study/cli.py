"""`nr-study` entry point: dispatches to each subcommand's own `cli_main(argv) -> int`.

Subcommands live next to the code they drive, so this file stays a table. A UserError anywhere becomes
`error: ...` on stderr (one line per problem) and its exit code (2 bad input, 1 a fault while running); Ctrl-C
exits 130. Any other exception is a bug: one line naming it, the traceback only with NR_STUDY_TRACEBACK=1.
"""
from __future__ import annotations

import importlib
import os
import sys
import traceback

from nr_study.cli_parser import CommandParser
from nr_study.errors import Terminated, UserError, one_line

COMMANDS = {
    "train": ("nr_study.train", "train one configuration (YAML) with MLflow tracking"),
    "sweep": ("nr_study.sweep", "run a search space (YAML) on Ray Tune, one MLflow run per trial"),
    "tables": ("nr_study.analysis.tables", "regenerate the paper's tables from MLflow runs"),
    "plots": ("nr_study.analysis.plots", "regenerate figures and trade-off plots from MLflow runs"),
    "bench": ("nr_study.bench", "measure NR's overheads side by side"),
    "export": ("nr_study.export", "write a run's final model to a folder (nr_study.load_model loads it)"),
}
__all__ = ["COMMANDS", "main", "CommandParser"]  # CommandParser's home is nr_study.cli_parser; importable here too


def _usage() -> str:
    lines = ["usage: nr-study COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `nr-study COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.cli_main(rest) or 0)
    except UserError as exc:
        lines = [ln for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
        for ln in lines:  # several bad fields: one line each
            print(f"error: {ln}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        term = isinstance(exc, Terminated)
        print("error: terminated (SIGTERM)" if term else "error: interrupted", file=sys.stderr)
        return 143 if term else 130
    except Exception as exc:  # a bug, not a user error: still one line unless asked for the traceback
        if os.environ.get("NR_STUDY_TRACEBACK"):
            traceback.print_exc()
        print(f"error: internal error in nr-study {name}: {type(exc).__name__}: {one_line(exc)} "
              f"(set NR_STUDY_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
