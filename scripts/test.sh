#!/usr/bin/env bash
# Set up a virtualenv with the CPU build of torch (constraints.txt) and run lint, the format check and the whole
# test suite (extra arguments go to pytest, e.g. -m "not ray and not s3 and not slow" for the unit tier; -n 0 for
# one process). Two pytest-xdist workers, so one's waits on services and subprocesses overlap the other's work; the
# Ray tests run in turn on one of them (tests/conftest.py groups the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
# Azurite (the Azure Storage emulator of tests/test_azure.py) is a Node program; without npm those tests skip.
command -v azurite-blob >/dev/null || { command -v npm >/dev/null && npm install -g --silent azurite@3.35.0 || true; }
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q -n 2 --dist loadgroup "$@"
