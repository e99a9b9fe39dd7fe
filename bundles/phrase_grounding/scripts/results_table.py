"""Markdown table of the grounding metrics.json files under a folder (one row per run and finding class).

python scripts/results_table.py <results dir>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folder: str) -> None:
    print("| run | class | boxes | mIoU | AUROC | AUROC (5 bins) | CNR |")
    print("|---|---|---|---|---|---|---|")
    for path in sorted(Path(folder).glob("*/metrics.json")):
        grounding = json.loads(path.read_text())["grounding"]
        for name, values in grounding.items():
            cells = [values.get(k) for k in ("miou", "auroc", "auroc_binned", "cnr")]
            shown = " | ".join("-" if v is None else f"{v:.3f}" for v in cells)
            print(f"| {path.parent.name} | {name} | {values.get('count', '')} | {shown} |")


if __name__ == "__main__":
    main(sys.argv[1])
