#!/usr/bin/env bash
# Installs fireflyer into .venv and runs the main job: a DeepSeek-V3-sized expert placement.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh
exec .venv/bin/python -m balancer --demo "$@"
