#!/usr/bin/env bash
# Make the machine ready for the tests and the demo: a .venv with pumpgw[dev] installed, the
# Debian packages whose servers the integration tests start as private processes, and the
# node_modules of tests/node (installed from its package-lock.json) for the node-side checks.
# Also: Chromium (the browser tests drive it), Node.js and npm, and the dashboard's npm
# packages from web/dashboard/package-lock.json (the build tools; the built page itself is
# committed in gateway/dashboard/static/ and rebuilt here only when it is missing).
# Call it (scripts/bootstrap.sh) or source it; either way it runs from the repository root.
set -euo pipefail

BOOTSTRAP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$BOOTSTRAP_ROOT/.venv"
INSTALL_STAMP="$VENV/.pyproject.sha256"
NODE_TESTS="$BOOTSTRAP_ROOT/tests/node"
NODE_STAMP="$NODE_TESTS/node_modules/.package-lock.sha256"
MIN_PYTHON="3.11"
# Debian package -> the binary it provides (mosquitto lives in /usr/sbin, often off a user's PATH).
declare -A SERVER_BINARIES=(
    [mosquitto]="/usr/sbin/mosquitto"
    [victoria-metrics]="victoria-metrics"
    [influxdb]="influxd"
    # Not servers: the browser tests drive Chromium; node and npm run the AsyncAPI parser on the
    # generated document (tests/node) and build the dashboard (web/dashboard).
    [chromium]="/usr/bin/chromium"
    [nodejs]="node"
    [npm]="npm"
)
DASHBOARD_SRC="$BOOTSTRAP_ROOT/web/dashboard"
NPM_STAMP="$DASHBOARD_SRC/node_modules/.package-lock.sha256"
DASHBOARD_BUILT="$BOOTSTRAP_ROOT/gateway/dashboard/static/app.js"

bootstrap_fail() {
    echo "bootstrap: $*" >&2
    exit 1
}

check_python() {
    local python="${PYTHON:-python3}"
    command -v "$python" >/dev/null || bootstrap_fail "$python not found: install Python >= $MIN_PYTHON"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || bootstrap_fail "$("$python" --version 2>&1) is too old: Python >= $MIN_PYTHON is required"
}

ensure_venv() {
    [[ -x "$VENV/bin/python" ]] && return
    check_python
    echo "bootstrap: creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV" || bootstrap_fail "could not create $VENV (Debian: apt-get install python3-venv)"
}

ensure_dev_install() {
    local wanted
    wanted="$(sha256sum "$BOOTSTRAP_ROOT/pyproject.toml" | cut -d' ' -f1)"
    [[ -f "$INSTALL_STAMP" && "$(cat "$INSTALL_STAMP")" == "$wanted" ]] && return
    echo "bootstrap: installing pumpgw[dev] into .venv (pyproject.toml changed)"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "${BOOTSTRAP_ROOT}[dev]" \
        || bootstrap_fail "pip install -e '.[dev]' failed"
    echo "$wanted" >"$INSTALL_STAMP"
}

has_binary() {
    local binary="$1"
    [[ -x "$binary" ]] || command -v "$binary" >/dev/null || [[ -x "/usr/sbin/$binary" ]]
}

missing_packages() {
    local package
    for package in "${!SERVER_BINARIES[@]}"; do
        has_binary "${SERVER_BINARIES[$package]}" || echo "$package"
    done
}

as_root() {
    if [[ "$(id -u)" == 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        bootstrap_fail "need root to run '$*' and sudo is not installed"
    fi
}

# policy-rc.d exiting 101 tells invoke-rc.d and deb-systemd-invoke not to start services:
# the tests run their own private server processes and never use the system ones.
apt_install_without_services() {
    local policy=/usr/sbin/policy-rc.d created_policy=""
    if [[ ! -e "$policy" ]]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' >$policy && chmod +x $policy"
        created_policy=1
    fi
    local status=0
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" || status=$?
    [[ -n "$created_policy" ]] && as_root rm -f "$policy"
    return "$status"
}

ensure_server_packages() {
    local missing
    missing="$(missing_packages | sort | tr '\n' ' ')"
    [[ -z "${missing// /}" ]] && return
    command -v apt-get >/dev/null || bootstrap_fail "missing Debian packages $missing and no apt-get to install them"
    echo "bootstrap: installing Debian packages: $missing"
    # shellcheck disable=SC2086 # the package list is meant to split into words
    apt_install_without_services $missing && return
    echo "bootstrap: apt-get install failed; running apt-get update and retrying"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q || bootstrap_fail "apt-get update failed"
    # shellcheck disable=SC2086
    apt_install_without_services $missing || bootstrap_fail "apt-get install $missing failed"
}

# `npm ci` from the lockfile when node_modules is missing or package-lock.json changed.
# --ignore-scripts: no dependency's install script runs (one would report to an analytics site).
ensure_node_modules() {
    local wanted
    wanted="$(sha256sum "$NODE_TESTS/package-lock.json" | cut -d' ' -f1)"
    [[ -f "$NODE_STAMP" && "$(cat "$NODE_STAMP")" == "$wanted" ]] && return
    echo "bootstrap: npm ci in tests/node (node_modules missing or package-lock.json changed)"
    (cd "$NODE_TESTS" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error) \
        || bootstrap_fail "npm ci in tests/node failed: check that the npm registry is reachable"
    echo "$wanted" >"$NODE_STAMP"
}

# npm ci only when the lockfile changed; the build only when the shipped page is missing
# (tests/unit/test_dashboard_assets.py fails if the committed page differs from a build).
ensure_dashboard_packages() {
    local wanted
    wanted="$(sha256sum "$DASHBOARD_SRC/package-lock.json" | cut -d' ' -f1)"
    if [[ ! -f "$NPM_STAMP" || "$(cat "$NPM_STAMP")" != "$wanted" ]]; then
        echo "bootstrap: npm ci in web/dashboard (package-lock.json changed)"
        (cd "$DASHBOARD_SRC" && npm ci --no-audit --no-fund --loglevel=error) \
            || bootstrap_fail "npm ci in web/dashboard failed"
        echo "$wanted" >"$NPM_STAMP"
    fi
    if [[ ! -f "$DASHBOARD_BUILT" ]]; then
        echo "bootstrap: building the dashboard (npm run build)"
        (cd "$DASHBOARD_SRC" && npm run --silent build) || bootstrap_fail "npm run build failed"
    fi
}

bootstrap() {
    ensure_venv
    ensure_dev_install
    ensure_server_packages
    ensure_node_modules
    ensure_dashboard_packages
}

bootstrap
