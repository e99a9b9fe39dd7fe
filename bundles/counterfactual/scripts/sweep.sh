#!/usr/bin/env bash
# The results of docs/README.md: evaluate.json over a noise_strength sweep, SDEdit against DDIM inversion, and
# disease induction, for 2D or 3D. Run from the bundle folder: bash scripts/sweep.sh 2d|3d <results dir>
set -euo pipefail
dims=${1:?2d or 3d}
out=${2:?results folder}
configs="['configs/inference.json','configs/evaluate.json']"
extra=()
if [ "$dims" = 3d ]; then configs="['configs/inference.json','configs/evaluate.json','configs/3d.json']"; fi
run() {  # <name> <config list> <overrides...>
    local name=$1 list=$2
    shift 2
    python -m monai.bundle run --config_file "$list" --meta_file configs/metadata.json \
        --logging_file configs/logging.conf --output_dir "$out/$name" "${extra[@]}" "$@"
}
# the sweep tables were measured at 50 steps with guidance on every step (the 20-evaluation default: cost_study.py)
extra+=(--num_inference_steps 50 --guided_steps None)
for strength in 0.02 0.1 0.2 0.4 0.6 0.8 1.0; do
    run "inversion_$strength" "$configs" --start inversion --noise_strength "$strength"
done
run "noise_0.4" "$configs" --start noise --noise_strength 0.4
induce="${configs%]},'configs/induce.json']"
run "induce_0.6" "$induce" --start inversion --noise_strength 0.6
