#!/usr/bin/env bash
# One command that trains the 3D lesion recipe (configs/3d_lesion.json) when a GPU is lent: the autoencoder with the
# hard-voxel loss and 8 latent channels, then the 3D diffusion UNet on its latents with attention at every level and a
# text budget that fits the brain reports, then the autoencoder's lesion contrast and the bundle's 3D evaluation.
# Everything goes into MODEL_DIR (default: models_accelerated/ in this bundle; never models/ unless you set it so), the
# shipped 3D oracle is copied there for the evaluation.
#
#   bash bundles/latent_diffusion/scripts/train_on_accelerator.sh              # on a GPU (mixed precision)
#   DRY_RUN=1 bash bundles/latent_diffusion/scripts/train_on_accelerator.sh    # print the commands only
#   AE_EPOCHS=1 DIFFUSION_EPOCHS=1 EPOCH_LENGTH=2 NUM_INFERENCE_STEPS=2 SAMPLES_PER_PROMPT_CLASS=2 \
#       MODEL_DIR=/tmp/smoke bash bundles/latent_diffusion/scripts/train_on_accelerator.sh  # a smoke run on a CPU
#
# The training configs turn on MONAI's amp when torch.cuda.is_available(); on a CPU the same commands run in float32.
# Every training run saves its whole state after each epoch, so the same command started again (for example after a
# device call's time limit) continues where it stopped; a larger AE_EPOCHS or DIFFUSION_EPOCHS continues a finished run.
# The epochs default to the config's (the CPU recipe); they have not been timed on a GPU.
set -euo pipefail
# a relative MODEL_DIR or PYTHON path is the caller's, not the bundle's
case "${MODEL_DIR:-}" in ""|/*) ;; *) MODEL_DIR="$PWD/$MODEL_DIR" ;; esac
case "${PYTHON:-}" in */*) [ "${PYTHON#/}" != "$PYTHON" ] || PYTHON="$PWD/$PYTHON" ;; esac
cd "$(dirname "$0")/.."
MODEL_DIR="${MODEL_DIR:-models_accelerated}"
PYTHON="${PYTHON:-python}"
# unset: the config's epochs (the autoencoder's are 400 iterations of 2 volumes, the UNet's 50 of 16 latents)
AE_EPOCHS=(${AE_EPOCHS:+--max_epochs "$AE_EPOCHS"})
DIFFUSION_EPOCHS=(${DIFFUSION_EPOCHS:+--max_epochs "$DIFFUSION_EPOCHS"})
EPOCH_LENGTH="${EPOCH_LENGTH:-None}"        # None: full epochs
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

run() {  # run <config names> [overrides...]
    local configs="$1"
    shift
    local command=("$PYTHON" -m monai.bundle run --config_file "$configs" --meta_file configs/metadata.json
                   --logging_file configs/logging.conf --model_dir "$MODEL_DIR" "$@")
    echo "+ $(printf "%q " "${command[@]}")"
    [ "${DRY_RUN:-0}" = 1 ] || "${command[@]}"
}

[ "${DRY_RUN:-0}" = 1 ] || { mkdir -p "$MODEL_DIR" && cp -n models/oracle_3d.pt "$MODEL_DIR/"; }
run "['configs/inference.json','configs/train_autoencoder.json','configs/3d.json','configs/3d_lesion.json']" \
    ${AE_EPOCHS[@]+"${AE_EPOCHS[@]}"} --epoch_length "$EPOCH_LENGTH"
run "['configs/inference.json','configs/train_diffusion.json','configs/3d.json','configs/3d_lesion.json']" \
    ${DIFFUSION_EPOCHS[@]+"${DIFFUSION_EPOCHS[@]}"} --epoch_length "$EPOCH_LENGTH"
if [ "${DRY_RUN:-0}" != 1 ]; then
    "$PYTHON" scripts/lesion_contrast.py --dims 3d_lesion --model_dir "$MODEL_DIR" \
        | tee "$MODEL_DIR/lesion_contrast_3d.json"
fi
run "['configs/inference.json','configs/evaluate.json','configs/3d.json','configs/3d_lesion.json']" \
    --output_dir "$MODEL_DIR/eval_3d" --num_inference_steps "${NUM_INFERENCE_STEPS:-50}" --samples_per_prompt_class "${SAMPLES_PER_PROMPT_CLASS:-32}" \
    --overwrite True
