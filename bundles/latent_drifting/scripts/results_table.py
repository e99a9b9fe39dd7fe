"""The table of scripts/results.sh (also written to <eval dir>/results.json): FID, KID and Monte-Carlo L1 of every
mode against held-out target images with delta = 0 and with the training-time search's best delta.

    python scripts/results_table.py eval/2d                         # print the tables
    python scripts/results_table.py eval/2d --comparison-drift      # print only the delta that C compares with 0
"""

import json
import sys
from pathlib import Path

MODES = ("pretrained", "full", "dreambooth", "textual_inversion", "custom_diffusion")
out = Path(sys.argv[1] if len(sys.argv) > 1 else "eval/2d")


def load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


# B: mode 'full' fine-tuned and sampled with each delta, L1 to the target training set
training_search = []
for path in sorted(out.glob("full_d*/search/drift_search.json")):
    row = load(path)["rows"][0]
    training_search.append({k: row[k] for k in ("drift", "l1", "fid", "kid", "kid_std")})
training_search.sort(key=lambda row: row["drift"])
best = min(training_search, key=lambda row: row["l1"])["drift"] if training_search else None
# the drift that C compares with delta = 0: the best one, or the best non-zero one when delta = 0 wins
drifted = [row for row in training_search if row["drift"] != 0]
comparison = best if best != 0 else (min(drifted, key=lambda row: row["l1"])["drift"] if drifted else None)
if "--comparison-drift" in sys.argv:
    print(comparison)
    sys.exit(0)

sampling_search = load(out / "search_pretrained" / "drift_search.json")
if sampling_search:
    best_sampling = sampling_search["best_drift"]
    print(f"A. sampling-time search on the pretrained model (L1 to the target training set): best {best_sampling}")
    print("| δ | " + " | ".join(f"{row['drift']:+.2f}" for row in sampling_search["rows"]) + " |")
    print("|---|" + "---|" * len(sampling_search["rows"]))
    print("| L1 | " + " | ".join(f"{row['l1']:.4f}" for row in sampling_search["rows"]) + " |")
    print()
print(f"B. training-time search, mode full (L1 to the target training set): best {best}, compared: {comparison}")
print("| δ | L1 | FID | KID |")
print("|---|---|---|---|")
for row in training_search:
    print(f"| {row['drift']:+.2f} | {row['l1']:.4f} | {row['fid']:.2f} | {row['kid']:.3f} |")
print()

rows, floor = [], None
for mode in MODES:
    for path in sorted(out.glob(f"{mode}_d*/metrics.json")):
        metrics = load(path)
        floor = floor or metrics["real_vs_real"]
        generated = metrics["generated"]
        rows.append(
            {"mode": mode, "drift": metrics["drift"], **{k: generated[k] for k in ("fid", "kid", "kid_std", "l1")}}
        )
print("C. held-out target images (testing split), one sample per report")
print("| mode | δ | FID | KID (± std over subsets) | L1 |")
print("|---|---|---|---|---|")
for row in rows:
    kid = f"{row['kid']:.3f} ± {row['kid_std']:.3f}"
    print(f"| {row['mode']} | {row['drift']:+.2f} | {row['fid']:.2f} | {kid} | {row['l1']:.4f} |")
if floor:
    kid = f"{floor['kid']:.3f} ± {floor['kid_std']:.3f}"
    print(f"| real vs real (floor) | | {floor['fid']:.2f} | {kid} | {floor['l1']:.4f} |")
summary = {
    "sampling_time_search": sampling_search
    and {"best_drift": sampling_search["best_drift"], "rows": sampling_search["rows"]},
    "training_time_search": {"best_drift": best, "comparison_drift": comparison, "rows": training_search},
    "held_out": rows,
    "real_vs_real": floor,
}
(out / "results.json").write_text(json.dumps(summary, indent=2))
