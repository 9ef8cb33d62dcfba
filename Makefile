# Set-up and test from a fresh clone: `make test`.
# torch is installed first, pinned to the local CPU wheel: a bare `torch` (or the range in
# pyproject.toml) would otherwise pull several GB of CUDA packages.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(TORCH)
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/metaprune bench all

clean:
	rm -rf $(VENV) build *.egg-info
