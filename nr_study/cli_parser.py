"""The argument parser every `nr-study` subcommand uses. Its own module so that a command (the analysis
included) imports it without importing nr_study.cli, the table that imports every command."""
from __future__ import annotations

import argparse

from nr_study.errors import ConfigError


class CommandParser(argparse.ArgumentParser):
    """argparse for a subcommand: a bad command line is one `error:` line naming the command (exit 2 via
    main), not argparse's usage block."""

    def error(self, message):
        raise ConfigError(f"{self.prog}: {message} (see {self.prog} --help)")
