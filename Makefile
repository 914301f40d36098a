# The two set-up commands: `make run` and `make test`. Needs only python3 (3.11+) and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TOOLS := .tools/bin

.PHONY: run test unit integration k8s lint tools bench clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "kvstore needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Reinstall whenever pyproject.toml changes; the stamp records the last install.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/kvstore cluster --nodes 3 --base-port 8080

# Import contracts, ruff (style, imports, likely bugs; formatting) and mypy (strict, on app/).
LINTED := app scripts
lint: $(VENV)/.installed
	$(BIN)/lint-imports
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

# The real helm and hadolint binaries, hash-pinned, into .tools/bin (the chart and image tests need them),
# and the Debian packages the tests use (libfaketime for clock skew; prometheus and promtool
# for the alert rules and the dashboard's queries).
DEBIAN_PACKAGES := faketime prometheus
tools: $(VENV)/.installed
	$(BIN)/python scripts/install_tools.py
	scripts/ensure_debian_packages.sh $(DEBIAN_PACKAGES)

test: $(VENV)/.installed lint tools
	$(BIN)/pytest

k8s: $(VENV)/.installed tools
	$(BIN)/pytest tests/k8s

unit: $(VENV)/.installed
	$(BIN)/pytest tests/unit

integration: $(VENV)/.installed tools
	$(BIN)/pytest tests/integration

# The README's dashboard picture: a real Prometheus scraping a loaded three-node cluster (one node
# killed near the end), the dashboard's panels drawn from its query API (~2 min).
# matplotlib is needed for nothing else, so it is installed here alone, not with the test extras.
.PHONY: dashboard-picture
dashboard-picture: $(VENV)/.installed tools
	$(BIN)/pip install --quiet 'matplotlib>=3.7'
	KVSTORE_DASHBOARD_PICTURE=$(CURDIR)/docs/dashboard.png $(BIN)/pytest -q -s tests/integration/test_prometheus.py

# Load benchmarks (not tests): need wrk and taskset; results go in BENCHMARKS.md.
bench: $(VENV)/.installed
	$(BIN)/python bench/http_node.py
	$(BIN)/python bench/peer_clients.py --clients aiohttp,raw
	$(BIN)/python bench/cluster.py
	$(BIN)/python bench/storage_http.py

clean:
	rm -rf $(VENV) .tools .pytest_cache .hypothesis *.egg-info
