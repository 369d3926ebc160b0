"""Paired comparisons of a `pair_with: BL` sweep's finished runs, as markdown: per seed, every arm's final test
error, its BL at equal epochs (nr.pair_run) and, under reset_epochs, its BL at equal training compute
(nr.pair_run_compute); then mean [95 % t interval] (n = seeds) of every arm − its BL at each basis and of every
pair of arms (same seed), with the training compute each used. Reads MLflow only; a seed that lacks one side of
a comparison is left out of that comparison (its n says so).

    python results/regime2/paired.py --experiment nr-regime2 [--tracking-uri URI ...]

More than one --tracking-uri reads the experiment from each store (arms run as separate sweeps in separate run
folders, e.g. a control trained beside the main sweep) and pairs them by seed as if they were one store's.
"""
import argparse
import itertools
import sys

from nr_study.analysis.runs import RunStore
from nr_study.analysis.stats import mean_std, t_interval
from nr_study.names import TAG_CELL, TAG_PAIR_RUN, TAG_PAIR_RUN_COMPUTE, TAG_PAIRED_BASELINE


def rejuvenated_at(run) -> str:
    """The epoch whose row first counts a rejuvenation ('-': never)."""
    return next((str(s) for s, v in run.history("rejuvenations") if v >= 1), "-")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--tracking-uri", action="append", default=None)
    args = ap.parse_args()
    runs = [r for uri in args.tracking_uri or [None] for r in RunStore(uri, [args.experiment]).finished()]
    by_id = {r.run_id: r for r in runs}
    trials = [r for r in runs if r.tags.get(TAG_PAIRED_BASELINE) != "true" and r.tags.get(TAG_CELL)]
    if not trials:
        sys.exit(f"error: experiment {args.experiment}: no finished trial")
    err = lambda r: r.metrics["final_test_err"]  # noqa: E731
    flops = lambda r: r.metrics.get("train_flops", float("nan"))  # noqa: E731
    cells = sorted({r.tags[TAG_CELL] for r in trials})
    seeds = sorted({r.get("seed") for r in trials}, key=lambda s: int(s))
    at = {(r.tags[TAG_CELL], r.get("seed")): r for r in trials}

    print(f"Final test error (%) per seed; in brackets the epoch of the rejuvenation, the epochs trained and the "
          f"training compute relative to the equal-epochs BL. Experiment `{args.experiment}`.\n")
    print("| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---|" + "---:|" * len(seeds))
    rows = {}
    for c in cells:
        line = []
        for s in seeds:
            r = at.get((c, s))
            bl = by_id.get(r.tags.get(TAG_PAIR_RUN)) if r else None
            if r is None:
                line.append("–")
                continue
            rel = f", {flops(r) / flops(bl):.2f}×" if bl else ""  # an arm run without pair_with has no BL
            line.append(f"{err(r):.2f} (rej {rejuvenated_at(r)}, {int(r.metrics.get('total_epochs', 0))} ep{rel})")
            for basis, tag in (("equal epochs", TAG_PAIR_RUN), ("equal compute", TAG_PAIR_RUN_COMPUTE)):
                b = by_id.get(r.tags.get(tag))
                if b is not None:
                    rows.setdefault((c, basis), {})[s] = (err(r), err(b), flops(r) / flops(b))
        print(f"| {c} | " + " | ".join(line) + " |")
    for basis in ("equal epochs", "equal compute"):
        bls = {}
        for (c, b), per_seed in rows.items():
            if b == basis:
                for s, (_, e_bl, _) in per_seed.items():
                    bls.setdefault(s, set()).add(round(e_bl, 4))
        if bls:
            print(f"| BL, {basis} | " + " | ".join("/".join(f"{e:.2f}" for e in sorted(bls.get(s, ()))) or "–"
                                                   for s in seeds) + " |")

    print("\nPaired differences, points of final test error, mean [95 % t interval] (n = seeds); negative: the "
          "first is better.\n")
    print("| comparison | basis | Δ (n) | compute, first / second |")
    print("|---|---|---|---|")
    for (c, basis), per_seed in sorted(rows.items()):
        d = t_interval([e - b for e, b, _ in per_seed.values()])
        m, _, _ = mean_std([x for _, _, x in per_seed.values()])
        print(f"| {c} − BL | {basis} | {d.text()} | {m:.2f}× |")
    for a, b in itertools.combinations(cells, 2):
        common = [s for s in seeds if (a, s) in at and (b, s) in at]
        if common:
            d = t_interval([err(at[(a, s)]) - err(at[(b, s)]) for s in common])
            m, _, _ = mean_std([flops(at[(a, s)]) / flops(at[(b, s)]) for s in common])
            print(f"| {a} − {b} | same seed | {d.text()} | {m:.2f}× |")
            bl = {s: (by_id.get(at[(a, s)].tags.get(TAG_PAIR_RUN)), by_id.get(at[(b, s)].tags.get(TAG_PAIR_RUN)))
                  for s in common}
            bl = {s: (x, y) for s, (x, y) in bl.items() if x is not None and y is not None and x is not y}
            if bl:  # the two arms' own BLs differ (a swept key the BL reads too): compare those as well
                d = t_interval([err(x) - err(y) for x, y in bl.values()])
                m, _, _ = mean_std([flops(x) / flops(y) for x, y in bl.values()])
                print(f"| BL of {a} − BL of {b} | same seed | {d.text()} | {m:.2f}× |")


if __name__ == "__main__":
    main()
