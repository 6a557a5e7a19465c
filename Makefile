# Two commands on a fresh machine (Python 3.11 and the package registries):
#   make run    the main job on embedded defaults (quick benchmark)
#   make test   lint + the test suite (what CI runs)
# Both create .venv on first use. torch is pinned to the 2.13.0 CPU wheel here;
# the package itself only asks for torch>=2.1.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: run bench test lint format peers clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" -e ".[test,bench]"
	touch $@

run: $(VENV)/.installed
	$(BIN)/softtopk bench --quick

bench: $(VENV)/.installed
	$(BIN)/softtopk bench --full

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

test: lint
	$(BIN)/python -m pytest -p no:cacheprovider

# The published packages the oracle tests compare against (tests/peers.txt). allRank pins
# torch <= 1.8 in its metadata, but its lambdaLoss file runs on any torch: it is installed
# without dependencies (its test loads that one file).
peers: $(VENV)/.installed
	$(BIN)/python -m pip install -q "$(TORCH)" -r tests/peers.txt
	$(BIN)/python -m pip install -q --no-deps allrank==1.4.3

format: $(VENV)/.installed
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

clean:
	rm -rf $(VENV) bench-results .pytest_cache
