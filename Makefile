# The two commands of the README. Both create .venv on first use; torch is pinned to the CPU wheel
# through constraints.txt (a looser range would download several GB of CUDA wheels).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
JOBS   ?= 2

.PHONY: demo test lint bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -n $(JOBS) -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/permutation_search.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
