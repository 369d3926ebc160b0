"""The paired effect of nr.carry_momentum in search_spaces/carry_momentum.yaml's runs: per seed, final test
error with momentum carried across the rejuvenation minus without (the same seed, data order and surgery), and
the 95 % t interval of those differences. Reads MLflow only.

    python results/carry_momentum/paired.py [--tracking-uri URI]     (default: the runs folder's store)
"""
import argparse
import sys

from nr_study.analysis.runs import RunStore
from nr_study.analysis.stats import mean_std, t_interval

parser = argparse.ArgumentParser()
parser.add_argument("--tracking-uri")
parser.add_argument("--experiment", default="nr-carry-momentum")
args = parser.parse_args()

runs = RunStore(args.tracking_uri, [args.experiment]).finished()
by_seed: dict[str, dict[str, float]] = {}
for r in runs:
    arm = r.params.get("nr.carry_momentum")
    by_seed.setdefault(r.params["seed"], {})[arm] = r.metrics["final_test_err"]
pairs = {s: v for s, v in sorted(by_seed.items()) if {"True", "False"} <= set(v)}
if not pairs:
    sys.exit(f"error: experiment {args.experiment}: no seed has both arms finished")
print("seed  fresh optimizer  carried momentum  carried - fresh")
for s, v in pairs.items():
    print(f"{s:>4}  {v['False']:>15.2f}  {v['True']:>16.2f}  {v['True'] - v['False']:>+15.2f}")
for arm, label in (("False", "fresh"), ("True", "carried")):
    m, sd, n = mean_std([v[arm] for v in pairs.values()])
    print(f"{label}: {m:.2f} ± {sd:.2f} % (n = {n})")
print(f"carried - fresh, 95 % t interval: {t_interval([v['True'] - v['False'] for v in pairs.values()]).text()} "
      "points of test error (n = seeds)")
