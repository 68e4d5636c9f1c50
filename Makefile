# The two entry points of the README: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install system-deps test demo protos

# Debian packages the tests drive for real: Prometheus + Alertmanager (alert rules end to end),
# Chromium + its driver (the dashboard in a headless browser). Installed only where missing.
APT_PACKAGES := prometheus prometheus-alertmanager chromium chromium-driver

# torch is pinned for local installs: an unpinned torch would pull a multi-GB CUDA build.
install:
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

test: system-deps install
	$(PYTHON) -m pytest -q

demo: install
	$(PYTHON) examples/demo.py

# Regenerate the wire code after editing protos/modtrack.proto (tests/test_protos.py checks it).
protos:
	$(PYTHON) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/modtrack.proto
