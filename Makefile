# Set-up and test from a fresh clone: `make test`.
# torch is installed first, pinned to the local CPU wheel: a bare `torch` (or the range in
# pyproject.toml) would otherwise pull several GB of CUDA packages.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast bench clean proto demo

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(TORCH)
	$(PY) -m pip install -e '.[dev,hf]'
	touch $(STAMP)

install: $(STAMP)

# The full suite (what CI runs, .ci/run), with the 25 slowest tests listed at the end.
test: $(STAMP)
	$(PY) -m pytest -q --durations=25

# The inner loop: everything not marked slow (Ray clusters, servers, multi-epoch training;
# tests/conftest.py lists them), under 3 minutes.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --durations=10

bench: $(STAMP)
	$(VENV)/bin/metaprune bench all

# Regenerate the committed gRPC stubs (serving/pruning_pb2*.py) from proto/.
proto: $(STAMP)
	$(PY) serving/generate_stubs.py

# A small model trained on the spot, pruned through a local server, before/after figures.
demo: $(STAMP)
	$(PY) -m metaprune.serving.demo

clean:
	rm -rf $(VENV) build *.egg-info
