# carehub: `make demo` runs the hub on sample feeds, `make test` runs the tests,
# `make bench` runs the benchmarks. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-min-deps bench bench-intake bench-routing bench-care bench-claim lint clean

$(STAMP): pyproject.toml plugins/carehub-pager/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "carehub needs Python 3.11 or newer (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m pip install --quiet -e plugins/carehub-pager
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/carehub demo

test: $(STAMP)
	$(BIN)/python -m pytest
	$(BIN)/python -m pytest plugins/carehub-pager/tests

# The tests on the lowest versions pyproject.toml allows (constraints-min.txt), in .venv-min:
# a minimum that no longer works shows here before a user's install finds it.
test-min-deps:
	$(PYTHON) -m venv .venv-min
	.venv-min/bin/python -m pip install --quiet --upgrade pip
	.venv-min/bin/python -m pip install --quiet -c constraints-min.txt -e '.[dev,bench]' -e plugins/carehub-pager
	.venv-min/bin/python -m pytest
	.venv-min/bin/python -m pytest plugins/carehub-pager/tests

# All benchmarks (about 20 minutes); each also runs alone.
bench: bench-intake bench-routing bench-care bench-claim

bench-intake: $(STAMP)
	$(BIN)/python bench/bench_intake.py

bench-routing: $(STAMP)
	$(BIN)/python bench/bench_routing.py

bench-care: $(STAMP)
	$(BIN)/python bench/bench_care.py

bench-claim: $(STAMP)
	$(BIN)/python bench/bench_claim.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench plugins

clean:
	rm -rf $(VENV) .venv-min build *.egg-info src/*.egg-info
