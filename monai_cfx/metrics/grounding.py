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
"""Phrase-grounding measures of a heat map against a ground-truth region (MS-CXR protocol, as used by
Boecking et al. 2022 and Vilouras et al. 2024): mIoU over thresholds, exact and binned AUROC, and CNR.

Every function takes ``(B, 1, *spatial)`` heat maps and masks and returns one value per image (NaN where the
mask is empty or full, so the measure is undefined).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric, compute_roc_auc

__all__ = ["GroundingMetric", "compute_binned_auroc", "compute_cnr", "compute_miou", "per_image_map_measure"]

MIOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)


def per_image_map_measure(
    heatmap: torch.Tensor, mask: torch.Tensor, measure: Callable[[torch.Tensor, torch.Tensor], float]
) -> torch.Tensor:
    """``measure(scores, inside)`` of each image's flattened map and boolean mask, NaN where the mask is empty
    or full (no region to find, or nothing outside it)."""
    if heatmap.shape != mask.shape or heatmap.ndim < 3:
        raise ValueError(
            f"`heatmap` and `mask` must have the same (B, 1, *spatial) shape, got {tuple(heatmap.shape)} and "
            f"{tuple(mask.shape)}."
        )
    values = []
    for scores, target in zip(heatmap.flatten(1).float().cpu(), (mask > 0.5).flatten(1).cpu()):
        values.append(measure(scores, target) if 0 < int(target.sum()) < target.numel() else float("nan"))
    return torch.tensor(values)


def compute_miou(
    heatmap: torch.Tensor, mask: torch.Tensor, thresholds: Sequence[float] = MIOU_THRESHOLDS
) -> torch.Tensor:
    """Mean over ``thresholds`` of the IoU between ``heatmap > t`` and the mask, per image.

    The heat map is expected in [0, 1] (min-max normalised), as the thresholds are absolute.
    """

    def miou(scores: torch.Tensor, target: torch.Tensor) -> float:
        ious = []
        for threshold in thresholds:
            predicted = scores > threshold
            union = (predicted | target).sum()
            ious.append(float((predicted & target).sum() / union) if union > 0 else 0.0)
        return sum(ious) / len(ious)

    return per_image_map_measure(heatmap, mask, miou)


def compute_binned_auroc(heatmap: torch.Tensor, mask: torch.Tensor, num_thresholds: int | None = 5) -> torch.Tensor:
    """Pixel-wise AUROC of the heat map against the mask, per image.

    ``num_thresholds=None`` gives the exact AUROC (MONAI's ``compute_roc_auc``). An int evaluates the ROC curve
    only at ``num_thresholds`` evenly spaced thresholds in [0, 1] (``score >= t``) and integrates it with the
    trapezoid rule, as ``torcheval``'s binned ``BinaryAUROC`` does; published grounding numbers use 5, which
    can differ from the exact value by a few hundredths.
    """
    if num_thresholds is not None and (not isinstance(num_thresholds, int) or num_thresholds < 2):
        raise ValueError(f"`num_thresholds` must be None or an int >= 2, got {num_thresholds!r}.")

    def auroc(scores: torch.Tensor, target: torch.Tensor) -> float:
        if num_thresholds is None:
            return float(compute_roc_auc(scores, target.float()))
        thresholds = torch.linspace(0, 1, num_thresholds)
        tpr = torch.stack([(scores[target] >= t).float().mean() for t in thresholds])
        fpr = torch.stack([(scores[~target] >= t).float().mean() for t in thresholds])
        # thresholds rise, so the points run from (1, 1) down; close the curve at (0, 0)
        tpr, fpr = torch.cat([tpr, torch.zeros(1)]).flip(0), torch.cat([fpr, torch.zeros(1)]).flip(0)
        return float(torch.trapezoid(tpr, fpr))

    return per_image_map_measure(heatmap, mask, auroc)


def compute_cnr(heatmap: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Contrast-to-noise ratio ``|mean_in - mean_out| / sqrt(var_in + var_out)`` of the heat map, per image."""

    def cnr(scores: torch.Tensor, target: torch.Tensor) -> float:
        inside, outside = scores[target], scores[~target]
        spread = (inside.var(unbiased=False) + outside.var(unbiased=False)).sqrt()
        return float((inside.mean() - outside.mean()).abs() / spread.clamp_min(1e-12))

    return per_image_map_measure(heatmap, mask, cnr)


_MEASURES = ("miou", "auroc", "auroc_binned", "cnr")


class GroundingMetric(CumulativeIterationMetric):
    """Phrase-grounding quality accumulated over a run, per box and macro-averaged per finding class.

    ``metric(heatmaps, masks, classes=[...])`` takes ``(N, 1, *spatial)`` heat maps in [0, 1] and ground-truth
    masks (one per box or phrase) with each one's finding class, and returns ``(N, 5)``: mIoU, exact AUROC,
    binned AUROC, CNR and the class index. :meth:`aggregate` gives, for every class, the means over its boxes
    and their count, then ``"macro"`` (the mean of the class means) and ``"all"`` (the mean over all boxes).
    Undefined values (empty or full masks) are skipped. A box of no known class (class index -1, as
    :class:`~monai_cfx.transforms.PhraseTokensd` marks a finding outside ``class_names``) counts in ``"all"``
    only. Values sync across ranks like MONAI's metrics.

    Args:
        class_names: the finding classes; ``classes`` may hold names or indices (-1: none of them).
        num_thresholds: bins of the binned AUROC (5 as in published grounding results).
        miou_thresholds: thresholds of the mIoU.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        num_thresholds: int = 5,
        miou_thresholds: Sequence[float] = MIOU_THRESHOLDS,
    ) -> None:
        super().__init__()
        if isinstance(class_names, str) or not class_names:
            raise ValueError(f"`class_names` must be a non-empty list of names, got {class_names!r}.")
        self.class_names = list(class_names)
        self.num_thresholds = num_thresholds
        self.miou_thresholds = tuple(miou_thresholds)

    def _class_index(self, value: str | int) -> int:
        if isinstance(value, str):
            if value not in self.class_names:
                raise ValueError(f"class {value!r} is not one of `class_names` {self.class_names}.")
            return self.class_names.index(value)
        if not -1 <= int(value) < len(self.class_names):
            raise ValueError(f"class index {value!r} is outside `class_names` {self.class_names} (or -1 for none).")
        return int(value)

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor, classes: Sequence[str | int] | None = None
    ) -> torch.Tensor:
        if classes is None or len(classes) != y_pred.shape[0]:
            raise ValueError(
                f"`classes` must give one finding class per heat map ({y_pred.shape[0]}), got {classes!r}."
            )
        values = [
            compute_miou(y_pred, y, self.miou_thresholds),
            compute_binned_auroc(y_pred, y, None),
            compute_binned_auroc(y_pred, y, self.num_thresholds),
            compute_cnr(y_pred, y),
            torch.tensor([float(self._class_index(c)) for c in classes]),
        ]
        return torch.stack(values, 1).to(y_pred.device)

    def aggregate(self) -> dict[str, dict[str, float]]:  # type: ignore[override]
        buffer = self.get_buffer()
        if not isinstance(buffer, torch.Tensor) or buffer.numel() == 0:
            raise RuntimeError("nothing was accumulated: call the metric on heat maps first.")
        buffer = buffer.double().cpu()
        result: dict[str, dict[str, float]] = {}

        def means(rows: torch.Tensor) -> dict[str, float]:
            summary = {name: float(torch.nanmean(rows[:, k])) for k, name in enumerate(_MEASURES)}
            summary["count"] = int((~torch.isnan(rows[:, 1])).sum())  # boxes with a defined measure
            return summary

        for index, name in enumerate(self.class_names):
            rows = buffer[buffer[:, 4] == index]
            if len(rows):
                result[name] = means(rows)
        class_means = [result[n] for n in self.class_names if n in result]
        result["macro"] = {m: float(np.nanmean([c[m] for c in class_means])) for m in _MEASURES}
        result["macro"]["count"] = len(class_means)
        result["all"] = means(buffer)
        return result
