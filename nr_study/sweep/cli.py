"""`nr-study sweep FILE [--address ADDR] [--tracking-uri URI] [--resume [DIR]] [--dry-run] [--smoke] [--set KEY=VALUE
...]`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nr_study.errors import UserError
from nr_study.files import read_text


def build_parser() -> argparse.ArgumentParser:
    from nr_study.cli_parser import CommandParser

    ap = CommandParser(
        prog="nr-study sweep",
        description="Run a search space (search_spaces/*.yaml) on Ray Tune; one MLflow parent run per sweep, "
                    "one child run per trial.")
    ap.add_argument("file", help="search-space YAML file")
    ap.add_argument("--address", default=None,
                    help="Ray cluster: 'auto' (the cluster this machine is a node of) or HOST:PORT (with "
                         "RAY_AUTH_MODE=token, see the README's cluster recipe); 'ray://HEAD:10001' needs the "
                         "ray[client] extra, not installed by make setup (default: an embedded local Ray sized to "
                         "this machine)")
    ap.add_argument("--tracking-uri", default=None,
                    help="MLflow server URI (default: start a local mlflow server on 127.0.0.1 backed by "
                         "<runs>/mlflow.db and stop it at the end)")
    ap.add_argument("--resume", nargs="?", const=True, default=None, metavar="SWEEP_DIR",
                    help="finish an interrupted sweep (default: the latest one of this name under <runs>/sweeps)")
    ap.add_argument("--dry-run", action="store_true", help="print the expanded trials and resources; run nothing")
    ap.add_argument("--smoke", action="store_true",
                    help="run every trial for a few steps on synthetic data of its dataset's shape, on this machine, "
                         "through Ray, MLflow, a forced worker restart, --resume and the tables, before the real "
                         "launch: one line per trial, exit 2 if any failed (with --dry-run: what it would run)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a search-space key (e.g. num_samples=4, space.nr.tr=[0.3]) or a base config "
                         "key (e.g. train.epochs=2); repeatable")
    ap.add_argument("--runs", default=None, help="run folder (default: $NR_STUDY_RUNS or ./runs)")
    ap.add_argument("--verbose", type=int, default=1, help="Ray Tune verbosity 0-3 (default 1: status table)")
    return ap


def cli_main(argv) -> int:
    args = build_parser().parse_args(list(argv))
    if not 0 <= args.verbose <= 3:
        raise UserError(f"--verbose {args.verbose}: not allowed; allowed: 0, 1, 2 or 3 (Ray Tune's verbosity)")
    from nr_study.sweep.space import dry_run_text, load_search_space

    path = Path(args.file)
    if args.smoke:
        return _smoke(args, path)
    space = load_search_space(path, args.overrides)
    if args.dry_run:
        from nr_study.sweep.ray_setup import cluster_resources

        print(dry_run_text(space, cluster_resources(args.address)))
        return 0
    if args.resume and args.overrides:
        raise UserError("--resume continues the sweep as it was launched; --set is not allowed with it")
    from nr_study.sweep.runner import run_sweep

    summary = run_sweep(space, source_text=read_text(path, "search space file"), address=args.address,
                        tracking_uri=args.tracking_uri, resume=args.resume, runs=args.runs, verbose=args.verbose)
    if summary.get("interrupted"):
        return 143 if summary.get("terminated") else 130  # SIGTERM / Ctrl-C
    errored = sum(1 for t in summary.get("trials", []) if t.get("error"))
    expected, finished = summary.get("expected", 0), summary.get("finished", 0)
    if errored or finished < expected:
        for t in [t for t in summary.get("trials", []) if t.get("error")][:20]:
            print(f"trial {t.get('trial_id') or '?'} ({t.get('name')}) errored: {t.get('cause')}", file=sys.stderr)
        if summary.get("fault"):  # the cause of them all (a full disk), with the command that continues
            print(f"error: {summary['fault']}", file=sys.stderr)
            return 1
        # Exit 0 only when every configuration of the search space finished (ASHA's early stops count).
        why = f" ({errored} errored; see the table above and the MLflow runs)" if errored else ""
        print(f"error: {max(expected - finished, errored)} of {expected} configuration(s) did not finish{why}; "
              f"continue the sweep with: {summary.get('resume_command')}", file=sys.stderr)
        return 1
    return 0


def _smoke(args, path: Path) -> int:
    """--smoke (nr_study.sweep.smoke_run): on this machine, into a store of its own, resuming itself."""
    from nr_study.errors import ConfigError

    for flag, value in (("--address", args.address), ("--tracking-uri", args.tracking_uri),
                        ("--resume", args.resume)):
        if value:
            raise ConfigError(f"--smoke with {flag}: not allowed; the smoke runs on this machine's own Ray, logs to "
                              f"an MLflow store of its own (<runs>/smoke/, never the tables' store) and runs "
                              f"--resume itself")
    from nr_study.sweep.smoke_run import describe, prepare, run_smoke

    if args.dry_run:
        from nr_study.sweep.space import dry_run_text

        sm = prepare(path, args.overrides, runs=args.runs)
        print("\n".join(describe(sm)))
        print(dry_run_text(sm.smoke))
        return 0
    return run_smoke(path, args.overrides, runs=args.runs)
