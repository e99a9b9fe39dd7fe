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
"""Per-image quality measures of counterfactuals: validity, proximity, localisation.

Every function takes batched tensors ``(B, C, *spatial)`` (or ``(B, K)`` probabilities) and returns one value
per image, like MONAI's ``compute_*`` functions; images where a measure is undefined (no finding in the mask)
give NaN, which ``torch.nanmean`` skips.
"""

from __future__ import annotations

import torch

from monai_cfx.utils import check_option

from .grounding import compute_binned_auroc

__all__ = ["compute_counterfactual_validity", "compute_localization_auroc", "compute_masked_l1"]


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if any(s[0] != first[0] or s[2:] != first[2:] for s in shapes.values()):
        raise ValueError(f"expected the same batch and spatial shape, got {shapes}.")


def compute_counterfactual_validity(
    probabilities: torch.Tensor, labels: torch.Tensor, direction: str = "remove", threshold: float = 0.5
) -> torch.Tensor:
    """Whether a classifier (the oracle) sees the intended change in each counterfactual.

    Args:
        probabilities: the classifier's probabilities on the counterfactuals ``(B, K)``.
        labels: multi-hot ``(B, K)``: the findings to remove (``direction="remove"``: valid when all of them
            fall below ``threshold``) or to induce (``"induce"``: valid when all of them exceed it).
        direction: ``"remove"`` or ``"induce"``.
        threshold: decision threshold on the probabilities.

    Returns:
        ``(B,)`` float 1/0; NaN for images with no labelled finding.
    """
    check_option("direction", direction, ("remove", "induce"))
    if probabilities.shape != labels.shape or probabilities.ndim != 2:
        raise ValueError(
            f"`probabilities` and `labels` must both be (B, K), got {tuple(probabilities.shape)} and "
            f"{tuple(labels.shape)}."
        )
    labels = labels > 0.5
    if direction == "remove":
        ok = ((probabilities < threshold) | ~labels).all(dim=1)
    else:
        ok = ((probabilities > threshold) | ~labels).all(dim=1)
    result = ok.float()
    result[~labels.any(dim=1)] = float("nan")
    return result


def compute_masked_l1(
    y_pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None, region: str = "outside"
) -> torch.Tensor:
    """Mean absolute difference per image, over the whole image or inside / outside a mask.

    ``region="outside"`` measures proximity where nothing should change (outside the finding or the edited
    region); ``"inside"`` measures the change inside it; ``"all"`` ignores the mask.

    Returns:
        ``(B,)``; NaN where the region is empty.
    """
    check_option("region", region, ("outside", "inside", "all"))
    if mask is None or region == "all":
        _check_same_shape(y_pred=y_pred, y=y)
        return (y_pred - y).abs().flatten(1).mean(1)
    _check_same_shape(y_pred=y_pred, y=y, mask=mask)
    weight = (mask > 0.5) if region == "inside" else (mask <= 0.5)
    weight = weight.to(y_pred.dtype).expand_as(y_pred)
    total = ((y_pred - y).abs() * weight).flatten(1).sum(1)
    count = weight.flatten(1).sum(1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


def compute_localization_auroc(difference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """AUROC of a difference (or attribution) map as a pixel-wise detector of the ground-truth finding mask.

    Args:
        difference: scores ``(B, 1, *spatial)`` (higher means more likely inside the finding).
        mask: ground-truth finding masks of the same shape.

    Returns:
        ``(B,)`` AUROC per image; NaN for images whose mask is empty or full.
    """
    return compute_binned_auroc(difference, mask, num_thresholds=None)
