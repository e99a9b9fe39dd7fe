# Copyright (c) monai_cfx contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Markdown tables of the metrics.json files that scripts/sweep.sh writes, and their scalar parts copied into
docs/results/ (per-image values dropped). Usage: python scripts/results_table.py <results dir> <2d|3d>"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = [
    ("validity", "validity"),
    ("localization_auroc", "loc. AUROC"),
    ("twin_l1_outside", "L1 twin, outside"),
    ("twin_l1_inside", "L1 twin, inside"),
    ("l1_inside", "L1 input, inside"),
    ("ssim", "SSIM"),
    ("ms_ssim", "MS-SSIM"),
    ("twin_ssim", "SSIM twin"),
    ("fid", "FID"),
    ("kid", "KID"),
]


def main(results: Path, dims: str) -> None:
    docs = Path(__file__).resolve().parents[1] / "docs" / "results"
    docs.mkdir(parents=True, exist_ok=True)
    rows = []
    for folder in sorted(results.iterdir()):
        path = folder / "metrics.json"
        if not path.is_file():
            continue
        metrics = json.loads(path.read_text())
        metrics.pop("per_image", None)
        (docs / f"{dims}_{folder.name}.json").write_text(json.dumps(metrics, indent=2) + "\n")
        settings = metrics["settings"]
        label = f"{settings['direction']} {settings['start']} {settings['noise_strength']}"
        values = [metrics.get(key) for key, _ in COLUMNS]
        rows.append((label, settings["num_items"], metrics.get("input_fid"), values))
    print("| run | n | " + " | ".join(title for _, title in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for label, count, _, values in rows:
        shown = ["–" if v is None else f"{v:.3f}" for v in values]
        print(f"| {label} | {count} | " + " | ".join(shown) + " |")
    if rows:
        print(f"\nFID of the inputs themselves against the twins: {rows[0][2]:.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
