# nr_study — every target a user needs. `make demo` and `make test` are the two that matter.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
SPACE   ?= search_spaces/demo.yaml
ADDRESS ?=
RUNS    ?= runs

.PHONY: setup test test-fast lint demo sweep tables plots bench ui clean

setup: $(STAMP)

# Idempotent: the venv is rebuilt only when pyproject.toml changes. torch/torchvision come from
# the local wheel cache (pip's constraint file pins them); Fashion-MNIST from Debian when apt is here.
$(STAMP): pyproject.toml
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || \
	  echo "note: could not install dataset-fashion-mnist; torchvision will download Fashion-MNIST when asked"; fi
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
	$(BIN)/python -m pyflakes nr_study analysis tests 2>/dev/null || $(BIN)/python -m pip install -q pyflakes && $(BIN)/python -m pyflakes nr_study analysis tests

demo: setup
	@if [ ! -f search_spaces/demo.yaml ]; then echo "demo: the sweep command has not landed yet (issue 4); nothing to run." >&2; exit 1; fi
	$(BIN)/nr-study sweep search_spaces/demo.yaml

sweep: setup
	$(BIN)/nr-study sweep $(SPACE) $(if $(ADDRESS),--address $(ADDRESS),)

tables: setup
	$(BIN)/nr-study tables --out $(RUNS)/report

plots: setup
	$(BIN)/nr-study plots --out $(RUNS)/report

bench: setup
	$(BIN)/nr-study bench

ui: setup
	$(BIN)/mlflow ui --host 127.0.0.1 --backend-store-uri sqlite:///$(abspath $(RUNS))/mlflow.db

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
