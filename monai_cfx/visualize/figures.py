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
"""Figures of the phantoms, the generated samples, the counterfactuals and the phrase heat maps (the main job's),
and the heat-map drawing the handlers' PNG outputs share."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from monai_cfx.utils import save_figure

__all__ = [
    "draw_heatmap",
    "plot_brain_phantoms",
    "plot_chest_phantoms",
    "plot_counterfactual_rows",
    "plot_grounding_panels",
    "plot_manifold_check",
    "plot_sample_grid",
]


def draw_heatmap(
    axis: Any, image: np.ndarray, heatmap: np.ndarray, box: np.ndarray | None = None, origin: str = "upper"
) -> Any:
    """Draw a 2D ``image`` in grey with ``heatmap`` (in [0, 1]) over it and ``box`` (a mask) outlined, on a
    matplotlib axis without ticks. Arrays are in MONAI's (W, H) order; ``origin="lower"`` for axial slices of
    volumes. Returns the heat map's image, for a colour bar."""
    axis.imshow(image.T, cmap="gray", vmin=0, vmax=1, origin=origin)
    shown = axis.imshow(heatmap.T, cmap="jet", vmin=0, vmax=1, alpha=0.45, origin=origin)
    if box is not None and box.any():
        axis.contour(box.T, levels=[0.5], colors="white", linewidths=0.9)  # follows the image's y direction
    axis.set_xticks([])
    axis.set_yticks([])
    return shown


def plot_chest_phantoms(
    subjects: Sequence[tuple[str, Mapping[str, Any]]], path: str | os.PathLike, overwrite: bool = False
) -> None:
    """One column per titled chest phantom: the image with its phrases' boxes, its healthy twin, and the image
    minus the twin with the finding mask outlined (the report below)."""
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
    save_figure(fig, path, overwrite, dpi=110)


def plot_brain_phantoms(
    subjects: Sequence[tuple[str, Mapping[str, Any]]], path: str | os.PathLike, overwrite: bool = False
) -> None:
    """One row per titled brain phantom: axial, coronal and sagittal planes through its first finding (the
    volume's centre without one), and the axial image minus the healthy twin."""
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
    save_figure(fig, path, overwrite, dpi=100)


def plot_sample_grid(
    dims: str, result: Mapping[str, Any], columns: int, path: str | os.PathLike, overwrite: bool = False
) -> None:
    """One row per prompt, one column per seed (axial over coronal mid-slice in 3D), with the oracle's verdict.

    Args:
        dims: ``"2d"`` or ``"3d"``.
        result: ``{"images": (N, 1, *spatial), "samples": [{"prompt", "seed", "oracle_probabilities",
            "oracle_agrees"}, ...]}``, ``columns`` consecutive samples per prompt.
        columns: samples (seeds) per prompt.
        path: the PNG to write (atomically).
        overwrite: replace an existing file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-len(result["samples"]) // columns)
    height = 2.3 if dims == "2d" else 3.6
    fig, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, height * rows), squeeze=False)
    for index, (sample, image) in enumerate(zip(result["samples"], result["images"][:, 0].numpy())):
        axis = axes[index // columns, index % columns]
        axis.imshow(_display_slice(image), cmap="gray", vmin=0, vmax=1)
        axis.set_xticks([])
        axis.set_yticks([])
        verdict = ", ".join(f"{k} {v:.2f}" for k, v in sample["oracle_probabilities"].items() if v > 0.5) or "none"
        axis.set_xlabel(
            f"seed {sample['seed']} | {verdict}", fontsize=6, color="green" if sample["oracle_agrees"] else "red"
        )
        if index % columns == 0:
            axis.set_ylabel(sample["prompt"].replace(" with ", "\nwith "), fontsize=6)
    fig.suptitle(
        f"{dims.upper()} samples from report prompts; the oracle's findings (green: agrees with the prompt)",
        fontsize=8,
    )
    fig.tight_layout()
    save_figure(fig, path, overwrite, dpi=120)


def _display_slice(image: np.ndarray) -> np.ndarray:
    """A 2D image (W, H) as shown, or a volume's axial mid-slice above its coronal one, RAS voxels radiologically."""
    if image.ndim == 3:
        mid = image.shape[2] // 2
        return np.concatenate([image[:, :, mid].T[::-1], image[:, image.shape[1] // 2, :].T[::-1]], 0)
    return image.T


def plot_manifold_check(
    images: Any, off_manifold: Any, path: str | os.PathLike, per_row: int = 8, overwrite: bool = False
) -> None:
    """Generated samples off a reference set's manifold (top row, red) beside samples on it (bottom row, green), up to
    ``per_row`` of each in sample order, titled with their index (the seed of ``evaluate_generator``'s samples).

    Args:
        images: ``(N, 1, *spatial)`` samples (2D, or 3D shown as axial over coronal mid-slices).
        off_manifold: ``(N,)`` booleans, True where a sample is off the manifold.
        path: the PNG to write (atomically).
        per_row: samples per row.
        overwrite: replace an existing file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = np.asarray(images)[:, 0]
    off = np.asarray(off_manifold, dtype=bool)
    rows = [
        ("off the manifold", "red", np.flatnonzero(off)[:per_row]),
        ("on it", "green", np.flatnonzero(~off)[:per_row]),
    ]
    height = 2.1 if images.ndim == 3 else 3.4
    fig, axes = plt.subplots(2, per_row, figsize=(1.7 * per_row, height * 2), squeeze=False)
    for row, (label, colour, indices) in enumerate(rows):
        for column in range(per_row):
            axis = axes[row, column]
            axis.set_xticks([])
            axis.set_yticks([])
            if column >= len(indices):
                axis.axis("off")
                continue
            axis.imshow(_display_slice(images[indices[column]]), cmap="gray", vmin=0, vmax=1)
            axis.set_xlabel(f"sample {indices[column]}", fontsize=7, color=colour)
            if column == 0:
                axis.set_ylabel(label, fontsize=8, color=colour)
    fig.suptitle(
        f"{int(off.sum())} of {len(off)} samples off the manifold of the testing images (outside every image's "
        "nearest-neighbour ball, voxel space)",
        fontsize=8,
    )
    fig.tight_layout()
    save_figure(fig, path, overwrite, dpi=100)


def plot_counterfactual_rows(
    dims: str, result: Mapping[str, Any], path: str | os.PathLike, overwrite: bool = False
) -> None:
    """One row per example: image | counterfactual | difference map | true difference (image − twin).

    Args:
        dims: ``"2d"`` or ``"3d"`` (3D: the axial slice where the true difference is largest).
        result: ``{"examples", "prompt", "start", "noise_strength"}``; each example holds ``title``, ``arrays``
            (image, counterfactual, difference map, true difference), ``finding_probability_before`` /
            ``_after`` and ``localization_auroc``. Optional: ``"figure_title"``, ``"counterfactual_title"`` and
            ``"judge"`` (whose probabilities those are; default ``"oracle"``).
        path: the PNG to write (atomically).
        overwrite: replace an existing file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    examples = result["examples"]
    fig, axes = plt.subplots(len(examples), 4, figsize=(9.2, 2.45 * len(examples)), squeeze=False)
    counterfactual_title = result.get("counterfactual_title")
    if counterfactual_title is None:
        counterfactual_title = f"counterfactual ({result['start']} {result['noise_strength']})"
    titles = ["image", counterfactual_title, "difference map", "true difference (image − twin)"]
    for row, example in enumerate(examples):
        arrays = example["arrays"]
        if dims == "3d":  # the axial slice where the finding is largest
            depth = int(np.abs(arrays[3]).sum(axis=(0, 1)).argmax())
            arrays = tuple(a[:, :, depth] for a in arrays)
        for column, array in enumerate(arrays):
            axis = axes[row, column]
            if column < 2:
                axis.imshow(array.T, cmap="gray", vmin=0, vmax=1, origin="lower" if dims == "3d" else "upper")
            else:
                limit = max(float(np.abs(array).max()), 1e-6)
                cmap, low = ("inferno", 0.0) if column == 2 else ("RdBu_r", -limit)
                axis.imshow(array.T, cmap=cmap, vmin=low, vmax=limit, origin="lower" if dims == "3d" else "upper")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(titles[column], fontsize=8)
        before = max(example["finding_probability_before"].values())
        after = max(example["finding_probability_after"].values())
        axes[row, 0].set_ylabel(example["title"], fontsize=8)
        axes[row, 1].set_xlabel(f"{result.get('judge', 'oracle')} p(finding) {before:.2f} → {after:.2f}", fontsize=7)
        axes[row, 2].set_xlabel(f"localisation AUROC {example['localization_auroc']:.2f}", fontsize=7)
    fig.suptitle(result.get("figure_title") or f'Healthy counterfactuals: "{result["prompt"]}"', fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, overwrite, dpi=100)


def plot_grounding_panels(
    dims: str, result: Mapping[str, Any], path: str | os.PathLike, overwrite: bool = False
) -> None:
    """One panel per phrase: the image with the phrase's heat map over it and its box outlined.

    Args:
        dims: ``"2d"`` or ``"3d"`` (3D: the axial slice through the middle of the box).
        result: ``{"examples", "attention_layers"}``; each example holds ``phrases``, ``arrays`` (image, heat
            maps, boxes), and per phrase ``auroc`` and ``cnr`` (None without a box).
        path: the PNG to write (atomically).
        overwrite: replace an existing file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(e, k) for e in result["examples"] for k in range(len(e["phrases"]))]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.5 * len(panels), 3.0), squeeze=False)
    for axis, (example, index) in zip(axes[0], panels):
        image, heatmap, box = example["arrays"][0], example["arrays"][1][index], example["arrays"][2][index]
        if dims == "3d":  # the axial slice through the middle of the box (of the volume for a hidden finding)
            depths = np.flatnonzero(box.any(axis=(0, 1)))
            depth = int(depths[len(depths) // 2]) if len(depths) else box.shape[2] // 2
            image, heatmap, box = image[:, :, depth], heatmap[:, :, depth], box[:, :, depth]
        draw_heatmap(axis, image, heatmap, box, origin="lower" if dims == "3d" else "upper")
        axis.set_title(f'"{example["phrases"][index]}"', fontsize=7)
        auroc, cnr = example["auroc"][index], example["cnr"][index]
        axis.set_xlabel("no box" if auroc is None else f"AUROC {auroc:.2f}, CNR {cnr:.2f}", fontsize=7)
    layers = result["attention_layers"]
    fig.suptitle(
        f"Zero-shot phrase grounding\n(cross-attention during DDIM inversion, layers {layers}; box: ground truth)",
        fontsize=8,
    )
    fig.tight_layout()
    save_figure(fig, path, overwrite, dpi=100)
