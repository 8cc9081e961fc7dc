#!/usr/bin/env bash
# Set up a virtualenv with the CPU build of torch (constraints.txt) and run lint + the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
