#!/usr/bin/env bash
# Creates .venv at the repository root (once) and installs fireflyer into it, editable.
# Usage: scripts/install.sh [EXTRAS]   e.g. scripts/install.sh test
# Needs only Python >= 3.11 with venv; on a bare Debian machine run as root it installs
# python3-venv first.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
extras=${1:-}

if ! command -v "$python" >/dev/null 2>&1; then
  echo "install.sh: '$python' not found; install Python 3.11 or newer (or set PYTHON)" >&2
  exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "install.sh: fireflyer needs Python >= 3.11, '$python' is $("$python" -V 2>&1)" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  if ! "$python" -m venv .venv >/dev/null 2>&1; then
    rm -rf .venv
    # Debian splits venv (ensurepip) into its own package.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      version=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
      echo "install.sh: installing python${version}-venv with apt-get" >&2
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python${version}-venv" >/dev/null
      "$python" -m venv .venv
    else
      echo "install.sh: '$python -m venv' failed; on Debian install python3-venv" >&2
      exit 1
    fi
  fi
fi

spec="."
[ -n "$extras" ] && spec=".[$extras]"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
