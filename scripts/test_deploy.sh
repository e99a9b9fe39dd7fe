#!/usr/bin/env bash
# The MONAI Deploy operators' test in an environment of its own (.venv-deploy, or $MONAI_CFX_DEPLOY_VENV): the
# App SDK brings holoscan, CuPy and the Triton client (about 330 MB, 19 s to install here) and changes what
# `import monai` loads (its DICOM modules then need highdicom, which the SDK does not declare), so the main
# environment stays without it. scripts/run_tests.sh runs this after the main suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export MONAI_CFX_VENV="${MONAI_CFX_DEPLOY_VENV:-.venv-deploy}"
bash scripts/setup_env.sh dev
"$MONAI_CFX_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "monai-deploy-app-sdk==4.0.0" "highdicom==0.28.2"
ulimit -s 32768 2>/dev/null || true  # holoscan asks for a 32 MB stack
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$MONAI_CFX_VENV/bin/python" -m pytest -p no:cacheprovider tests/apps/test_deploy.py "$@"
