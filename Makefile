# Two entry points for a new user: `make demo` and `make test`. Each bootstraps what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the tests drive for real: command -> package
DEBS   := socat:socat influxd:influxdb mosquitto:mosquitto pdftotext:poppler-utils
DEMO_SECONDS ?= 95

.PHONY: demo test lint typecheck unit debs bench clean

demo: $(STAMP)
	$(BIN)/pocd demo --seconds $(DEMO_SECONDS) --data-dir demo-data

test: $(STAMP) debs lint typecheck unit

unit: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check pocd tests bench
	$(BIN)/ruff format --check pocd tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	@failed=""; for b in bench/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b || failed="$$failed $$b"; done; \
	if [ -n "$$failed" ]; then echo "targets missed:$$failed"; exit 1; fi

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "pocd needs Python 3.11+"'
	@$(PYTHON) -m venv --help >/dev/null 2>&1 && $(PYTHON) -c 'import ensurepip' 2>/dev/null || \
	  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

debs:
	@missing=""; for pair in $(DEBS); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || [ -x /usr/bin/$${pair%%:*} ] || [ -x /usr/sbin/$${pair%%:*} ] || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

clean:
	rm -rf $(VENV) demo-data .pytest_cache .mypy_cache .ruff_cache
