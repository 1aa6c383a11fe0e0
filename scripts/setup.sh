#!/usr/bin/env bash
# Create .venv (if missing) and install shardmesh with its test tools, torch pinned to the CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
# Debian's docker-compose (v1) checks the files in deploy/compose (tests/test_deploy.py); no engine needed.
if ! command -v docker-compose >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing docker-compose (apt)"
    # Quiet unless it fails: then its whole output, and setup fails.
    if ! apt_log=$( { apt-get update -qq && DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=a \
            apt-get install -y -qq docker-compose; } 2>&1 ); then
        echo "$apt_log" >&2
        exit 1
    fi
fi
# Debian's Prometheus scrapes the services' --metrics-port in tests/test_metrics_prometheus.py.
if ! command -v prometheus >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing prometheus (apt)"
    if ! apt_log=$( { apt-get update -qq && DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=a \
            apt-get install -y -qq --no-install-recommends prometheus; } 2>&1 ); then
        echo "$apt_log" >&2
        exit 1
    fi
fi
