#!/usr/bin/env bash
# Issue 29, item 2: the CUDA path run for real, in one go, in at most 10 minutes on one H100 or H200.
# READY, NOT YET RUN: no GPU was lent to the session that wrote it (README, "What NR costs").
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # from the repository root, .venv built by `make setup`
#
# Nothing is downloaded (the machine may have no network): the smoke trains on synthetic stand-ins.
# Everything lands in OUT_DIR (default: $OUT, else runs/gpu_check); the summary is OUT_DIR/summary.txt; exit 0
# only when the bench, the smoke and the round_to check passed (checked on this CPU machine with the GPU guard
# lifted: bench refuses cuda in one line, the smoke passes on CPU, the checks read its store):
#   env.txt       nvidia-smi, torch and CUDA versions, whether pynvml is there (MLflow's GPU system metrics need it)
#   bench.*       nr-study bench --device cuda --quick, steps/surgery/layer/nesting rows: NR step / plain step,
#                 CA and CR layers, surgery seconds, images/s of VGG-19-BN at CIFAR size with channels_last + bf16
#                 (the README's figure: 18.3k img/s on an H200 with torch 2.11)
#   smoke.txt     nr-study sweep table3_mobilenet.yaml --smoke with resources_per_trial {cpu: 2, gpu: 0.25}:
#                 four trials sharing the GPU, each its own MLflow run, the forced restart and --resume on CUDA
#   checks.txt    from the smoke's MLflow store: the GPU each trial ran on, whether the four overlapped in time,
#                 the GPU system metrics logged, and every rejuvenation's round_to (auto: 8 on CUDA) with its
#                 regrown widths in multiples of it
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-runs/gpu_check}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY=.venv/bin/python
NR=.venv/bin/nr-study
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
started=$(date +%s)
status=0
if ! nvidia-smi -L > /dev/null 2>&1; then
  say "no NVIDIA GPU here (nvidia-smi -L fails): this check is for a GPU machine; nothing run"
  exit 1
fi

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  git rev-parse HEAD 2>/dev/null
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  "$PY" -c "import pynvml; print('pynvml', pynvml.__version__ if hasattr(pynvml, '__version__') else 'present')" \
    2>/dev/null || echo "pynvml: missing (not in requirements.lock): MLflow logs no GPU system metrics"
} > "$OUT_DIR/env.txt" 2>&1
say "== env"; cat "$OUT_DIR/env.txt" | tee -a "$SUMMARY"

say "== bench (limit 240 s)"
timeout 240 "$NR" bench --device cuda --quick --only steps --only surgery --only layer --only nesting \
  --json "$OUT_DIR/bench.json" > "$OUT_DIR/bench.txt" 2>&1
rc=$?; [ $rc -eq 0 ] || status=1; say "bench exit $rc"; tail -n 30 "$OUT_DIR/bench.txt" | tee -a "$SUMMARY"

say "== smoke, four trials on one GPU (limit 300 s)"
timeout 300 "$NR" sweep search_spaces/table3_mobilenet.yaml --smoke --runs "$OUT_DIR/runs" \
  --set 'resources_per_trial={cpu: 2, gpu: 0.25}' > "$OUT_DIR/smoke.txt" 2>&1
rc=$?; [ $rc -eq 0 ] || status=1; say "smoke exit $rc"; grep -E '^(ok|FAILED|smoke|launch|resume)' "$OUT_DIR/smoke.txt" | tee -a "$SUMMARY"

say "== checks"
"$PY" - "$OUT_DIR/runs/smoke" > "$OUT_DIR/checks.txt" 2>&1 <<'EOF'
import json, sys
from pathlib import Path

from mlflow.tracking import MlflowClient

folders = sorted(Path(sys.argv[1]).glob("table3_mobilenet-*"))
if not folders:
    sys.exit("no smoke folder: the smoke did not start (smoke.txt says why)")
folder = folders[-1]
client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
exp = client.get_experiment_by_name("nr-table3-smoke")
runs = [r for r in client.search_runs([exp.experiment_id]) if "nr.trial" in r.data.tags]
spans = []
for r in runs:
    gpu = [k for k in r.data.metrics if k.startswith("system/gpu")]
    spans.append((r.info.start_time, r.info.end_time or r.info.start_time))
    print(f"{r.info.run_name}: {r.info.status}, GPU ids {r.data.tags.get('nr.gpus')}, device param "
          f"{r.data.params.get('train.device')}, {len(gpu)} GPU system metrics ({', '.join(sorted(gpu)[:3])})")
overlap = max(s for s, _ in spans) < min(e for _, e in spans) if spans else False
print(f"{len(runs)} trial runs; all running at one moment: {overlap}")
bad = 0
for p in sorted((folder / "mlartifacts").glob("*/*/artifacts/rejuvenations/*.json")):
    rep = json.loads(p.read_text())
    grown = {k: w for k, w in rep["widths_after"].items() if rep.get("rejuvenated", {}).get(k, 0) > 0}
    odd = {k: w for k, w in grown.items() if w % 8}
    bad += rep["round_to"] != 8 or bool(odd)
    print(f"{p.parts[-4][:8]} {p.name}: round_to {rep['round_to']}, {len(grown)} regrown layers, not multiples of 8: "
          f"{odd or 'none'}")
print("round_to check:", "ok" if not bad else f"{bad} rejuvenation(s) not in multiples of 8")
EOF
rc=$?; [ $rc -eq 0 ] || status=1; grep -q "round_to check: ok" "$OUT_DIR/checks.txt" || status=1
cat "$OUT_DIR/checks.txt" | tee -a "$SUMMARY"; say "checks exit $rc"
say "== done in $(( $(date +%s) - started )) s, exit $status; files in $OUT_DIR"
exit $status
