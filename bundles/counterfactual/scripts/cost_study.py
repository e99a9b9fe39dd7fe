"""Cost against quality of the counterfactual bundle's edit: UNet image-evaluations per image against localisation
AUROC, validity and L1 to the healthy twin outside the finding.

Runs ``evaluate.json`` (from any folder, with ``--bundle_root``) once per setting on one split of the held-out
phantoms, skipping settings whose ``metrics.json`` already exists, then writes ``cost_study.md`` (the table) and
``cost_study.png`` (the figure) into ``--out``. The evaluations per image come from
``CounterfactualInferer.num_unet_evaluations`` (a test pins it to a count of the UNet's calls).

    python bundles/counterfactual/scripts/cost_study.py --split validation --out /tmp/cost_validation
    python bundles/counterfactual/scripts/cost_study.py --split testing --out /tmp/cost_testing \
        --settings s50_0.6_g3 s10_0.6_g3
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
from monai.networks.schedulers import DDIMScheduler  # noqa: E402

from monai_cfx.inferers import CounterfactualInferer  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1]

# name -> overrides of evaluate.json: s<steps>_<noise strength>_g<guidance scale>[_k<guided steps>]
SETTINGS: dict[str, dict[str, float | int]] = {
    "s50_0.6_g3": {"num_inference_steps": 50, "noise_strength": 0.6, "guidance_scale": 3.0},
    "s20_0.6_g3": {"num_inference_steps": 20, "noise_strength": 0.6, "guidance_scale": 3.0},
    "s12_0.5_g3": {"num_inference_steps": 12, "noise_strength": 0.5, "guidance_scale": 3.0},
    "s10_0.6_g3": {"num_inference_steps": 10, "noise_strength": 0.6, "guidance_scale": 3.0},
    "s10_0.8_g3": {"num_inference_steps": 10, "noise_strength": 0.8, "guidance_scale": 3.0},
    "s10_0.6_g1": {"num_inference_steps": 10, "noise_strength": 0.6, "guidance_scale": 1.0},
    "s5_0.6_g3": {"num_inference_steps": 5, "noise_strength": 0.6, "guidance_scale": 3.0},
    "s8_0.8_g3": {"num_inference_steps": 8, "noise_strength": 0.8, "guidance_scale": 3.0},
    "s7_0.85_g3": {"num_inference_steps": 7, "noise_strength": 0.85, "guidance_scale": 3.0},
    "s6_1.0_g3": {"num_inference_steps": 6, "noise_strength": 1.0, "guidance_scale": 3.0},
    "s10_0.8_g3_k4": {"num_inference_steps": 10, "noise_strength": 0.8, "guidance_scale": 3.0, "guided_steps": 4},
    "s10_0.8_g3_k2": {"num_inference_steps": 10, "noise_strength": 0.8, "guidance_scale": 3.0, "guided_steps": 2},
    "s7_0.85_g3_k3": {"num_inference_steps": 7, "noise_strength": 0.85, "guidance_scale": 3.0, "guided_steps": 3},
    "s10_0.8_g1": {"num_inference_steps": 10, "noise_strength": 0.8, "guidance_scale": 1.0},
}
MEASURES = ("validity", "localization_auroc", "twin_l1_outside", "twin_l1_inside", "ssim")


def run(name: str, overrides: dict, split: str, out: Path) -> Path:
    folder = out / name
    if (folder / "metrics.json").is_file():
        return folder
    configs = [str(BUNDLE / "configs" / c) for c in ("inference.json", "evaluate.json")]
    command = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(BUNDLE), "--config_file",
               json.dumps(configs), "--output_dir", str(folder), "--data_list_key", split]  # fmt: skip
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, cwd=out)
    return folder


def evaluations(settings: dict) -> int:
    inferer = CounterfactualInferer(
        DDIMScheduler(num_train_timesteps=1000),
        noise_strength=settings["noise_strength"],
        num_inference_steps=settings["num_inference_steps"],
        start=settings["start"],
        guidance_scale=settings["guidance_scale"],
        guided_steps=settings.get("guided_steps"),
    )
    return inferer.num_unet_evaluations()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="validation", choices=["validation", "testing"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.settings:
        metrics = json.loads((run(name, SETTINGS[name], args.split, args.out) / "metrics.json").read_text())
        settings = metrics["settings"]
        rows.append({"name": name, "evaluations": evaluations(settings), **settings,
                     **{key: metrics[key] for key in MEASURES}})  # fmt: skip
    rows.sort(key=lambda row: row["evaluations"])
    columns = ["setting", "steps", "strength", "guidance", "guided steps", "UNet evaluations / image", "n", *MEASURES]
    header = "| " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * len(columns)]
    for row in rows:
        guided = "all" if row.get("guided_steps") is None else row["guided_steps"]
        cells = [row["name"], row["num_inference_steps"], row["noise_strength"], row["guidance_scale"], guided,
                 row["evaluations"], row["num_items"], *(f"{row[key]:.3f}" for key in MEASURES)]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    table = "\n".join(lines)
    (args.out / "cost_study.md").write_text(f"{args.split} split\n\n{table}\n")
    print(table)
    # the cheapest setting at each quality: a setting no cheaper one beats in localisation AUROC
    frontier, best = [], -1.0
    for row in rows:
        if row["localization_auroc"] > best:
            frontier.append(row)
            best = row["localization_auroc"]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for axis, key in zip(axes, ("localization_auroc", "twin_l1_outside")):
        points = axis.scatter([r["evaluations"] for r in rows], [r[key] for r in rows],
                              c=[r["noise_strength"] for r in rows], cmap="viridis", vmin=0.4, vmax=1.0)  # fmt: skip
        axis.plot([r["evaluations"] for r in frontier], [r[key] for r in frontier], "k--", lw=0.8, label="cheapest")
        if key == "localization_auroc":  # names on one panel, alternating above and below
            for index, row in enumerate(frontier):
                axis.annotate(row["name"], (row["evaluations"], row[key]), fontsize=7,
                              xytext=(5, 6 if index % 2 else -11), textcoords="offset points")  # fmt: skip
        axis.set_xlabel("UNet evaluations per image")
        axis.set_ylabel(key.replace("_", " "))
        axis.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    figure.colorbar(points, ax=axes, label="noise strength")
    figure.suptitle(f"Counterfactual cost against quality ({args.split} split, 2D chest phantoms)")
    figure.savefig(args.out / "cost_study.png", dpi=120)


if __name__ == "__main__":
    main()
