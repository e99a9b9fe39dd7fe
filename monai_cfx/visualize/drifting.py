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
"""Figures of Latent Drifting (Yeganeh et al., arXiv 2412.20651): the distances of a drift search against δ,
and samples drawn above the held-out images they are measured against."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from monai_cfx.utils import save_figure

__all__ = ["middle_slice", "plot_drift_samples", "plot_drift_search"]


def middle_slice(image: torch.Tensor) -> np.ndarray:
    """A 2D view of ``(C, *spatial)``: the image itself, or a volume's middle slice along its last axis."""
    array = image[0].numpy()
    return array if array.ndim == 2 else array[..., array.shape[-1] // 2]


def _drift_label(drift: Any) -> str:
    if isinstance(drift, (list, tuple)):
        return "(" + ", ".join(f"{float(v):g}" for v in drift) + ")"
    return f"{float(drift):g}"


def plot_drift_search(
    result: Mapping[str, Any], best_index: int, path: str | os.PathLike, overwrite: bool = False
) -> None:
    """L1 (and FID and KID, when computed) against δ, the best δ marked by a vertical line and ringed points.

    Per-channel drifts have no natural order, so they are plotted against the grid index, without lines
    between the points, and the ticks are labelled with the drifts.

    Example::

        plot_drift_search(result, best_index=4, path="eval/drift/drift_search.png")

    Args:
        result: a :func:`~monai_cfx.apps.drifting.drift_search` result (``rows``, ``criterion``, ``num_samples``,
            ``seed``, ``num_target``).
        best_index: the row of the best drift, marked in the figure.
        path: the PNG to write (atomically).
        overwrite: replace an existing file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    criterion = result.get("criterion", "l1")
    per_channel = any(isinstance(row["drift"], (list, tuple)) for row in rows)
    x = np.arange(len(rows), dtype=float) if per_channel else np.array([float(row["drift"]) for row in rows])
    order = np.argsort(x, kind="stable")
    xs, best_x = x[order], x[best_index]
    linestyle = "none" if per_channel else "-"

    def column(key: str) -> np.ndarray:
        return np.array([np.nan if row.get(key) is None else float(row[key]) for row in rows], dtype=float)

    def ring_best(axis: Any, key: str) -> None:
        value = column(key)[best_index]
        if np.isfinite(value):
            axis.plot([best_x], [value], "o", markersize=13, markerfacecolor="none", color="tab:red", zorder=5)

    best_value = rows[best_index].get(criterion)
    best_label = f"best δ = {_drift_label(rows[best_index]['drift'])} ({criterion.upper()}"
    best_label += f" {best_value:.4g})" if best_value is not None else ")"

    has_oracle = any(row.get("fid") is not None or row.get("kid") is not None for row in rows)
    fig, axes = plt.subplots(1, 2 if has_oracle else 1, figsize=(11 if has_oracle else 6, 4.4), squeeze=False)
    axes = list(axes[0])
    axes[0].plot(xs, column("l1")[order], marker="o", linestyle=linestyle, color="tab:blue", label="Monte-Carlo L1")
    ring_best(axes[0], "l1")
    axes[0].set_ylabel("mean |x − y| per voxel")
    axes[0].set_title("L1 distance to the target images")
    handles = []
    if has_oracle:
        fid_axis, kid_axis = axes[1], axes[1].twinx()
        handles.append(
            fid_axis.plot(xs, column("fid")[order], marker="s", linestyle=linestyle, color="tab:orange", label="FID")[0]
        )
        handles.append(
            kid_axis.errorbar(
                xs,
                column("kid")[order],
                yerr=np.nan_to_num(column("kid_std")[order]),
                marker="^",
                linestyle="none" if per_channel else "--",
                color="tab:green",
                capsize=3,
                label="KID ± std over subsets",
            )
        )
        ring_best(fid_axis, "fid")
        ring_best(kid_axis, "kid")
        fid_axis.set_ylabel("FID (oracle embeddings)", color="tab:orange")
        kid_axis.set_ylabel("KID (oracle embeddings)", color="tab:green")
        fid_axis.set_title("FID and KID to the target images")
    for axis in axes:
        line = axis.axvline(best_x, color="tab:red", linestyle=":", linewidth=1.5, label=best_label)
        axis.grid(alpha=0.3)
        if per_channel:
            axis.set_xticks(xs)
            labels = [_drift_label(rows[i]["drift"]) for i in order]
            axis.set_xticklabels(labels, rotation=45 if len(rows) > 4 else 0, ha="right" if len(rows) > 4 else "center")
            axis.set_xlabel("per-channel latent drift δ (one tick per grid point)")
        else:
            axis.set_xlabel("latent drift δ")
    axes[0].legend(fontsize=8)
    if has_oracle:
        handles.append(line)
        kid_axis.legend(handles, [h.get_label() for h in handles], fontsize=8)  # on top of both curves
    fig.suptitle(
        f"Latent drift search: {result.get('num_samples', '?')} samples per δ (same seed "
        f"{result.get('seed', '?')}) vs {result.get('num_target', '?')} target images",
        fontsize=10,
    )
    fig.tight_layout()
    save_figure(fig, path, overwrite, dpi=110)


def plot_drift_samples(
    generated: torch.Tensor,
    target: torch.Tensor,
    reports: Sequence[str],
    result: Mapping[str, Any],
    path: str | os.PathLike,
    overwrite: bool = False,
    columns: int = 8,
) -> None:
    """The first ``columns`` samples (3D: the middle slice) above the held-out images of the same reports, titled
    with the drift and its distances.

    Example::

        plot_drift_samples(generated, target_images, reports, evaluation, "eval/drift/samples.png")

    Args:
        generated: samples ``(N, C, *spatial)`` in [0, 1], one per report.
        target: the held-out images of the same reports, same layout.
        reports: the reports, one per image.
        result: an :func:`~monai_cfx.apps.drifting.evaluate_drift` result (``drift``, ``generated`` distances).
        path: the PNG to write (atomically).
        overwrite: replace an existing file.
        columns: the most image pairs to draw.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(columns, len(generated))
    figure, axes = plt.subplots(2, columns, figsize=(1.6 * columns, 3.8), squeeze=False)
    for column in range(columns):
        for row, (images, name) in enumerate(((generated, "generated"), (target, "held-out target"))):
            axis = axes[row, column]
            axis.imshow(middle_slice(images[column]).T, cmap="gray", vmin=0, vmax=1, origin="upper")
            axis.set_xticks([]), axis.set_yticks([])
            if column == 0:
                axis.set_ylabel(name, fontsize=8)
        words = reports[column].split()
        axes[0, column].set_title(" ".join(words[-4:])[:30], fontsize=6)
    measures = result["generated"]
    summary = f"L1 {measures['l1']:.4f}"
    if measures.get("fid") is not None:
        summary += f", FID {measures['fid']:.2f}, KID {measures['kid']:.3f}"
    figure.suptitle(f"drift δ = {result['drift']}: {summary} (one sample per held-out report)", fontsize=9)
    figure.tight_layout()
    save_figure(figure, path, overwrite=overwrite)
