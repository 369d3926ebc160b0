# nr_study — every target a user needs. `make demo` and `make test` are the two that matter.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
SPACE   ?= search_spaces/demo.yaml
ADDRESS ?=
RUNS    ?= runs

LOCK    := requirements.lock
# pip-tools makes the lock; its own version is pinned here so `make lock` gives the same file on any day.
PIP_TOOLS := pip-tools==7.7.0

.PHONY: setup test test-fast test-latest lint lock demo sweep tables plots bench ui dashboard clean

setup: $(STAMP)

# Idempotent: the venv is rebuilt only when the lock or pyproject.toml changes. Every package, direct and
# transitive (torch/torchvision from the local wheel cache included), is installed at the version the lock
# names and nothing is resolved again: the project goes in with --no-deps, and `pip check` fails the setup
# if the lock ever misses a dependency. Fashion-MNIST from Debian when apt is here.
$(STAMP): $(LOCK) pyproject.toml
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || \
	  echo "note: could not install dataset-fashion-mnist; torchvision will download Fashion-MNIST when asked"; fi
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q chromium >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) || \
	  echo "note: could not install chromium; the MLflow UI browser test will be skipped"; fi
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

# Regenerate the lock from pyproject.toml's ranges: the newest releases they allow today, for this machine's
# Python and platform. Commit the new lock only with `make test` green on it (CI tests exactly the locked set).
lock:
	test -x build/lock-venv/bin/pip-compile || { $(PY) -m venv build/lock-venv && \
	  build/lock-venv/bin/python -m pip install -q $(PIP_TOOLS); }
	build/lock-venv/bin/pip-compile -q --upgrade --extra dev --strip-extras --all-build-deps --allow-unsafe \
	  --no-emit-index-url --no-emit-find-links --output-file $(LOCK) pyproject.toml

# The next drift before users see it: a throw-away venv with the newest releases pyproject.toml allows (not
# the lock), running the fast tests. Not part of CI.
test-latest:
	rm -rf build/latest-venv && $(PY) -m venv build/latest-venv
	build/latest-venv/bin/python -m pip install -q --upgrade pip
	build/latest-venv/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
	build/latest-venv/bin/python -m pip list --format=freeze | grep -iE '^(torch|ray|mlflow|optuna|numpy|pandas)=='
	NR_STUDY_UNLOCKED=1 build/latest-venv/bin/python -m pytest -q tests -m "not slow" -p no:cacheprovider

test: setup
	$(BIN)/python -m pytest -q tests --durations=25   # the slowest tests listed: where the suite's time goes

test-fast: setup
	$(BIN)/python -m pytest -q tests -m "not slow"

lint: setup
	$(BIN)/python -m compileall -q nr_study tests
	$(BIN)/python -m pyflakes nr_study tests

demo: setup
	$(BIN)/nr-study sweep search_spaces/demo.yaml --runs $(RUNS)
	$(BIN)/nr-study tables --experiment nr-demo --tracking-uri sqlite:///$(abspath $(RUNS))/mlflow.db --out $(RUNS)/demo-report
	$(BIN)/nr-study plots --experiment nr-demo --tracking-uri sqlite:///$(abspath $(RUNS))/mlflow.db --out $(RUNS)/demo-report
	@echo ""
	@cat $(RUNS)/demo-report/tables/demo.md
	@echo ""
	@echo "demo done. Tables and plots: $(RUNS)/demo-report/report.md (or open $(RUNS)/demo-report/index.html)"
	@echo "Compare the runs in the MLflow UI: make ui, then open"
	@$(BIN)/python -m nr_study.mlflow_server --runs $(RUNS) --experiment nr-demo --print-url

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
