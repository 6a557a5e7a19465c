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

# The published packages the oracle tests compare against (tests/peers.txt).
peers: $(VENV)/.installed
	$(BIN)/python -m pip install -q "$(TORCH)" -r tests/peers.txt
	# torchsort compiles a C++ extension against the installed torch: no build isolation,
	# and nvcc hidden from PATH so that it builds CPU-only (about a minute).
	$(BIN)/python -m pip install -q "$(TORCH)" setuptools wheel
	env PATH=/usr/bin:/bin $(BIN)/python -m pip install -q --no-build-isolation "$(TORCH)" torchsort==0.1.10

format: $(VENV)/.installed
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

clean:
	rm -rf $(VENV) bench-results .pytest_cache
