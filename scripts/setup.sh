#!/usr/bin/env bash
# Create .venv with the CPU build of torch and edge-siamese (editable); extra names as arguments,
# e.g. `scripts/setup.sh test`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# The CPU build first: an unconstrained torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
extras=$(IFS=,; echo "$*")
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
