#!/usr/bin/env bash
# Set up .venv with the test extras, then run the test suite (arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test tflite
# The JS clients' dependencies from their lockfiles, when Node is here: onnxruntime-node for
# clients/node, onnxruntime-web and LiteRT.js (their WASM files) for the page in edge_siamese/app/web.
if command -v npm >/dev/null; then
    npm ci --prefix clients/node --no-audit --no-fund --silent
    npm ci --prefix edge_siamese/app/web --no-audit --no-fund --silent
fi
.venv/bin/python -m pytest "$@"
