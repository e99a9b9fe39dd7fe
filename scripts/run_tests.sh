#!/usr/bin/env bash
# The test suite: sets up .venv with the dev extras, lints, runs pytest on 2 workers, then the MONAI Deploy
# operators' test in its own environment (scripts/test_deploy.sh; SKIP_DEPLOY=1 leaves it out).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
.venv/bin/ruff check monai_cfx tests benchmarks tutorials
.venv/bin/ruff format --check monai_cfx tests benchmarks tutorials
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# one OpenMP thread per pytest worker: two workers with two threads each on two cores spin-wait and
# run many times slower than one thread each
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/python -m pytest -n 2 --durations=10 "$@"
if [ "${SKIP_DEPLOY:-0}" != 1 ]; then
    bash scripts/test_deploy.sh
fi
