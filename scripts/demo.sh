#!/usr/bin/env bash
# Set up (first run only) and run the demo: a hub plus N edge clients on this machine.
# Arguments go to `ffm-hub demo` (see `ffm-hub demo --help`), e.g. scripts/demo.sh --clients 4 --rounds 8
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${FFM_VENV:-.venv}/bin/ffm-hub" demo "$@"
