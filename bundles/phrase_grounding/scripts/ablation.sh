#!/usr/bin/env bash
# The ablation of docs/README.md: evaluate.json over attention layers x capture window on the validation split,
# then inversion spacing and drive; the test split is only measured with the settings chosen here.
# Run from the bundle folder: bash scripts/ablation.sh 2d|3d <results dir> [extra overrides, e.g. --dataset_dir ...]
set -euo pipefail
dims=${1:?2d or 3d}
out=${2:?results folder}
shift 2
configs="['configs/evaluate.json']"
if [ "$dims" = 3d ]; then configs="['configs/evaluate.json','configs/3d.json']"; fi
run() {  # <name> <overrides...>
    local name=$1
    shift
    [ -f "$out/$name/metrics.json" ] && return 0
    python -m monai.bundle run --config_file "$configs" --meta_file configs/metadata.json \
        --logging_file configs/logging.conf --data_list_key validation --output_dir "$out/$name" "$@"
}
for layers in middle 1 all; do
    for window in "0.0,0.2" "0.4,0.6" "0.8,1.0"; do
        run "layers_${layers}_window_${window/,/_}" --attention_layers "$layers" --capture_window "[$window]" "$@"
    done
done
