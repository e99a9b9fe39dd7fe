"""The tables of scripts/results.sh and scripts/results_per_channel.sh (also written to <eval dir>/results.json):
the drift searches, and FID, KID and Monte-Carlo L1 of every run against held-out target images.

    python scripts/results_table.py eval/2d                      # print the tables
    python scripts/results_table.py eval/2d --comparison-drift   # print only the delta that C compares with 0
"""

import json
import sys
from pathlib import Path

import torch

from monai_cfx.utils import write_json

MODES = ("pretrained", "full", "dreambooth", "textual_inversion", "custom_diffusion")
out = Path(sys.argv[1] if len(sys.argv) > 1 else "eval/2d")


def load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def drift_text(drift) -> str:
    if isinstance(drift, list):
        return "[" + ", ".join(f"{value:+.4f}" for value in drift) + "]"
    return f"{drift:+.3f}"


# B: mode 'full' fine-tuned and sampled with each scalar delta, L1 to the target training set
training_search = []
for path in out.glob("full_d*/search/drift_search.json"):
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

searches = {}
for name, title in (("search_pretrained", "A. scalar"), ("search_pretrained_per_channel", "A2. per-channel")):
    search = load(out / name / "drift_search.json")
    if not search:
        continue
    searches[name] = {"best_drift": search["best_drift"], "rows": search["rows"]}
    print(f"{title} drift search at sampling time on the pretrained model, {search['num_samples']} samples against")
    print(f"the {search['num_target']} target training images; best by L1: {drift_text(search['best_drift'])}")
    print("| δ | L1 | FID | KID |")
    print("|---|---|---|---|")
    for row in search["rows"]:
        print(f"| {drift_text(row['drift'])} | {row['l1']:.4f} | {row['fid']:.2f} | {row['kid']:.3f} |")
    print()
print(f"B. training-time search, mode full (L1 to the target training set): best {best}, compared: {comparison}")
print("| δ | L1 | FID | KID |")
print("|---|---|---|---|")
for row in training_search:
    print(f"| {drift_text(row['drift'])} | {row['l1']:.4f} | {row['fid']:.2f} | {row['kid']:.3f} |")
print()

rows, floor = [], None
for path in out.glob("*/metrics.json"):
    metrics = load(path)
    floor = floor or metrics["real_vs_real"]
    training_drift = metrics.get("training_drift")
    if training_drift is None:  # metrics written before the key existed: read it from the checkpoint
        checkpoint = metrics.get("finetuned_path")
        training_drift = torch.load(checkpoint, weights_only=True)["drift"] if checkpoint else 0.0
    mode = metrics.get("mode") or "pretrained"
    generated = metrics["generated"]
    rows.append(
        {
            "run": path.parent.name,
            "mode": mode,
            "training_drift": training_drift,
            "sampling_drift": metrics["drift"],
            **{k: generated[k] for k in ("fid", "kid", "kid_std", "l1")},
        }
    )
rows.sort(key=lambda row: (MODES.index(row["mode"]), isinstance(row["training_drift"], list), str(row["run"])))
print("C. held-out target images (testing split), one sample per report")
print("| mode | δ in fine-tuning | δ in sampling | FID | KID (± std over subsets) | L1 |")
print("|---|---|---|---|---|---|")
for row in rows:
    kid = f"{row['kid']:.3f} ± {row['kid_std']:.3f}"
    trained = "-" if row["mode"] == "pretrained" else drift_text(row["training_drift"])
    sampled = drift_text(row["sampling_drift"])
    print(f"| {row['mode']} | {trained} | {sampled} | {row['fid']:.2f} | {kid} | {row['l1']:.4f} |")
if floor:
    kid = f"{floor['kid']:.3f} ± {floor['kid_std']:.3f}"
    print(f"| real vs real (floor) | | | {floor['fid']:.2f} | {kid} | {floor['l1']:.4f} |")
summary = {
    "searches": searches,
    "training_time_search": {"best_drift": best, "comparison_drift": comparison, "rows": training_search},
    "held_out": rows,
    "real_vs_real": floor,
}
write_json(summary, out / "results.json", overwrite=True)  # atomic
