#!/usr/bin/env bash
# The main job on the embedded defaults: sets up .venv, then writes outputs/main (override: OUTPUT_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
OUTPUT_DIR="${OUTPUT_DIR:-outputs/main}"
exec .venv/bin/python -m monai_cfx.apps.showcase --output_dir "$OUTPUT_DIR" --overwrite "$@"
