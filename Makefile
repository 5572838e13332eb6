# The two set-up commands: `make run` (main job) and `make test` (test suite).
# Each creates/reuses .venv with the pinned versions in constraints.txt, and `make test`
# first installs the system packages its tests need (see `system-packages`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

# Debian packages the tests use: real Fashion-MNIST IDX files (offline), nginx, which
# fronts the SuperLink in secure deployments (simulations/deployment/front_proxy.py), and
# python3-pattern, whose test corpora hold the movie-review sentences of task 'sentiment'.
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
NGINX := $(firstword $(shell command -v nginx 2>/dev/null) $(wildcard /usr/sbin/nginx))
PATTERN_CORPORA := /usr/share/doc/python3-pattern/test/corpora
SYSTEM_PACKAGES := $(if $(wildcard $(FASHION_MNIST_DIR)),,dataset-fashion-mnist) \
	$(if $(NGINX),,nginx) $(if $(wildcard $(PATTERN_CORPORA)),,python3-pattern)

.PHONY: run deploy test lint format clean system-packages bytecode

# uv installs from pip's own settings (tools/install_venv.py: 27 s, not pip's 56 s);
# pip installs instead, saying why, if a setting cannot be carried over or uv fails.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PYTHON) tools/install_venv.py $(VENV) -c constraints.txt -e ".[dev,tabular,text]"
	touch $(STAMP)

# Installed with apt-get when we are root; otherwise one line says what to install.
system-packages:
ifneq ($(strip $(SYSTEM_PACKAGES)),)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian packages: $(strip $(SYSTEM_PACKAGES))"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq $(strip $(SYSTEM_PACKAGES)) >/dev/null; \
	else \
		echo "make test needs the Debian packages: $(strip $(SYSTEM_PACKAGES))" \
			"(run: sudo apt-get install $(strip $(SYSTEM_PACKAGES)))" >&2; exit 1; \
	fi
endif

# The project's bytecode, written once: a federation starts dozens of Python processes
# (Ray workers; a deployed SuperNode, one per message), and where PYTHONDONTWRITEBYTECODE
# is set each compiled the modules it imports afresh (a 2-run simulation test: 59-60
# user CPU-s without, 44-47 with; BENCHMARKS.md, "Research-speed simulation").
bytecode: $(STAMP)
	@$(PY) -m compileall -q -j 0 client common server simulations tests >/dev/null

run: $(STAMP) bytecode
	$(PY) -m simulations.run $(ARGS)

deploy: $(STAMP) system-packages bytecode
	$(PY) -m simulations.deploy $(ARGS)

# Test modules run on PYTEST_WORKERS processes (pytest-xdist), a module's tests on one
# worker: one process keeps about 1.2 of 2 cores busy, two keep both (993 s against
# 1,230 s, BENCHMARKS.md). PYTEST_WORKERS=0 runs everything in this process, in order.
PYTEST_WORKERS ?= 2
test: $(STAMP) system-packages bytecode
	$(PY) -m pytest -q $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder) $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
	find client common server simulations tests -name __pycache__ -prune -exec rm -rf {} +
