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
"""Ignite handlers that save phrase heat maps and accumulate grounding quality over an evaluator's run."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.utils import CommonKeys, IgniteInfo, min_version, optional_import

from monai_cfx.metrics import GroundingMetric
from monai_cfx.transforms import PHRASE_SEPARATOR
from monai_cfx.utils import save_figure, write_nifti
from monai_cfx.visualize import draw_heatmap

from .saving import ItemSaver, affine_of, iterate_items, to_numpy

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["GroundingMetricsHandler", "GroundingSaver"]


def _overlay(
    path: Path,
    image: np.ndarray,
    heatmaps: np.ndarray,
    boxes: np.ndarray | None,
    phrases: Sequence[str],
    prompt: str,
    overwrite: bool,
) -> None:
    """One panel per phrase: the image with its heat map over it and the ground-truth box outlined when known;
    2D channel-first arrays in MONAI's (W, H) order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = len(heatmaps)
    fig, axes = plt.subplots(1, columns, figsize=(2.6 * columns, 2.9), squeeze=False)
    for index, axis in enumerate(axes[0]):
        shown = draw_heatmap(axis, image[0], heatmaps[index], None if boxes is None else boxes[index])
        axis.set_title(phrases[index] if index < len(phrases) else f"phrase {index}", fontsize=8)
    fig.colorbar(shown, ax=axes[0, -1], fraction=0.046, pad=0.02)
    fig.suptitle(prompt, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, overwrite, dpi=110)


class GroundingSaver(ItemSaver):
    """Save each image's phrase heat maps and Otsu masks as NIfTI with the input's affine, plus a PNG overlay in 2D.

    Writes ``<stem>_heatmap.nii.gz`` and ``<stem>_mask.nii.gz`` (one channel per phrase, in the 5th NIfTI
    dimension when there are several, as MONAI's ``NibabelWriter`` stores channels; a single phrase is a plain
    image that overlays the input in 3D Slicer) and, for 2D images, ``<stem>_overlay.png`` with one panel per
    phrase (the ground-truth box outlined when ``box_mask_key`` is present). ``grounding.json`` lists every input
    with its prompt, phrases (in channel order) and files. Existing files stop the run unless ``overwrite``;
    every file is written atomically.

    Args:
        output_dir: output folder (created).
        image_key, heatmap_key, mask_key: item keys of the input, the ``(P, *spatial)`` heat maps and masks.
        box_mask_key: item key of the ``(P, *spatial)`` ground-truth boxes, outlined in the overlay if present.
        prompt_key, text_key: item keys of the prompt and of the phrases (``" | "``-joined, as
            :class:`~monai_cfx.transforms.PhraseTokensd` writes them).
        png: write the 2D overlay.
        overwrite: replace existing files.
        run_settings: the run's settings; a killed run resumes only with the same items and settings.
        intensity_key: item key of the intensity rule's ``[lo, hi, target_lo, target_hi]``
            (:class:`~monai_cfx.transforms.ScaleIntensityToModeld`), recorded in the manifest when present.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        image_key: str = CommonKeys.IMAGE,
        heatmap_key: str = "heatmap",
        mask_key: str = "grounding_mask",
        box_mask_key: str | None = "phrase_mask",
        prompt_key: str = "prompt",
        text_key: str = "phrase_text",
        png: bool = True,
        overwrite: bool = False,
        run_settings: Mapping[str, Any] | None = None,
        intensity_key: str | None = "image_intensity",
    ) -> None:
        super().__init__(
            output_dir, "grounding", image_key, overwrite, run_settings=run_settings, intensity_key=intensity_key
        )
        self.heatmap_key, self.mask_key, self.box_mask_key = heatmap_key, mask_key, box_mask_key
        self.prompt_key, self.text_key = prompt_key, text_key
        self.png = png

    def save_item(self, item: Mapping[str, Any], fallback_stem: str = "item") -> dict[str, Any]:
        """Write one item's files; returns its manifest record."""
        text = item.get(self.text_key) or ""
        phrases = [p.strip() for p in str(text).split(PHRASE_SEPARATOR)] if text else []
        record, targets = self.new_record(
            item,
            (self.heatmap_key, self.mask_key),
            fallback_stem,
            fields={"prompt": item.get(self.prompt_key), "phrases": phrases, **self.intensity_field(item)},
            files={"heatmap": "_heatmap.nii.gz", "mask": "_mask.nii.gz"},
            png=("overlay", "_overlay.png") if self.png else None,
        )
        image = item[self.image_key]
        affine = affine_of(image)
        heatmaps = to_numpy(item[self.heatmap_key])
        write_nifti(heatmaps, affine, targets[0], overwrite=self.overwrite)
        write_nifti(to_numpy(item[self.mask_key]), affine, targets[1], overwrite=self.overwrite)
        if "overlay" in record:
            boxes = item.get(self.box_mask_key) if self.box_mask_key else None
            box_array = to_numpy(boxes) if isinstance(boxes, torch.Tensor) and boxes.shape == heatmaps.shape else None
            _overlay(
                targets[2], to_numpy(image), heatmaps, box_array, phrases, str(record["prompt"] or ""), self.overwrite
            )
        self.records.append(record)
        return record


class GroundingMetricsHandler:
    """Feed every item's phrase heat maps to a :class:`~monai_cfx.metrics.GroundingMetric`; at the end of the run
    put its per-class, macro and overall means in ``engine.state.metrics[metric_name]``.

    Each item holds ``heatmap_key`` ``(P, *spatial)`` (one channel per phrase), ``mask_key`` ``(P, *spatial)``
    (each phrase's ground-truth box or region) and ``class_key``: the P phrases' finding classes.

    Args:
        class_names: the finding classes.
        heatmap_key, mask_key, class_key: item keys.
        metric_name: the key in ``engine.state.metrics``.
        num_thresholds: bins of the binned AUROC.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        heatmap_key: str = "heatmap",
        mask_key: str = "phrase_mask",
        class_key: str = "phrase_class",
        metric_name: str = "grounding",
        num_thresholds: int = 5,
    ) -> None:
        self.metric = GroundingMetric(class_names, num_thresholds=num_thresholds)
        self.heatmap_key, self.mask_key, self.class_key = heatmap_key, mask_key, class_key
        self.metric_name = metric_name

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._completed)

    def _started(self, _engine: Engine) -> None:
        self.metric.reset()

    def __call__(self, engine: Engine) -> None:
        for item in iterate_items(engine):
            missing = {self.heatmap_key, self.mask_key, self.class_key} - set(item)
            if missing:
                raise ValueError(f"the item lacks {sorted(missing)} (keys: {sorted(item)}).")
            heatmaps = torch.as_tensor(item[self.heatmap_key], dtype=torch.float32)
            masks = torch.as_tensor(item[self.mask_key], dtype=torch.float32).to(heatmaps.device)
            classes = item[self.class_key]
            classes = [classes] if isinstance(classes, str) else list(classes)
            self.metric(heatmaps.unsqueeze(1), masks.unsqueeze(1), classes=classes)

    def _completed(self, engine: Engine) -> None:
        engine.state.metrics[self.metric_name] = self.metric.aggregate()
