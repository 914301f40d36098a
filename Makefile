# The two set-up commands: `make run` and `make test`. Needs only python3 (3.11+) and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TOOLS := .tools/bin

LOCK := requirements
# What `make lock` compiles with: uv, itself installed from a hash-pinned lock (only `make lock` needs it).
LOCK_TOOL := .tools/lock
UV_COMPILE = $(LOCK_TOOL)/bin/uv pip compile --quiet --generate-hashes --universal --python-version 3.11 --custom-compile-command 'make lock'

.PHONY: run test unit integration k8s image-test container-tools lint tools lock bench clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "kvstore needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)

# Reinstall whenever the lock changes; the stamp records the last install. Every
# package comes from the lock (pinned, hash-checked); the project itself is
# installed editable without dependencies, built by the locked setuptools; so is the
# client library (client/, its own distribution), so that `make test` covers it.
$(VENV)/.installed: pyproject.toml client/pyproject.toml $(LOCK)/test.txt $(LOCK)/build.txt | $(BIN)/python
	$(BIN)/pip install --quiet --require-hashes -r $(LOCK)/build.txt -r $(LOCK)/test.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e ./client
	touch $@

# Re-resolve the locks from pyproject.toml's ranges (newest matching releases), with hashes.
# runtime.txt: what the image and a node run; test.txt: the test extras, constrained to
# runtime.txt's versions; build.txt: the build backend (pyproject's [build-system]).
lock:
	test -x $(LOCK_TOOL)/bin/python || $(PYTHON) -m venv $(LOCK_TOOL)
	$(LOCK_TOOL)/bin/pip install --quiet --require-hashes -r $(LOCK)/lock-tool.txt
	$(UV_COMPILE) pyproject.toml -o $(LOCK)/runtime.txt
	$(UV_COMPILE) pyproject.toml --extra test -c $(LOCK)/runtime.txt -o $(LOCK)/test.txt
	$(PYTHON) -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires'], sep='\n')" \
		| $(UV_COMPILE) - -o $(LOCK)/build.txt
	echo 'uv==0.13.9' | $(UV_COMPILE) - -o $(LOCK)/lock-tool.txt

run: $(VENV)/.installed
	$(BIN)/kvstore cluster --nodes 3 --base-port 8080

# Import contracts, ruff (style, imports, likely bugs; formatting) everywhere, and mypy (strict on app/
# and client/; on tests/ and bench/ relaxed: bodies checked, annotations optional; see pyproject.toml).
LINTED := app scripts tests bench client
lint: $(VENV)/.installed
	$(BIN)/lint-imports
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

# The real helm and hadolint binaries, hash-pinned, into .tools/bin (the chart and image tests need them),
# and the Debian packages the tests use (libfaketime for clock skew; prometheus and promtool
# for the alert rules and the dashboard's queries; headless Chromium and its driver for the console).
DEBIAN_PACKAGES := faketime prometheus chromium chromium-driver
# Node.js and npm install cert-manager's published CRD schemas (install_tools.py, npm ci from a
# lock); Debian's packages where the machine has no Node.js of its own.
tools: $(VENV)/.installed
	scripts/ensure_debian_packages.sh $(DEBIAN_PACKAGES)
	command -v node >/dev/null && command -v npm >/dev/null || scripts/ensure_debian_packages.sh nodejs npm
	$(BIN)/python scripts/install_tools.py

# podman, buildah, runc and debootstrap (apt-get, where missing): the image tests build and run the image.
container-tools:
	$(PYTHON) scripts/image.py tools

test: $(VENV)/.installed lint tools container-tools
	$(BIN)/pytest

# The image built from the Dockerfile with podman and run as the chart runs it (tests/k8s/test_image.py).
image-test: $(VENV)/.installed tools container-tools
	$(BIN)/pytest tests/k8s/test_image.py

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

# The README's console picture: the degraded screenshot tests/integration/test_console.py takes
# of a real three-node cluster with one node killed (its other screenshots go to test-results/console/).
.PHONY: console-picture
console-picture: $(VENV)/.installed tools
	KVSTORE_CONSOLE_PICTURE=$(CURDIR)/docs/console.png $(BIN)/pytest -q -rA \
		tests/integration/test_console.py::test_console_follows_a_crash_and_a_restart_without_a_reload

# Load benchmarks (not tests): need wrk and taskset; results go in BENCHMARKS.md. One runner,
# `python -m bench NAME [ARGS]` from the repository root (`python -m bench` lists the names);
# `make bench-NAME` runs one with its defaults (ARGS="..." adds options), `make bench` these four.
bench: $(VENV)/.installed
	$(BIN)/python -m bench http_node
	$(BIN)/python -m bench peer_clients --clients aiohttp,raw
	$(BIN)/python -m bench cluster
	$(BIN)/python -m bench storage_http

bench-%: $(VENV)/.installed
	$(BIN)/python -m bench $* $(ARGS)

clean:
	rm -rf $(VENV) .tools .pytest_cache .hypothesis *.egg-info
