"""The command: its flags, which row families run (SECTIONS, in order), the thread count, the table with its
goal column, and the --json file (checked before minutes of measuring, written whole)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from nr_study.bench.layers import bench_layer, bench_nesting
from nr_study.bench.makespan import bench_sweep
from nr_study.bench.heads import bench_heads
from nr_study.bench.recyclers import bench_recyclers
from nr_study.bench.runs import bench_runs
from nr_study.bench.settings import Sizes
from nr_study.bench.steps import bench_steps, bench_widths
from nr_study.bench.surgery import bench_surgery
from nr_study.config import MAX_THREADS
from nr_study.errors import UserError
from nr_study.files import check_writable_dir, write_json_atomic


# the row families, in the order they run (--only picks among these keys)
SECTIONS = {"steps": bench_steps, "widths": bench_widths, "recyclers": bench_recyclers, "heads": bench_heads,
            "surgery": bench_surgery,
            "layer": bench_layer,
            "nesting": bench_nesting,
            "sweep": bench_sweep, "runs": bench_runs}


def status(r: dict) -> str:
    """The goal column: met / MISSED, n/a for a row with a goal but no number, - for an info row."""
    if r["goal"] is None:
        return "-"
    if r["value"] is None:
        return "n/a"
    return "met" if r["value"] <= r["goal"] else "MISSED"


def format_table(rows: list[dict]) -> str:
    """The rows as the aligned table printed on stdout."""
    def val(r):
        if r["value"] is None:
            return "null"
        v = r["value"]
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4f}" if abs(v) < 0.1 else f"{v:.3f}"

    w = max([len(r["name"]) for r in rows] + [4])
    lines = [f"{'name':<{w}}  {'value':>9}  {'goal':>6}  {'unit':<6} {'goal met':<8}  detail"]
    for r in rows:
        goal = "-" if r["goal"] is None else f"≤{r['goal']:g}"
        lines.append(f"{r['name']:<{w}}  {val(r):>9}  {goal:>6}  {r['unit']:<6} {status(r):<8}  {r['detail']}")
    return "\n".join(lines)


def pick_threads(device: torch.device) -> int:
    """All CPUs available, or 1 on a CPU run when the machine is already busy (load ≥ CPUs / 2): several
    OpenMP threads on oversubscribed cores wait on each other at every barrier, which swamps any ratio in noise
    (and the load of a shared machine changes during a run)."""
    from nr_study.train import available_cpus

    cpus = available_cpus()
    if device.type == "cpu" and cpus > 1 and os.getloadavg()[0] >= cpus / 2:
        return 1
    return cpus


def run_bench(mode: str = "full", device: str = "cpu", only: Optional[list[str]] = None,
              threads: Optional[int] = None, log=None) -> list[dict]:
    """Every section (or `only` those), in order, progress on `log`; torch's threads reset after each."""
    log = log or sys.stderr  # read at call time: a stream replaced after import must not stick
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: CUDA is not available on this machine; allowed: cpu")
        torch.backends.cudnn.benchmark = True
    threads = threads or pick_threads(dev)
    torch.set_num_threads(threads)
    sz = Sizes(mode, dev)
    rows: list[dict] = []
    for key, fn in SECTIONS.items():
        if only and key not in only:
            continue
        t0 = time.perf_counter()
        print(f"[bench] {key} ...", file=log, flush=True)
        new = fn(sz, dev)
        torch.set_num_threads(threads)  # train() / Ray may have changed it
        print(f"[bench] {key} done in {time.perf_counter() - t0:.1f}s", file=log, flush=True)
        rows.extend(new)
    return rows


def cli_main(argv) -> int:
    """`nr-study bench [--quick] [--device cuda] [--only S] [--threads N] [--json PATH]`: bad flags refused
    before anything is measured."""
    from nr_study.cli_parser import CommandParser

    ap = CommandParser(prog="nr-study bench", description="Measure NR's overheads against plain "
                                 "training, as ratios timed alternately in one process.")
    ap.add_argument("--quick", action="store_true", help="a ≤ 2-minute version of every row: fewer "
                    "repetitions, smaller shapes, a 4-trial sweep")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: smallest shapes, no sweep
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cuda: the GPU variants (channels_last, bf16 autocast) + images/s rows")
    ap.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the rows as JSON")
    ap.add_argument("--only", action="append", choices=list(SECTIONS), default=None,
                    help="run only these sections (repeatable)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs available, or "
                    "1 on a CPU run when the load average already reaches half the CPU count)")
    args = ap.parse_args(list(argv))
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        raise UserError(f"--threads {args.threads}: not allowed; allowed: an integer from 1 to {MAX_THREADS}")
    json_path = _json_target(args.json_path) if args.json_path else None  # refused now, not after the bench
    tiny = args.tiny or os.environ.get("NR_STUDY_BENCH_TINY") == "1"
    mode = "tiny" if tiny else "quick" if args.quick else "full"
    t0 = time.perf_counter()
    rows = run_bench(mode, args.device, args.only, args.threads)
    print(format_table(rows))
    met = sum(status(r) == "met" for r in rows)
    missed = [r["name"] for r in rows if status(r) == "MISSED"]
    print(f"\n{met} goal(s) met, {len(missed)} missed{': ' + ', '.join(missed) if missed else ''}; "
          f"mode {mode}, device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.perf_counter() - t0:.0f}s")
    if json_path:
        write_json_atomic(json_path, rows, indent=1)
    return 0


def _json_target(path: str) -> Path:
    """The --json file, checked before a bench of several minutes: its folder made and writable, not a folder."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"--json {path}: is a folder; allowed: a file path (its folder is made if missing)")
    check_writable_dir(p.parent, f"--json {path}: its folder")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p

