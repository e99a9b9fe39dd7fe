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
"""Figures of trajectory traversal (arXiv 2503.23623): a trajectory's frames as a strip and an animated GIF, the
λ sweep, and the evaluation's cosine and probability curves."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from monai_cfx.utils import atomic_path, save_figure

from .drifting import middle_slice

__all__ = ["plot_image_strip", "plot_trajectory", "plot_traversal_curves", "save_trajectory_gif"]


def plot_image_strip(
    images: torch.Tensor,
    titles: Sequence[str],
    path: str | os.PathLike,
    suptitle: str = "",
    overwrite: bool = False,
) -> None:
    """One row of images ``(K, C, *spatial)`` in [0, 1] (3D: the middle slice), each titled, as a PNG.

    Example::

        plot_image_strip(frames[::5, 0], [f"frame {k}" for k in range(0, 50, 5)], "out/seed_0_strip.png")
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(images)
    figure, axes = plt.subplots(1, count, figsize=(1.35 * count, 1.9), squeeze=False)
    for axis, image, title in zip(axes[0], images, titles):
        axis.imshow(middle_slice(image.float().cpu()).T, cmap="gray", vmin=0, vmax=1, origin="upper")
        axis.set_title(title, fontsize=7)
        axis.set_xticks([]), axis.set_yticks([])
    if suptitle:
        figure.suptitle(suptitle, fontsize=8)
    figure.tight_layout()
    save_figure(figure, path, overwrite=overwrite)


def save_trajectory_gif(
    frames: torch.Tensor, path: str | os.PathLike, duration_ms: int = 80, overwrite: bool = False
) -> None:
    """An animated GIF of frames ``(F, C, *spatial)`` in [0, 1] (3D: the middle slice), looping, written atomically."""
    from PIL import Image

    pictures = []
    for frame in frames:
        array = np.clip(middle_slice(frame.float().cpu()).T, 0, 1)
        pictures.append(Image.fromarray((array * 255).round().astype(np.uint8), mode="L"))
    with atomic_path(path, overwrite) as tmp:
        pictures[0].save(tmp, format="GIF", save_all=True, append_images=pictures[1:], duration=duration_ms, loop=0)


def plot_traversal_curves(metrics: Mapping[str, Any], path: str | os.PathLike, overwrite: bool = False) -> None:
    """Per attribute pair of an evaluation: the latent-direction cosine against λ, and the target's mean oracle
    probability along the Bézier and the linear frames.

    Args:
        metrics: an evaluation's ``{"pairs": {name: {"swap_steps", "cosine", "bezier_target_probability",
            "linear_target_probability", ...}}}``.
        path: the PNG to write.
        overwrite: replace an existing file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = metrics["pairs"]
    figure, axes = plt.subplots(2, len(pairs), figsize=(3.4 * len(pairs), 5.6), squeeze=False)
    for column, (name, pair) in enumerate(pairs.items()):
        cosine_axis, probability_axis = axes[0, column], axes[1, column]
        cosine_axis.plot(pair["swap_steps"], pair["cosine"], "o-", color="tab:blue")
        cosine_axis.set_xlabel("swap step λ")
        cosine_axis.set_ylabel(f"cos(z(λ) - z_N, z({pair['swap_steps'][0]}) - z_N)", fontsize=7)
        cosine_axis.set_ylim(-0.05, 1.05)
        cosine_axis.set_title(
            f"{name}: CFRT Bézier {pair['cfrt_bezier']:.2f}, swaps {pair['cfrt_swaps']:.2f}", fontsize=8
        )
        cosine_axis.grid(alpha=0.3)
        for key, label, style in (
            ("bezier_target_probability", "Bézier", "-"),
            ("linear_target_probability", "linear", "--"),
        ):
            probability_axis.plot(pair[key], style, label=label)
        probability_axis.set_xlabel("frame")
        probability_axis.set_ylabel(f"mean oracle p({pair['finding']})", fontsize=7)
        probability_axis.set_ylim(-0.02, 1.02)
        probability_axis.legend(fontsize=7)
        probability_axis.grid(alpha=0.3)
    figure.suptitle(f"trajectory traversal over {metrics.get('num_seeds', '?')} seeds", fontsize=9)
    figure.tight_layout()
    save_figure(figure, path, overwrite=overwrite)


def plot_trajectory(
    frames: torch.Tensor,
    swaps: torch.Tensor,
    swap_steps: Sequence[int],
    frame_probabilities: Sequence[float],
    swap_probabilities: Sequence[float],
    finding: str,
    path: str | os.PathLike,
    title: str = "",
    num_shown: int = 10,
    overwrite: bool = False,
) -> None:
    """One trajectory in two rows: the λ sweep (neutral image, then each swap from the latest to the earliest) and
    the Bézier frames, each image titled with the oracle's probability of ``finding``.

    Args:
        frames: ``(F, C, *spatial)`` in [0, 1] (3D: the middle slice is shown).
        swaps: ``(Λ, C, *spatial)``, in ``swap_steps`` order.
        swap_steps: the λ of each swap.
        frame_probabilities: ``F`` probabilities of ``finding``; ``swap_probabilities``: ``Λ``.
        finding: the target finding's name.
        path: the PNG to write.
        title: the figure's title.
        num_shown: frames shown, evenly spaced, both ends included.
        overwrite: replace an existing file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = np.unique(np.linspace(0, len(frames) - 1, min(num_shown, len(frames))).round().astype(int))
    rows = [
        [(frames[0], "neutral", frame_probabilities[0])]
        + [(swap, f"λ = {step}", p) for swap, step, p in zip(swaps, swap_steps, swap_probabilities)],
        [(frames[k], f"frame {k}", frame_probabilities[k]) for k in shown],
    ]
    columns = max(len(row) for row in rows)
    figure, axes = plt.subplots(2, columns, figsize=(1.3 * columns, 3.4), squeeze=False)
    for row_index, (row, label) in enumerate(zip(rows, ("prompt swap at λ", "Bézier frames"))):
        for column in range(columns):
            axis = axes[row_index, column]
            axis.set_xticks([]), axis.set_yticks([])
            if column >= len(row):
                axis.axis("off")
                continue
            image, name, probability = row[column]
            axis.imshow(middle_slice(image.float().cpu()).T, cmap="gray", vmin=0, vmax=1, origin="upper")
            axis.set_title(f"{name}\np={probability:.2f}", fontsize=6)
            if column == 0:
                axis.set_ylabel(label, fontsize=7)
    figure.suptitle(title or f"trajectory towards {finding} (p: the evaluation classifier's)", fontsize=8)
    figure.tight_layout()
    save_figure(figure, path, overwrite=overwrite)
