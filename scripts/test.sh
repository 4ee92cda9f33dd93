#!/usr/bin/env bash
# Installs fireflyer with its test extras into .venv and runs the whole test suite on
# 8 fake CPU devices (tests/conftest.py sets XLA_FLAGS). Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh test || exit 1

.venv/bin/python -m pytest -n auto -p no:cacheprovider "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$status"
