#!/usr/bin/env bash
# Issue 30, item 5: round 2's study on a GPU (search_spaces/regime2_gpu.yaml), first contact, in one go, in at
# most 10 minutes on one H100 or H200, with no network.
# READY, NOT YET RUN: no GPU was lent to the session that wrote it. Nothing below was timed on a GPU.
#
#   bash scripts/gpu_regime2.sh [OUT_DIR] [all|probe]     # from the repository root
#
#   all (default)  (a) the throughput probe, (b) a cut-down paired slice of the study, its table and runs
#   probe          (a) alone: needs only torch and this repository (no Ray, MLflow or data)
#
# Python: .venv/bin/python when it holds torch (`make setup`), else `python3` with the repository on PYTHONPATH.
# Fashion-MNIST: the four idx files (.gz or not) where nr_study/data.py looks ($NR_STUDY_DATA, else ./data; in
# either root, the root itself, fashion-mnist/ or FashionMNIST/raw/; else /usr/share/datasets/fashion-mnist).
# No GPU, or (all) no data or no Ray/MLflow: one line, exit 1, nothing run.
#
# On a GPU machine of your own with the repository: `make setup` (network once; it also installs Debian's
# dataset-fashion-mnist where it can), else copy the idx files from a machine that has them (30 MB):
#   mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/* data/fashion-mnist/   # /data/ is git-ignored
#   bash scripts/gpu_regime2.sh runs/gpu_regime2
# On this workplace's lent machine (the device tool: no network, 64 MiB may travel with the working tree) only
# `probe` can run: its image has torch but neither Ray nor MLflow, the .venv is 6.5 GB, and Ray 2.60's wheel
# alone is 79 MB (ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl, downloaded to see), so the sweep cannot
# travel there. Its device call, carrying nothing (3 small files come back: summary.txt, env.txt, probe.txt):
#   run(command='bash scripts/gpu_regime2.sh "$OUT" probe', timeout_s=300)
#
# Everything small lands in OUT_DIR (default: $OUT, else runs/gpu_regime2), at most 7 files; the work (Ray,
# MLflow store, checkpoints) in a temporary folder named in summary.txt. Exit 0 only when every step passed:
#   env.txt      nvidia-smi, torch and CUDA versions, Ray/MLflow versions, the data folder used
#   probe.txt    (a) images/s of the study's training step (nr_study.train.train_step on vgg_small, widths 16, 32,
#                64, batch 128, 28x28x1) on CUDA in fp32, channels_last, bf16 and channels_last + bf16 (the study's),
#                arms alternated round by round (as results/regime2/speed.py does on CPU), median and IQR; then
#                four processes at once (channels_last + bf16, widths 16 and 64): the aggregate images/s of the
#                GPU shared four ways, which is how the space packs its trials (gpu: 0.25)
#   sweep.txt    (b) nr-study sweep search_spaces/regime2_gpu.yaml, cut down to one width (16) and one seed (0):
#                its 4 arms at once on the GPU (gpu: 0.25 each), all 60,000 images, 6 epochs, rejuvenation
#                window 2 epochs (2 x 469 steps, about the 10 x 79 steps the CPU recipe's λ was sized for), each
#                paired with BL; experiment nr-regime2-gpu-slice. Its size is a choice, not a measurement: if it
#                runs out of its time (the rest of the 570 s budget less 100 s) it is stopped like a Ctrl-C and
#                the tables hold the trials that finished
#   runs.txt     from its MLflow store, per run: arm, status, device, GPU ids, wall seconds, epochs, final test
#                error, the paired deltas (equal epochs, equal compute), the epoch of the rejuvenation
#   table.md     nr-study tables --experiment nr-regime2-gpu-slice: the slice's table with the paired deltas
#   store.tar.gz the MLflow store (mlflow.db, artifacts: rejuvenations/*.json, models) and the tables
#   summary.txt  what each step did and its exit status
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-runs/gpu_regime2}}"
MODE="${2:-all}"
case "$MODE" in all|probe) ;; *) echo "gpu_regime2: mode '$MODE': expected 'all' or 'probe'"; exit 2 ;; esac
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
started=$(date +%s)
BUDGET_S=570            # the whole script, every step's limit included
status=0

# ------------------------------------------------------------------ what is needed, said in one line
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" > /dev/null 2>&1; then
  PY=.venv/bin/python
else
  PY=python3
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
NR=("$PY" -c "import sys; from nr_study.cli import main; sys.exit(main())")
missing=()
nvidia-smi -L > /dev/null 2>&1 || missing+=("no NVIDIA GPU here (nvidia-smi -L fails)")
DATA_DIR=""
if [ "$MODE" = all ]; then
  root="${NR_STUDY_DATA:-data}"
  for d in "$root" "$root/fashion-mnist" "$root/FashionMNIST/raw" /usr/share/datasets/fashion-mnist; do
    ok=1
    for s in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
      [ -f "$d/$s.gz" ] || [ -f "$d/$s" ] || ok=0
    done
    if [ $ok = 1 ]; then DATA_DIR="$(cd "$d" && pwd)"; break; fi
  done
  [ -n "$DATA_DIR" ] || missing+=("no Fashion-MNIST idx files in $root, $root/fashion-mnist, $root/FashionMNIST/raw or /usr/share/datasets/fashion-mnist (copy them into data/fashion-mnist/ or set NR_STUDY_DATA)")
  # where the loader will look: an absolute NR_STUDY_DATA for Ray's workers (the system folder is its fallback)
  [ -d "$root" ] && export NR_STUDY_DATA="$(cd "$root" && pwd)"
  "$PY" -c "import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in ('torch', 'ray', 'mlflow')) else 1)" \
    > /dev/null 2>&1 || missing+=("$PY lacks torch, Ray or MLflow (run make setup, or use mode 'probe')")
else
  "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('torch') else 1)" > /dev/null 2>&1 \
    || missing+=("$PY has no torch")
fi
if [ ${#missing[@]} -gt 0 ]; then
  msg="$(printf '%s; ' "${missing[@]}")"
  say "gpu_regime2: nothing run: ${msg%; }"
  exit 1
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_regime2.XXXXXX")"
say "gpu_regime2 ($MODE): python $PY, data ${DATA_DIR:-(not needed)}, work folder $WORK"

# ------------------------------------------------------------------ env
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  git rev-parse HEAD 2>/dev/null
  timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  timeout 60 "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  timeout 60 "$PY" -c "
import importlib.metadata as m
for p in ('ray', 'mlflow', 'numpy'):
    try:
        print(p, m.version(p))
    except m.PackageNotFoundError:
        print(p, 'missing')"
  echo "data: ${DATA_DIR:-not needed (probe)}; NR_STUDY_DATA=${NR_STUDY_DATA:-unset}"
} > "$OUT_DIR/env.txt" 2>&1
say "== env"; tee -a "$SUMMARY" < "$OUT_DIR/env.txt"

# ------------------------------------------------------------------ (a) throughput probe
cat > "$WORK/probe.py" <<'EOF'
"""Images/s of the study's training step on CUDA: solo (four layouts/precisions, alternated round by round) and
shared (N processes at once, channels_last + bf16), as the sweep packs its trials at gpu: 0.25."""
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from nr_study.models import create_model
from nr_study.train import train_step

ARMS = {"fp32": (False, False), "channels_last": (True, False), "bf16": (False, True),
        "channels_last+bf16": (True, True)}
BATCH, STEPS_PER_EPOCH = 128, 469          # 60,000 images at batch 128
DEV = torch.device("cuda")
torch.backends.cudnn.benchmark = True      # as the trainer sets it on CUDA (train.cuda_deterministic false)


def make_step(width, cl, amp):
    torch.manual_seed(0)
    m = create_model("vgg_small", num_classes=10, in_channels=1, width=width).to(DEV)
    x = torch.randn(BATCH, 1, 28, 28, device=DEV)
    y = torch.randint(0, 10, (BATCH,), device=DEV)
    if cl:
        m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    return lambda: train_step(m, opt, x, y, amp=amp)


def timed(step, n):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def solo(widths=(16, 32, 64), rounds=5, steps=30):
    print(f"solo: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, batch {BATCH}, {rounds} rounds x "
          f"{steps} steps per arm, arms alternated")
    for w in widths:
        fns = {arm: make_step(w, *ARMS[arm]) for arm in ARMS}
        for fn in fns.values():
            timed(fn, 10)                                  # warm-up (cuDNN's choice of algorithms)
        times = {arm: [] for arm in ARMS}
        for _ in range(rounds):
            for arm, fn in fns.items():
                times[arm].append(timed(fn, steps))
        base = statistics.median(times["fp32"])
        for arm, ts in times.items():
            med = statistics.median(ts)
            q = statistics.quantiles([BATCH / t for t in ts], n=4)
            print(f"width {w:3d} {arm:20s} {BATCH / med:8.0f} img/s (IQR {q[0]:.0f}-{q[2]:.0f})  step "
                  f"{med * 1e3:6.2f} ms = {med / base:.2f}x fp32; {STEPS_PER_EPOCH} steps (an epoch's steps, "
                  f"nothing else) {med * STEPS_PER_EPOCH:5.1f} s", flush=True)


def worker(i, n, folder, widths=(16, 64), steps=200):
    folder = Path(folder)
    out = {}
    for w in widths:
        fn = make_step(w, True, True)
        timed(fn, 10)
        (folder / f"ready.{w}.{i}").touch()
        t_end = time.time() + 60
        while len(list(folder.glob(f"ready.{w}.*"))) < n and time.time() < t_end:
            time.sleep(0.01)
        out[w] = BATCH / timed(fn, steps)
    (folder / f"worker.{i}.json").write_text(json.dumps(out))


def shared(n, folder):
    procs = [subprocess.Popen([sys.executable, __file__, "worker", str(i), str(n), folder]) for i in range(n)]
    rcs = [p.wait(timeout=80) for p in procs]
    files = [Path(folder) / f"worker.{i}.json" for i in range(n)]
    res = [json.loads(f.read_text()) for f in files if f.is_file()]
    print(f"shared: {n} processes at once, channels_last+bf16, 200 steps each after a barrier (worker exits {rcs})")
    if len(res) < n:
        print(f"shared: only {len(res)} of {n} workers reported")
        return 1
    for w in res[0]:
        each = [r[w] for r in res]
        print(f"width {int(w):3d} {n} processes: {sum(each):8.0f} img/s together, each "
              f"{', '.join(f'{v:.0f}' for v in each)}", flush=True)
    return 0 if all(rc == 0 for rc in rcs) else 1


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        if not torch.cuda.is_available():
            sys.exit(f"torch {torch.__version__} sees no CUDA device")
        solo()
        sys.exit(shared(4, sys.argv[2]))
EOF
mkdir -p "$WORK/barrier"
say "== (a) probe (limit 120 s)"
timeout -k 10 120 "$PY" "$WORK/probe.py" main "$WORK/barrier" > "$OUT_DIR/probe.txt" 2>&1
rc=$?; [ $rc -eq 0 ] || status=1; say "probe exit $rc"; grep -E '^(solo|shared|width)|Error|error' "$OUT_DIR/probe.txt" | tail -n 25 | tee -a "$SUMMARY"

if [ "$MODE" = probe ]; then
  say "== done in $(( $(date +%s) - started )) s, exit $status (probe only); files in $OUT_DIR"
  exit $status
fi

# ------------------------------------------------------------------ (b) a cut-down paired slice
export NR_STUDY_RUNS="$WORK/runs"
EXP=nr-regime2-gpu-slice
left=$(( started + BUDGET_S - $(date +%s) - 100 ))     # 100 s kept for the tables, runs.txt and the packing
if [ $left -lt 120 ]; then
  say "== (b) slice: not run, $left s left of the budget"; status=1
else
  say "== (b) slice: 4 arms x width 16 x seed 0, 60,000 images, 6 epochs, window 2, paired with BL (limit $left s)"
  timeout -k 20 $(( left - 20 )) "${NR[@]}" sweep search_spaces/regime2_gpu.yaml \
    --set 'space.model.kwargs.width=[16]' --set 'space.seed=[0]' --set train.epochs=6 --set nr.window_epochs=2 \
    --set name=regime2_gpu_slice --set experiment=$EXP --set tags.table=regime2_gpu_slice \
    > "$OUT_DIR/sweep.txt" 2>&1
  rc=$?; [ $rc -eq 0 ] || status=1; say "sweep exit $rc$([ $rc -eq 124 ] && echo ' (out of time)')"
  grep -vE '^\s*$' "$OUT_DIR/sweep.txt" | tail -n 15 | tee -a "$SUMMARY"
fi

say "== tables (limit 45 s)"
timeout -k 5 45 "${NR[@]}" tables --experiment $EXP --out "$WORK/report" > "$WORK/tables.log" 2>&1
rc=$?; [ $rc -eq 0 ] || status=1; say "tables exit $rc"; tail -n 5 "$WORK/tables.log" | tee -a "$SUMMARY"
# the slice's own table (tables also writes the paper's, empty here); written only when a trial FINISHED
cp "$WORK/report/tables/regime2_gpu_slice.md" "$OUT_DIR/table.md" 2>/dev/null \
  || { say "no table regime2_gpu_slice.md: no trial of the slice finished"; status=1; }

say "== runs (limit 40 s)"
timeout -k 5 40 "$PY" - "$WORK/runs/mlflow.db" $EXP > "$OUT_DIR/runs.txt" 2>&1 <<'EOF'
import sys

from mlflow.tracking import MlflowClient

client = MlflowClient(f"sqlite:///{sys.argv[1]}")
exp = client.get_experiment_by_name(sys.argv[2])
if exp is None:
    sys.exit(f"no experiment {sys.argv[2]} in {sys.argv[1]}: the sweep did not start (sweep.txt says why)")
runs = sorted(client.search_runs([exp.experiment_id], max_results=1000), key=lambda r: r.info.start_time)
trials = paired = 0
for r in runs:
    t, m, p = r.data.tags, r.data.metrics, r.data.params
    kind = "BL pair" if t.get("nr.paired_baseline") else "trial" if "nr.trial" in t else None
    if kind is None:
        continue
    wall = f"{(r.info.end_time - r.info.start_time) / 1000:.0f} s" if r.info.end_time else "-"
    rej = sorted(client.get_metric_history(r.info.run_id, "rejuvenations"), key=lambda h: h.step)
    first = next((h.step for h in rej if h.value >= 1), None)
    epochs = len(client.get_metric_history(r.info.run_id, "test_err"))
    fmt = lambda k: f"{m[k]:.2f}" if k in m else "-"  # noqa: E731
    print(f"{kind:7s} {r.info.run_name}: {r.info.status}, device {p.get('train.device')}, GPUs {t.get('nr.gpus')}, "
          f"wall {wall}, {epochs} epochs (train.epochs {p.get('train.epochs')}), final test_err "
          f"{fmt('final_test_err')}, delta equal epochs {fmt('delta_test_err')}, equal compute "
          f"{fmt('delta_test_err_compute')}, rejuvenated at {'-' if first is None else f'epoch row {first}'}")
    if kind == "trial":
        trials += 1
        paired += r.info.status == "FINISHED" and "delta_test_err" in m
print(f"paired check: {paired} of {trials} trial(s) finished with a paired delta (4 expected): "
      + ("passed" if paired == trials == 4 else "FAILED"))
EOF
rc=$?; [ $rc -eq 0 ] || status=1; grep -q "paired check: .*: passed$" "$OUT_DIR/runs.txt" || status=1
tee -a "$SUMMARY" < "$OUT_DIR/runs.txt"; say "runs exit $rc"

tar czf "$OUT_DIR/store.tar.gz" -C "$WORK" runs/mlflow.db runs/mlartifacts report 2>/dev/null \
  || say "store.tar.gz: some of runs/mlflow.db, runs/mlartifacts, report missing"
say "== done in $(( $(date +%s) - started )) s, exit $status; files in $OUT_DIR, the work in $WORK"
exit $status
