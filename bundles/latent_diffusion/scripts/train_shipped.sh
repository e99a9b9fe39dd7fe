#!/usr/bin/env bash
# Reproduce every shipped weight file of this bundle (models/) from its own configs, in the order and with the
# continuations they were trained with (docs/README.md, "Shipped weights and how they were trained"), into
# MODEL_DIR (default: models_reproduced/ in this bundle; never models/ unless you set it so).
#
#   bash bundles/latent_diffusion/scripts/train_shipped.sh            # about 10.5 hours on one CPU thread
#   DRY_RUN=1 bash bundles/latent_diffusion/scripts/train_shipped.sh  # print the commands only
#   ONLY=3d bash bundles/latent_diffusion/scripts/train_shipped.sh    # the 3D files only (2d: the 2D ones)
#
# Each run is resumable: started again after a kill, the same command continues from its last saved epoch. The
# continuations (--pretrained_path) start a fresh optimiser, as the shipped runs did, so they pass --resume false.
# The phantom datasets are written into data/ by the first run that needs them. Set PYTHON to choose the interpreter.
set -euo pipefail
# a relative MODEL_DIR or PYTHON path is the caller's, not the bundle's
case "${MODEL_DIR:-}" in ""|/*) ;; *) MODEL_DIR="$PWD/$MODEL_DIR" ;; esac
case "${PYTHON:-}" in */*) [ "${PYTHON#/}" != "$PYTHON" ] || PYTHON="$PWD/$PYTHON" ;; esac
cd "$(dirname "$0")/.."
MODEL_DIR="${MODEL_DIR:-models_reproduced}"
PYTHON="${PYTHON:-python}"
ONLY="${ONLY:-all}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

run() {  # run <config names> [overrides...]
    local configs="$1"
    shift
    local command=("$PYTHON" -m monai.bundle run --config_file "$configs" --meta_file configs/metadata.json
                   --logging_file configs/logging.conf --model_dir "$MODEL_DIR" "$@")
    echo "+ $(printf "%q " "${command[@]}")"
    [ "${DRY_RUN:-0}" = 1 ] || "${command[@]}"
}

if [ "$ONLY" = all ] || [ "$ONLY" = 2d ]; then
    run "['configs/inference.json','configs/train_autoencoder.json']"
    run "['configs/inference.json','configs/train_diffusion.json']"
    run "['configs/inference.json','configs/train_diffusion.json']" --pretrained_path "$MODEL_DIR/diffusion_2d.pt" \
        --max_epochs 60 --resume false
    run "['configs/inference.json','configs/train_diffusion.json']" --pretrained_path "$MODEL_DIR/diffusion_2d.pt" \
        --max_epochs 20 --resume false
    run "['configs/inference.json','configs/train_diffusion.json','configs/attention_all_levels.json']" --max_epochs 160
    run "['configs/inference.json','configs/train_oracle.json']"
    run "['configs/inference.json','configs/train_oracle.json']" --pretrained_path "$MODEL_DIR/oracle_2d.pt" \
        --resume false
    # the 2D lesion recipe: its own autoencoder and UNet (*_2d_lesion.pt), the oracle above is shared
    run "['configs/inference.json','configs/train_autoencoder.json','configs/2d_lesion.json']"
    run "['configs/inference.json','configs/train_diffusion.json','configs/2d_lesion.json']"
fi
if [ "$ONLY" = all ] || [ "$ONLY" = 3d ]; then
    run "['configs/inference.json','configs/train_autoencoder.json','configs/3d.json']"
    run "['configs/inference.json','configs/train_autoencoder.json','configs/3d.json']" \
        --pretrained_path "$MODEL_DIR/autoencoder_3d.pt" --max_epochs 5 --resume false
    run "['configs/inference.json','configs/train_diffusion.json','configs/3d.json']"
    run "['configs/inference.json','configs/train_oracle.json','configs/3d.json']"
    run "['configs/inference.json','configs/train_oracle.json','configs/3d.json']" \
        --pretrained_path "$MODEL_DIR/oracle_3d.pt" --max_epochs 15 --resume false
    # the 3D lesion recipe: its own autoencoder and UNet (*_3d_lesion.pt), the oracle above is shared
    run "['configs/inference.json','configs/train_autoencoder.json','configs/3d.json','configs/3d_lesion.json']"
    run "['configs/inference.json','configs/train_diffusion.json','configs/3d.json','configs/3d_lesion.json']"
fi
