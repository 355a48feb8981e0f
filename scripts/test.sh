#!/usr/bin/env bash
# Set up (first run only, with the dev tools and the ORT runtime) and run the test suite, then the linters.
# Arguments go to pytest, e.g. scripts/test.sh -k wire
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,ort
VENV="${FFM_VENV:-.venv}"
"$VENV/bin/python" -m pytest "$@"
if [ $# -eq 0 ]; then
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    "$VENV/bin/mypy" ffm_edge ffm_hub tests
fi
