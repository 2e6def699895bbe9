# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint typecheck clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamps re-install only when the project's metadata changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/datastore serve $(ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check datastore tests
	$(BIN)/ruff format --check datastore tests

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy --strict datastore

# tus-js-client for the interop tests, pinned by the lock file (Node.js and npm must be installed).
TUSJS := tests/tusjs
$(TUSJS)/node_modules/.package-lock.json: $(TUSJS)/package.json $(TUSJS)/package-lock.json
	@command -v npm >/dev/null || { echo "make test: npm (Node.js) is required for the tus-js-client tests" >&2; exit 1; }
	cd $(TUSJS) && npm ci --no-audit --no-fund

# Debian's Chromium for the browser tests (Playwright drives it; it never downloads a browser).
.PHONY: chromium
chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else \
	    echo "make test: the browser tests need Chromium: run 'apt-get install chromium' as root" >&2; exit 1; \
	  fi; }

test: lint typecheck $(TUSJS)/node_modules/.package-lock.json chromium
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
