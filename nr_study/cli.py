"""`nr-study` entry point: dispatches to each subcommand's own `cli_main(argv) -> int`.

Subcommands live next to the code they drive, so this file stays a table. A UserError anywhere becomes
`error: ...` on stderr (one line per problem) and its exit code (2 bad input, 1 a fault while running); Ctrl-C
exits 130. Any other exception is a bug: one line naming it, the traceback only with NR_STUDY_TRACEBACK=1.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from nr_study.errors import ConfigError, Terminated, UserError, one_line

COMMANDS = {
    "train": ("nr_study.train", "train one configuration (YAML) with MLflow tracking"),
    "sweep": ("nr_study.sweep", "run a search space (YAML) on Ray Tune, one MLflow run per trial"),
    "tables": ("analysis.tables", "regenerate the paper's tables from MLflow runs"),
    "plots": ("analysis.plots", "regenerate figures and trade-off plots from MLflow runs"),
    "bench": ("nr_study.bench", "measure NR's overheads side by side"),
    "export": ("nr_study.export", "write a run's final model to a folder (nr_study.load_model loads it)"),
}


class CommandParser(argparse.ArgumentParser):
    """argparse for a subcommand: a bad command line is one `error:` line naming the command (exit 2 via
    main), not argparse's usage block."""

    def error(self, message):
        raise ConfigError(f"{self.prog}: {message} (see {self.prog} --help)")


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
