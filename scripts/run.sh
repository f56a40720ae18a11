#!/usr/bin/env bash
# The main job: set up, compile SmolLM2-135M with the default recipe (w4a16) for
# onnxruntime, evaluate fp32 vs compiled perplexity (PROTOCOL), bytes and latency.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lowbit main "$@"
