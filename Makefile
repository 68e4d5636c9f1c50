# The two entry points of the README: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install test demo protos

# torch is pinned for local installs: an unpinned torch would pull a multi-GB CUDA build.
install:
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'

test: install
	$(PYTHON) -m pytest -q

demo: install
	$(PYTHON) examples/demo.py

# Regenerate the wire code after editing protos/modtrack.proto (tests/test_protos.py checks it).
protos:
	$(PYTHON) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/modtrack.proto
