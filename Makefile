# nr_study — every target a user needs. `make demo` and `make test` are the two that matter.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
SPACE   ?= search_spaces/demo.yaml
ADDRESS ?=
RUNS    ?= runs

.PHONY: setup test test-fast lint demo sweep tables plots bench ui dashboard clean

setup: $(STAMP)

# Idempotent: the venv is rebuilt only when pyproject.toml changes. torch/torchvision come from
# the local wheel cache (pip's constraint file pins them); Fashion-MNIST from Debian when apt is here.
$(STAMP): pyproject.toml
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || \
	  echo "note: could not install dataset-fashion-mnist; torchvision will download Fashion-MNIST when asked"; fi
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q chromium >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) || \
	  echo "note: could not install chromium; the MLflow UI browser test will be skipped"; fi
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q tests -m "not slow"

lint: setup
	$(BIN)/python -m compileall -q nr_study analysis tests
	$(BIN)/python -m pyflakes nr_study analysis tests

demo: setup
	$(BIN)/nr-study sweep search_spaces/demo.yaml --runs $(RUNS)
	$(BIN)/nr-study tables --experiment nr-demo --tracking-uri sqlite:///$(abspath $(RUNS))/mlflow.db --out $(RUNS)/demo-report
	$(BIN)/nr-study plots --experiment nr-demo --tracking-uri sqlite:///$(abspath $(RUNS))/mlflow.db --out $(RUNS)/demo-report
	@echo ""
	@cat $(RUNS)/demo-report/tables/demo.md
	@echo ""
	@echo "demo done. Tables and plots: $(RUNS)/demo-report/report.md (or open $(RUNS)/demo-report/index.html)"
	@echo "Compare the runs in the MLflow UI: make ui   (then open http://127.0.0.1:5000)"

sweep: setup
	$(BIN)/nr-study sweep $(SPACE) --runs $(RUNS) $(if $(ADDRESS),--address $(ADDRESS),)

tables: setup
	$(BIN)/nr-study tables --tracking-uri sqlite:///$(abspath $(RUNS))/mlflow.db --out $(RUNS)/report

plots: setup
	$(BIN)/nr-study plots --tracking-uri sqlite:///$(abspath $(RUNS))/mlflow.db --out $(RUNS)/report

bench: setup
	$(BIN)/nr-study bench

# The MLflow UI (and artifact proxy) over the run folder, on 127.0.0.1 only.
ui: setup
	$(BIN)/python -m nr_study.mlflow_server --runs $(RUNS) --port 5000

# optuna-dashboard on 127.0.0.1 over an Optuna sweep's study: STUDY=<sweep folder>/optuna.db, default the newest.
STUDY ?= $(shell ls -t $(RUNS)/sweeps/*/optuna.db 2>/dev/null | head -n 1)
dashboard: setup
	@test -n "$(STUDY)" || { echo "error: no $(RUNS)/sweeps/*/optuna.db (run a search: optuna sweep, or pass STUDY=...)"; exit 2; }
	$(BIN)/optuna-dashboard sqlite:///$(abspath $(STUDY)) --host 127.0.0.1 --port 8080

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
