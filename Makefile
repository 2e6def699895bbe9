# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint typecheck clean bench bench-jobs bench-cluster

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
	$(BIN)/ruff check datastore tests bench
	$(BIN)/ruff format --check datastore tests bench

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy --strict datastore

# tus-js-client for the interop tests, pinned by the lock file (Node.js and npm must be installed).
TUSJS := tests/tusjs
$(TUSJS)/node_modules/.package-lock.json: $(TUSJS)/package.json $(TUSJS)/package-lock.json
	@command -v npm >/dev/null || { echo "make test: npm (Node.js) is required for the tus-js-client tests" >&2; exit 1; }
	cd $(TUSJS) && npm ci --no-audit --no-fund

# Debian's programs that the tests drive as real clients: Chromium for the browser tests
# (Playwright drives it; it never downloads a browser); curl, for the TLS and benchmark-smoke
# tests; wget and rclone, which mirror a prefix through the page's links; haproxy, the load balancer
# the scale-out tests put in front of the nodes. Installs those missing.
DEBIAN_TOOLS := chromium curl wget rclone haproxy
.PHONY: debian-tools
debian-tools:
	@missing=$$(for tool in $(DEBIAN_TOOLS); do command -v $$tool >/dev/null || echo $$tool; done); \
	[ -z "$$missing" ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else \
	    echo "make test: the tests need" $$missing": run 'apt-get install" $$missing"' as root" >&2; exit 1; \
	  fi; }

# Debian's promtool, which checks the metrics page in the tests. It comes in Debian's prometheus
# package, and nothing lighter ships it; only promtool is unpacked from the package, into the venv:
# installing the package would add a system user and, on a host with systemd, start a Prometheus
# server on port 9090. Root is needed only to refresh apt's lists.
.PHONY: promtool
promtool: | $(BIN)/python
	@{ command -v promtool || [ -x $(BIN)/promtool ]; } >/dev/null || { \
	  command -v apt-get >/dev/null || { echo "make test: the tests need promtool: install Debian's prometheus package" >&2; exit 1; }; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq; fi; \
	  tmp=$$(mktemp -d) && chmod 755 $$tmp && { chown _apt $$tmp 2>/dev/null || true; } && \
	  (cd $$tmp && apt-get download -qq prometheus) && \
	  dpkg-deb --fsys-tarfile $$tmp/prometheus_*.deb | tar -xO ./usr/bin/promtool > $(BIN)/promtool.part && \
	  chmod 755 $(BIN)/promtool.part && mv $(BIN)/promtool.part $(BIN)/promtool; \
	  status=$$?; rm -rf $$tmp $(BIN)/promtool.part; \
	  [ $$status = 0 ] || { echo "make test: could not unpack promtool from Debian's prometheus package (as root, or run 'apt-get install prometheus')" >&2; exit 1; }; }

# Debian's PostgreSQL server (the tests start clusters of their own with its initdb and pg_ctl, which
# Debian keeps off PATH under /usr/lib/postgresql/VERSION/bin).
.PHONY: postgresql
postgresql:
	@{ ls /usr/lib/postgresql/*/bin/initdb || command -v initdb; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	  else \
	    echo "make test: the tests need PostgreSQL's server: run 'apt-get install postgresql' as root" >&2; exit 1; \
	  fi; }

test: lint typecheck $(TUSJS)/node_modules/.package-lock.json debian-tools promtool postgresql
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Benchmarks against nginx on loopback (not part of `make test`); e.g. make bench BENCH_ARGS="--runs 3".
# Installs Debian's nginx and wrk when missing. Writes its table and rows into bench/results.md and
# bench/results.json (the other sections stay), then runs the transfer-job benchmarks (bench/jobs.py),
# which replace their own section and rows in both.
bench: $(VENV)/.installed
	@{ command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; } && command -v wrk >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx wrk; \
	  else \
	    echo "make bench: needs nginx and wrk: run 'apt-get install nginx wrk' as root" >&2; exit 1; \
	  fi; }
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/jobs.py $(BENCH_JOBS_ARGS)

# The transfer-job benchmarks alone (two stores on loopback; no nginx); e.g. BENCH_JOBS_ARGS="--runs 5".
bench-jobs: $(VENV)/.installed
	$(BIN)/python bench/jobs.py $(BENCH_JOBS_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

# The PostgreSQL and several-node benchmarks alone (PostgreSQL, HAProxy and nodes on loopback); e.g.
# BENCH_CLUSTER_ARGS="--runs 5". Needs Debian's postgresql and haproxy (make test installs them).
bench-cluster: $(VENV)/.installed
	$(BIN)/python bench/cluster.py $(BENCH_CLUSTER_ARGS)
