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
"""The main job: a quick tour of the phantom benchmark and the text conditioning, written to one folder.

It writes, into ``output_dir``:
- ``phantoms_2d.png``: chest phantoms with each finding, their healthy twins and ground-truth differences;
- ``phantoms_3d.png``: brain phantoms (a lesion; young and old ventricles) in three planes;
- ``nifti/``: the shown subjects as NIfTI with their affines (open them in 3D Slicer);
- ``summary.json``: generation speed, finding statistics over a seed range, and the text encoder's
  context shape and phrase-token positions for the shown reports.

Example::

    python -m monai_cfx.apps.showcase --output_dir outputs/main
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_cfx.data import BRAIN_FINDINGS, CHEST_FINDINGS, brain_phantom, chest_phantom
from monai_cfx.utils import atomic_path, write_json, write_nifti

__all__ = ["run_showcase"]

CHEST_EXAMPLES: list[tuple[str, list[Any], str | None]] = [
    ("normal", [], None),
    ("opacity", [{"name": "opacity", "side": "right", "zone": "lower"}], None),
    ("effusion", [{"name": "effusion", "side": "left", "size": "moderate"}], None),
    ("cardiomegaly", ["cardiomegaly"], None),
    ("nodule", [{"name": "nodule", "side": "left", "zone": "upper"}], None),
    ("target domain", [{"name": "opacity", "side": "left", "zone": "middle"}], "target"),
]


def _chest_figure(subjects: Sequence[tuple[str, dict[str, Any]]], path: Path, overwrite: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(subjects), figsize=(2.6 * len(subjects), 8.4))
    for column, (title, subject) in enumerate(subjects):
        difference = (subject["image"] - subject["healthy"])[0].T  # MONAI (W, H) -> display (H, W)
        axes[0, column].imshow(subject["image"][0].T, cmap="gray", vmin=0, vmax=1)
        axes[0, column].set_title(title, fontsize=10)
        for phrase in subject["phrases"]:
            x0, y0, x1, y1 = phrase["box"]
            axes[0, column].add_patch(
                plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1)
            )
            axes[0, column].text(x0, y0 - 2, phrase["text"], color="lime", fontsize=6)
        axes[1, column].imshow(subject["healthy"][0].T, cmap="gray", vmin=0, vmax=1)
        axes[2, column].imshow(difference, cmap="RdBu_r", vmin=-0.4, vmax=0.4)
        if subject["mask"].any():
            axes[2, column].contour(subject["mask"][0].T, levels=[0.5], colors="k", linewidths=0.6)
        axes[2, column].set_xlabel(subject["report"], fontsize=6, wrap=True)
    for row, label in enumerate(["image (boxes: phrases)", "healthy twin", "image − twin (contour: mask)"]):
        axes[row, 0].set_ylabel(label, fontsize=9)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    fig.tight_layout()
    with atomic_path(path, overwrite) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _brain_figure(subjects: Sequence[tuple[str, dict[str, Any]]], path: Path, overwrite: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(subjects), 4, figsize=(11, 2.9 * len(subjects)))
    for row, (title, subject) in enumerate(subjects):
        volume = subject["image"][0]
        if subject["phrases"]:
            box = subject["phrases"][0]["box"]
            center = [(box[i] + box[i + 3]) // 2 for i in range(3)]
        else:
            center = [s // 2 for s in volume.shape]
        planes = [
            ("axial", volume[:, :, center[2]].T, subject["healthy"][0][:, :, center[2]].T),
            ("coronal", volume[:, center[1], :].T, None),
            ("sagittal", volume[center[0], :, :].T, None),
        ]
        for column, (plane, image, _) in enumerate(planes):
            axes[row, column].imshow(image, cmap="gray", origin="lower", vmin=0, vmax=1)
            axes[row, column].set_title(f"{title}: {plane}", fontsize=8)
        difference = (subject["image"] - subject["healthy"])[0][:, :, center[2]].T
        axes[row, 3].imshow(difference, cmap="RdBu_r", origin="lower", vmin=-0.5, vmax=0.5)
        axes[row, 3].set_title("axial: image − twin", fontsize=8)
        axes[row, 0].set_ylabel(subject["report"][:48], fontsize=6)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    fig.tight_layout()
    with atomic_path(path, overwrite) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _finding_statistics(num_subjects: int, seed: int) -> dict[str, Any]:
    """Generation speed and label frequencies of randomly drawn chest and brain subjects."""
    statistics: dict[str, Any] = {}
    for kind, generate, names, size in (
        ("chest", chest_phantom, CHEST_FINDINGS, 128),
        ("brain", brain_phantom, BRAIN_FINDINGS, 64),
    ):
        count = num_subjects if kind == "chest" else max(1, num_subjects // 10)
        start = time.perf_counter()
        labels = np.stack([generate(seed + index, size)["labels"] for index in range(count)])
        elapsed = time.perf_counter() - start
        statistics[kind] = {
            "subjects": count,
            "size": size,
            "milliseconds_per_subject": round(1000 * elapsed / count, 2),
            "label_frequency": {name: float(labels[:, i].mean()) for i, name in enumerate(names)},
            "normal_fraction": float((labels.sum(1) == 0).mean()),
        }
    return statistics


def _text_summary(reports_and_phrases: Sequence[tuple[str, Sequence[str]]]) -> dict[str, Any]:
    """Encode the shown reports with the default text encoder and locate each phrase's tokens."""
    try:
        from monai_cfx.networks.nets import TextEncoder

        encoder = TextEncoder()
    except ImportError as error:  # the MiniLM is an optional install; say so instead of failing the job
        return {"skipped": str(error)}
    context, attention_mask = encoder.encode([report for report, _ in reports_and_phrases])
    entries = []
    for report, phrases in reports_and_phrases:
        located = {}
        for phrase in phrases:
            indices = encoder.phrase_token_indices(report, phrase)
            tokens = encoder.tokenizer.convert_ids_to_tokens(encoder.tokenizer(report)["input_ids"])
            located[phrase] = {"token_indices": indices, "tokens": [tokens[i] for i in indices]}
        entries.append({"report": report, "phrases": located})
    return {
        "encoder": str(encoder.path),
        "context_shape": list(context.shape),
        "tokens_used": attention_mask.sum(1).tolist(),
        "reports": entries,
    }


def run_showcase(
    output_dir: str | Path = "outputs/main", num_subjects: int = 200, seed: int = 0, overwrite: bool = False
) -> dict[str, Any]:
    """Write the phantom figures, NIfTI files and ``summary.json`` into ``output_dir`` (see module doc)."""
    start = time.perf_counter()
    output_dir = Path(output_dir)
    chest = [
        (title, chest_phantom(seed + 1, findings=findings, domain=domain)) for title, findings, domain in CHEST_EXAMPLES
    ]
    lesion = [
        {"name": "lesion", "side": "left", "region": "frontal"},
        {"name": "lesion", "side": "right", "region": "parietal"},
    ]
    brain = [
        ("lesions, age 45", brain_phantom(seed + 1, findings=lesion, age=45.0)),
        ("normal, age 25", brain_phantom(seed + 2, findings=[], age=25.0)),
        ("normal, age 85", brain_phantom(seed + 2, findings=[], age=85.0)),
    ]
    _chest_figure(chest, output_dir / "phantoms_2d.png", overwrite)
    _brain_figure(brain, output_dir / "phantoms_3d.png", overwrite)
    for title, subject in chest[:-1] + brain[:1]:
        stem = title.replace(" ", "_").replace(",", "")
        kind = "brain" if subject["image"].ndim == 4 else "chest"
        for key in ("image", "healthy", "mask"):
            write_nifti(
                subject[key], subject["affine"], output_dir / "nifti" / f"{kind}_{stem}_{key}.nii.gz", overwrite
            )
    summary = {
        "outputs": ["phantoms_2d.png", "phantoms_3d.png", "nifti/", "summary.json"],
        "phantoms": _finding_statistics(num_subjects, seed + 1000),
        "shown_reports": {title: subject["report"] for title, subject in chest + brain},
        "text_conditioning": _text_summary(
            [(s["report"], [p["text"] for p in s["phrases"]]) for _, s in chest + brain[:1] if s["phrases"]]
        ),
    }
    summary["seconds"] = round(time.perf_counter() - start, 2)
    write_json(summary, output_dir / "summary.json", overwrite)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monai_cfx.apps.showcase", description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/main")
    parser.add_argument("--num_subjects", type=int, default=200, help="subjects drawn for the statistics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run")
    args = parser.parse_args(argv)
    try:
        summary = run_showcase(args.output_dir, args.num_subjects, args.seed, args.overwrite)
    except FileExistsError as error:
        print(f"error: {error} (use --overwrite or another --output_dir)", file=sys.stderr)
        return 2
    print(f"wrote {args.output_dir}: {', '.join(summary['outputs'])} in {summary['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
