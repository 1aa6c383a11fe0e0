#!/usr/bin/env bash
# Set up (see setup.sh) and run the main job: a local mesh on loopback, checked against transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/shardmesh demo "$@"
