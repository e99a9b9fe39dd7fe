"""Cost against quality of Mediffusion's classifier-guided counterfactuals: UNet evaluations and seconds per image
against oracle validity, the adversarial fraction, localisation AUROC and L1 to the healthy twin outside the finding.

Runs ``evaluate_counterfactual.json`` (from any folder, with ``--bundle_root``) once per setting of steps and noise
strength, each at the guidance scales ``--guidance_scales``, on ``--num_items`` abnormal phantoms of one split,
skipping settings whose ``metrics.json`` already exists; then writes ``cost_study.md`` and ``cost_study.png`` into
``--out``. The evaluations per image are counted during the edits (``evaluate_counterfactuals``): the inversion's
and the denoiser's passes, plus one pass of the head's features per guided step, which is also back-propagated.

    python bundles/mediffusion/scripts/cost_study.py --model_name joint_2d_0.1_cw0.01 --split validation \
        --out /tmp/mediffusion_cost_validation
    python bundles/mediffusion/scripts/cost_study.py --model_name joint_2d_0.1_cw0.01 --split testing --num_items 64 \
        --out /tmp/mediffusion_cost_testing --settings s50_0.6 s10_0.6 --guidance_scales 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1]
# name -> (DDIM steps, noise strength): s<steps>_<strength>
SETTINGS = {"s50_0.6": (50, 0.6), "s20_0.6": (20, 0.6), "s10_0.6": (10, 0.6), "s10_0.8": (10, 0.8), "s5_0.6": (5, 0.6)}
MEASURES = ("validity", "head_validity", "adversarial", "localization_auroc", "twin_l1_outside")


def run(name: str, args: argparse.Namespace) -> Path:
    folder = args.out / name
    if (folder / "metrics.json").is_file():
        return folder
    steps, strength = SETTINGS[name]
    configs = [str(BUNDLE / "configs" / c) for c in ("inference.json", "evaluate_counterfactual.json")]
    command = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(BUNDLE), "--config_file",
               json.dumps(configs), "--meta_file", str(BUNDLE / "configs" / "metadata.json"), "--output_dir",
               str(folder), "--data_list_key", args.split, "--num_items", str(args.num_items), "--model_name",
               args.model_name, "--num_inference_steps", str(steps), "--noise_strength", str(strength),
               "--guidance_scales", json.dumps(args.guidance_scales)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, cwd=args.out)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name", required=True, help="a trained joint model in bundles/mediffusion/models")
    parser.add_argument("--split", default="validation", choices=["validation", "testing"])
    parser.add_argument("--num_items", type=int, default=32)
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[5.0, 10.0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.settings:
        metrics = json.loads((run(name, args) / "metrics.json").read_text())
        for scale, row in metrics["sweep"].items():
            rows.append({"name": name, "steps": SETTINGS[name][0], "strength": SETTINGS[name][1],
                         "scale": float(scale), "n": metrics["num_images"], **row})  # fmt: skip
    rows.sort(key=lambda row: (row["unet_evaluations_per_image"], row["scale"]))
    columns = ["setting", "steps", "strength", "guidance", "UNet evaluations / image", "seconds / image", "n",
               *MEASURES]  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cost = [f"{row['unet_evaluations_per_image']:.0f}", f"{row['seconds_per_image']:.2f}"]
        cells = [row["name"], row["steps"], row["strength"], f"{row['scale']:g}", *cost, row["n"],
                 *(f"{row[key]:.3f}" for key in MEASURES)]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    table = "\n".join(lines)
    (args.out / "cost_study.md").write_text(f"{args.split} split, model {args.model_name}\n\n{table}\n")
    print(table)
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for axis, key in zip(axes, ("validity", "localization_auroc", "twin_l1_outside")):
        for scale in sorted({row["scale"] for row in rows}):
            chosen = [row for row in rows if row["scale"] == scale]
            axis.plot([r["unet_evaluations_per_image"] for r in chosen], [r[key] for r in chosen], "o",
                      label=f"guidance {scale:g}")  # fmt: skip
            for row in chosen:
                axis.annotate(row["name"], (row["unet_evaluations_per_image"], row[key]), fontsize=7,
                              xytext=(4, 4), textcoords="offset points")  # fmt: skip
        axis.set_xlabel("UNet evaluations per image")
        axis.set_ylabel(key.replace("_", " ") + (" (oracle)" if key == "validity" else ""))
        axis.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    figure.subplots_adjust(wspace=0.3)
    figure.suptitle(f"Mediffusion counterfactual cost against quality ({args.split} split, 2D chest phantoms)")
    figure.savefig(args.out / "cost_study.png", dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
