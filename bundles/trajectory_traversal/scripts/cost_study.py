"""Cost against quality of the trajectory traversal bundle: UNet image-evaluations per trajectory against CFRT.

Runs ``evaluate.json`` (from any folder, with ``--bundle_root``) once per setting on held-out seeds, skipping
settings whose ``metrics.json`` already exists, then writes ``cost_study.md`` (the table) and ``cost_study.png``
(the figure) into ``--out``. A setting is a number of DDIM steps with the swaps at the same fractions of the
trajectory as the default (λ = 0.1, 0.2, ..., 0.9 of the steps) and the swap window of CFRT at the same fractions
(0.1-0.3); the Bézier frames, guidance and prompts stay the bundle's. The evaluations per trajectory are the
network calls the sweep made (``TrajectoryTraversalInferer`` counts them) times two (both guidance branches).

    python bundles/trajectory_traversal/scripts/cost_study.py --seed 100 --out /tmp/traversal_cost_validation
    python bundles/trajectory_traversal/scripts/cost_study.py --seed 1000 --out /tmp/traversal_cost_testing \
        --settings s50 s20
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
SETTINGS = {f"s{steps}": steps for steps in (50, 30, 20, 10)}


def overrides(steps: int) -> dict[str, str]:
    stride = steps // 10
    swaps = [stride * k for k in range(1, 10)]
    return {
        "num_inference_steps": str(steps),
        "swap_steps": json.dumps(swaps),
        "swap_window": json.dumps([stride, 3 * stride]),
    }


def run(name: str, steps: int, seed: int, num_seeds: int, out: Path) -> Path:
    folder = out / name
    if (folder / "metrics.json").is_file():
        return folder
    configs = [str(BUNDLE / "configs" / c) for c in ("inference.json", "evaluate.json")]
    command = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(BUNDLE), "--config_file",
               json.dumps(configs), "--output_dir", str(folder), "--seed", str(seed), "--num_seeds", str(num_seeds),
               "--num_scans", "0"]  # fmt: skip
    for key, value in overrides(steps).items():
        command += [f"--{key}", value]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, cwd=out)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=100, help="first held-out seed (evaluate.json's test seeds: 1000)")
    parser.add_argument("--num_seeds", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.settings:
        metrics = json.loads(
            (run(name, SETTINGS[name], args.seed, args.num_seeds, args.out) / "metrics.json").read_text()
        )
        guided = 2 if metrics["settings"]["guidance_scale"] != 1.0 else 1
        for record in metrics["pairs"].values():
            rows.append({"name": name, "steps": SETTINGS[name], "pair": record["finding"],
                         "evaluations": guided * record["model_calls_per_trajectory"], "seconds": record["seconds"],
                         **{key: record[key] for key in ("cfrt_bezier", "cfrt_swaps", "neutral_free", "earliest_has",
                                                         "bezier_monotone", "identity_ssim_window")}})  # fmt: skip
    rows.sort(key=lambda row: (row["pair"], row["evaluations"]))
    columns = [
        "setting",
        "finding",
        "UNet evaluations / trajectory",
        "CFRT Bézier",
        "CFRT swaps",
        "neutral free",
        "earliest swap has it",
        "monotone",
        "SSIM window",
        f"seconds / {args.num_seeds} trajectories",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row["name"], row["pair"], f"{row['evaluations']:.0f}", *(f"{row[key]:.3f}" for key in (
            "cfrt_bezier", "cfrt_swaps", "neutral_free", "earliest_has", "bezier_monotone", "identity_ssim_window")),
            f"{row['seconds']:.0f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (args.out / "cost_study.md").write_text(f"seeds {args.seed}-{args.seed + args.num_seeds - 1}\n\n{table}\n")
    print(table)
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for axis, key in zip(axes, ("cfrt_bezier", "cfrt_swaps")):
        for pair in sorted({row["pair"] for row in rows}):
            chosen = [row for row in rows if row["pair"] == pair]
            axis.plot([r["evaluations"] for r in chosen], [r[key] for r in chosen], "o-", label=pair)
            for row in chosen:
                axis.annotate(row["name"], (row["evaluations"], row[key]), fontsize=7, xytext=(4, 4),
                              textcoords="offset points")  # fmt: skip
        axis.set_xlabel("UNet image-evaluations per trajectory")
        axis.set_title(key.replace("_", " ").replace("cfrt", "CFRT"))
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("CFRT")
    axes[0].legend(loc="lower right", fontsize=8)
    figure.suptitle(f"Trajectory traversal cost against CFRT (2D, seeds {args.seed}-{args.seed + args.num_seeds - 1})")
    figure.savefig(args.out / "cost_study.png", dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
