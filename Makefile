# The two entry points of the README: `make demo` and `make test`. Both work in a virtual
# environment of their own (.venv), so a stock Debian/Ubuntu Python ("externally managed") is fine.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip

.PHONY: install system-deps test lint demo protos

# Debian packages the tests drive for real: Prometheus + Alertmanager (alert rules end to end),
# Chromium + its driver (the dashboard in a headless browser), venv for a stock Python.
APT_PACKAGES := prometheus prometheus-alertmanager chromium chromium-driver

$(PYTHON):
	python3 -m venv $(VENV) || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv && python3 -m venv $(VENV); }
	$(PIP) install --quiet --upgrade pip

# torch is pinned: an unpinned torch would pull a multi-GB CUDA build. Where pip's own indexes have only PyPI's
# torch for Linux (the CUDA build), TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU wheel from
# PyTorch's index and its dependencies from the usual one. Off by default: an index this machine cannot reach
# costs retries on every fresh install. A venv that has it asks nothing.
TORCH := 2.13.0
TORCH_INDEX ?=
install: $(PYTHON)
	$(PYTHON) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH)')" 2>/dev/null \
	  || { $(if $(TORCH_INDEX),$(PIP) install --quiet --no-deps torch==$(TORCH) --extra-index-url $(TORCH_INDEX) &&) \
	       $(PIP) install --quiet torch==$(TORCH); }
	$(PIP) install --quiet -e '.[dev]'

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy

test: system-deps install lint
	$(PYTHON) -m pytest -q

demo: install
	$(PYTHON) examples/demo.py

# Regenerate the wire code after editing protos/modtrack.proto (tests/test_protos.py checks it).
protos:
	$(PYTHON) protos/generate.py
