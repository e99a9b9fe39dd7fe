#!/usr/bin/env bash
# The ablation of docs/README.md on the validation split (the test split is measured only with the settings chosen
# here): attention layers x capture window, then inversion spacing and drive. Several copies may run at once on the
# same folder (each run is claimed by creating its folder); delete a failed run's folder to redo it.
# Run from the bundle folder: bash scripts/ablation.sh 2d|3d <results dir> [overrides, e.g. --dataset_dir ...]
set -euo pipefail
dims=${1:?2d or 3d}
out=${2:?results folder}
shift 2
configs="['configs/evaluate.json']"
if [ "$dims" = 3d ]; then configs="['configs/evaluate.json','configs/3d.json']"; fi
mkdir -p "$out"
run() {  # <name> <overrides...>
    local name=$1
    shift
    mkdir "$out/$name" 2>/dev/null || return 0
    python -m monai.bundle run --config_file "$configs" --meta_file configs/metadata.json \
        --logging_file configs/logging.conf --data_list_key validation --output_dir "$out/$name" "$@"
}
for layers in middle 1 all; do
    for window in "0.0,0.2" "0.2,0.4" "0.4,0.6" "0.6,0.8" "0.8,1.0"; do
        run "layers_${layers}_window_${window/,/_}" --attention_layers "$layers" --capture_window "[$window]" "$@"
    done
done
for spacing in leading linspace; do
    run "layers_1_window_0.4_0.6_spacing_$spacing" --attention_layers 1 --timestep_spacing "$spacing" "$@"
done
run "layers_1_window_0.4_0.6_drive_cond" --attention_layers 1 --drive cond "$@"
