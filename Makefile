# The two commands of the README. Each creates .venv on first use, installs the
# package with torch pinned by constraints.txt (the local CPU build on machines
# without a GPU), then runs the demo or the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: demo test test-all bench clean

# torchattacks (a peer the tests compare against and accept as an attack) is installed without
# its declared dependencies: it imports neither torchvision nor requests, and torchvision's
# wheels would replace the pinned torch.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps torchattacks==3.5.1
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sirobust demo

# One pytest-xdist worker per core (at most 4: each holds its own copies of the trained fixtures), each
# worker one thread (tests/conftest.py): on CI's two cores this takes the suite from 8.5 to 6 minutes.
# `pytest` alone still runs everything in one process.
XDIST = -n auto --maxprocesses 4 --dist load

test: $(STAMP)
	$(BIN)/python -m pytest $(XDIST)

test-all: $(STAMP)  # includes the slow tests
	$(BIN)/python -m pytest $(XDIST) -m ''

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_pgd.py

clean:
	rm -rf $(VENV) runs .pytest_cache
