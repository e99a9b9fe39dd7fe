#!/usr/bin/env bash
# The test suite: sets up .venv with the dev extras, lints, then runs pytest on 2 workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
.venv/bin/ruff check monai_cfx tests benchmarks tutorials
.venv/bin/ruff format --check monai_cfx tests benchmarks tutorials
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest -n 2 --durations=10 "$@"
