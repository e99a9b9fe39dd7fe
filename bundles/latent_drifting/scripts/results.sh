#!/usr/bin/env bash
# The results of docs/README.md. Run from the bundle folder: bash scripts/results.sh [2d|3d] [extra overrides...]
#  A. drift search at sampling time on the pretrained source model, over the paper's grid [-0.2, 0.2];
#  B. drift search at training time, as Latent Drifting uses delta: mode 'full' fine-tuned with each delta of
#     TRAIN_DRIFTS and sampled with it, judged by Monte-Carlo L1 to the target training set;
#  C. every mode fine-tuned and evaluated on held-out target images with delta = 0 and with B's best delta (its best
#     non-zero one when delta = 0 wins, so that there is a drift to compare).
# Writes eval/<dims>/ (checkpoints, searches, metrics) and prints the table (scripts/results_table.py).
set -euo pipefail
dims="${1:-2d}"; shift || true
TRAIN_DRIFTS="${TRAIN_DRIFTS:--0.005 0.0 0.005}"
configs() { if [ "$dims" = 3d ]; then echo "['configs/inference.json','configs/$1.json','configs/3d.json']"; else echo "['configs/inference.json','configs/$1.json']"; fi; }
run() { python -m monai.bundle run --meta_file configs/metadata.json --logging_file configs/logging.conf --config_file "$(configs "$1")" "${@:2}"; }
out="eval/$dims"
mkdir -p "$out"
finetune() {  # mode drift
  local run_dir="$out/$1_d$2"
  [ -f "$run_dir/finetuned.pt" ] || run finetune --mode "$1" --drift "$2" --finetuned_path "$run_dir/finetuned.pt" "${extra[@]}"
}
extra=("$@")

[ -f "$out/search_pretrained/drift_search.json" ] || run drift_search --output_dir "$out/search_pretrained" "$@"
for drift in $TRAIN_DRIFTS; do
  finetune full "$drift"
  search="$out/full_d$drift/search"
  [ -f "$search/drift_search.json" ] || run drift_search --finetuned_path "$out/full_d$drift/finetuned.pt" \
    --drift_low "$drift" --drift_high "$drift" --drift_num 1 --output_dir "$search" "$@"
done
best=$(python scripts/results_table.py "$out" --comparison-drift)
echo "training-time search: drift compared with 0: $best"
for mode in full dreambooth textual_inversion custom_diffusion; do
  for drift in 0.0 "$best"; do
    finetune "$mode" "$drift"
    run_dir="$out/${mode}_d$drift"
    [ -f "$run_dir/metrics.json" ] || run evaluate --mode "$mode" --finetuned_path "$run_dir/finetuned.pt" --output_dir "$run_dir" "$@"
  done
done
[ -f "$out/pretrained_d0.0/metrics.json" ] || run evaluate --finetuned_path "\$None" --output_dir "$out/pretrained_d0.0" "$@"
python scripts/results_table.py "$out"
