# Set-up happens inside these targets: a virtual environment in .venv, pinned by constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/ttalign demo --out outputs/demo.png

# one pytest-xdist worker a core, one thread each (a test module stays on one worker, with its fixtures)
test: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist loadfile

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(VENV)/.installed
	$(PY) benchmarks/overhead.py
