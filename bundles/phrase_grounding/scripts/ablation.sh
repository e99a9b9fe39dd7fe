#!/usr/bin/env bash
# The ablation of docs/README.md on the validation split (the test split is measured only with the settings chosen
# here): attention layers x capture window, then the inversion spacing and drive at the default layers and the
# reference's middle window. Several copies may run at once on the same folder (each run is claimed by creating its
# folder); delete a failed run's folder to redo it.
# Run from the bundle folder: bash scripts/ablation.sh 2d|3d <results dir> [overrides, e.g. --dataset_dir ...]
set -euo pipefail
dims=${1:?2d or 3d}
out=${2:?results folder}
shift 2
configs="['configs/inference.json','configs/evaluate.json']"
if [ "$dims" = 3d ]; then configs="['configs/inference.json','configs/evaluate.json','configs/3d.json']"; fi
mkdir -p "$out"
run() {  # <name> <overrides...>
    local name=$1
    shift
    mkdir "$out/$name" 2>/dev/null || return 0
    python -m monai.bundle run --config_file "$configs" --meta_file configs/metadata.json \
        --logging_file configs/logging.conf --data_list_key validation --output_dir "$out/$name" "$@"
}
layer_sets=(middle 0 1 "[0,1]" all)  # 2D: levels 0 (16x16), 1 (8x8), 2 ("middle", 4x4)
if [ "$dims" = 3d ]; then layer_sets=(middle 1 all); fi  # the 3D UNet has attention at levels 1 and 2
for layers in "${layer_sets[@]}"; do
    tag=$(echo "$layers" | tr -d '[]' | tr , _)
    for window in "0.0,0.2" "0.2,0.4" "0.4,0.6" "0.6,0.8" "0.8,1.0"; do
        run "layers_${tag}_window_${window/,/_}" --attention_layers "$layers" --capture_window "[$window]" "$@"
    done
done
for spacing in leading linspace; do
    run "window_0.4_0.6_spacing_$spacing" --capture_window "[0.4,0.6]" --timestep_spacing "$spacing" "$@"
done
run "window_0.4_0.6_drive_cond" --capture_window "[0.4,0.6]" --drive cond "$@"
