#!/usr/bin/env bash
# Set up .venv with the test extras, then run the test suite (arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test tflite
# The Node client's dependencies (onnxruntime-node, from its lockfile), when Node is here.
if command -v npm >/dev/null; then npm ci --prefix clients/node --no-audit --no-fund --silent; fi
.venv/bin/python -m pytest "$@"
