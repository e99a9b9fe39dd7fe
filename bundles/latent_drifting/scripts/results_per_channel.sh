#!/usr/bin/env bash
# The per-channel drift results of docs/README.md, after scripts/results.sh. Run from the bundle folder:
#   bash scripts/results_per_channel.sh [2d|3d] [extra overrides...]
#  A2. drift search at sampling time on the pretrained model along the source-to-target latent mean shift
#      (per channel, divided by the number of sampling steps), scales 0.125 to 1;
#  C2. the pretrained model and every mode's delta = 0 checkpoint sampled with A2's best per-channel drift;
#  T2. mode 'full' fine-tuned and sampled with that drift (all three places).
set -euo pipefail
dims="${1:-2d}"; shift || true
configs() { if [ "$dims" = 3d ]; then echo "['configs/inference.json','configs/$1.json','configs/3d.json']"; else echo "['configs/inference.json','configs/$1.json']"; fi; }
run() { python -m monai.bundle run --meta_file configs/metadata.json --logging_file configs/logging.conf --config_file "$(configs "$1")" "${@:2}"; }
out="eval/$dims"
search="$out/search_pretrained_per_channel"
[ -f "$search/drift_search.json" ] || run drift_search --per_channel True --output_dir "$search" "$@"
drift=$(python -c "import json; print(json.dumps(json.load(open('$search/drift_search.json'))['best_drift']))")
echo "per-channel drift: $drift"
[ -f "$out/pretrained_dchannel/metrics.json" ] || run evaluate --finetuned_path '$None' --drift "$drift" \
  --output_dir "$out/pretrained_dchannel" "$@"
for mode in full dreambooth textual_inversion custom_diffusion; do
  run_dir="$out/${mode}_d0.0_sampled_dchannel"
  [ -f "$run_dir/metrics.json" ] || run evaluate --mode "$mode" --finetuned_path "$out/${mode}_d0.0/finetuned.pt" \
    --drift "$drift" --output_dir "$run_dir" "$@"
done
run_dir="$out/full_dchannel"
[ -f "$run_dir/finetuned.pt" ] || run finetune --mode full --drift "$drift" --finetuned_path "$run_dir/finetuned.pt" "$@"
[ -f "$run_dir/metrics.json" ] || run evaluate --mode full --finetuned_path "$run_dir/finetuned.pt" --output_dir "$run_dir" "$@"
python scripts/results_table.py "$out"
