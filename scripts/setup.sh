#!/usr/bin/env bash
# Create .venv with the CPU build of torch and edge-siamese (editable); extra names as arguments,
# e.g. `scripts/setup.sh test`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# torch and torchvision first, as a matching pair: PyPI's torchvision imports only beside PyPI's
# torch build of its own version (beside the CPU build it fails with "operator torchvision::nms
# does not exist"). That build carries CUDA libraries (about 5.5 GB in the venv) and runs on the CPU.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
extras=$(IFS=,; echo "$*")
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
