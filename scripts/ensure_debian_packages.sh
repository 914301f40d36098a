#!/usr/bin/env bash
# Install the Debian packages the tests need, where missing: the suite fails
# (never skips) without them, and a fresh machine has only what the project
# installs. Idempotent: an installed package is left alone, and apt's lists
# are refreshed only when something must be installed.
#
#   scripts/ensure_debian_packages.sh PACKAGE...
#
# faketime: libfaketime, which runs a node with a skewed wall clock
#           (tests/integration/test_clock_skew.py).
# prometheus: the real Prometheus server and promtool, which check and unit-test
#           the chart's alert rules (tests/k8s/test_alerts.py) and scrape a
#           running cluster (tests/integration/test_prometheus.py).
# chromium, chromium-driver: a real headless browser, driven by Selenium, for
#           the console's tests (tests/integration/test_console.py).
# nodejs, npm: only where the machine has no Node.js; `npm ci` installs
#           cert-manager's CRD schemas for the chart's TLS tests (Makefile tools).
set -euo pipefail
missing=()
for package in "$@"; do
    status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "ensure_debian_packages: missing ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "installed: ${missing[*]}"
