#!/usr/bin/env bash
# Set up .venv with the test extras, then run the test suite (arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test tflite
.venv/bin/python -m pytest "$@"
