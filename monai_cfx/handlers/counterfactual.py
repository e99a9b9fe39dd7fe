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
"""Ignite handlers that save counterfactuals and measure them during a MONAI evaluator's run."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.metrics import MultiScaleSSIMMetric, SSIMMetric
from monai.utils import CommonKeys, IgniteInfo, min_version, optional_import

from monai_cfx.metrics import compute_counterfactual_validity, compute_localization_auroc, compute_masked_l1
from monai_cfx.utils import check_option, save_figure, write_nifti

from .saving import ItemSaver, affine_of, iterate_items, to_numpy

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["CounterfactualMetricsHandler", "CounterfactualSaver", "iterate_items"]

BASE_METRICS = ("validity", "l1_outside", "l1_inside", "localization_auroc", "ssim", "ms_ssim")
TWIN_METRICS = ("twin_l1", "twin_l1_outside", "twin_l1_inside", "twin_ssim")


def _panel(
    path: Path,
    image: np.ndarray,
    counterfactual: np.ndarray,
    difference: np.ndarray,
    mask: np.ndarray | None,
    title: str,
    overwrite: bool,
) -> None:
    """image | counterfactual | difference | ground truth, 2D channel-first arrays in MONAI's (W, H) order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 4 if mask is not None else 3
    fig, axes = plt.subplots(1, columns, figsize=(2.4 * columns, 2.7))
    limit = float(np.abs(difference).max()) or 1.0
    signed = bool((difference < 0).any())
    axes[0].imshow(image[0].T, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(counterfactual[0].T, cmap="gray", vmin=0, vmax=1)
    axes[1].set_title("counterfactual", fontsize=9)
    axes[2].imshow(image[0].T, cmap="gray", vmin=0, vmax=1)
    shown = axes[2].imshow(
        difference[0].T,
        cmap="RdBu_r" if signed else "inferno",
        vmin=-limit if signed else 0,
        vmax=limit,
        alpha=0.75,
    )
    axes[2].set_title("difference", fontsize=9)
    fig.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.02)
    if mask is not None:
        axes[3].imshow(image[0].T, cmap="gray", vmin=0, vmax=1)
        axes[3].contour(mask[0].T, levels=[0.5], colors="lime", linewidths=0.8)
        axes[3].set_title("ground truth", fontsize=9)
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, overwrite, dpi=110)


class CounterfactualSaver(ItemSaver):
    """Save each counterfactual and difference map as NIfTI with the input's affine, plus a PNG panel in 2D.

    Writes ``<stem>_counterfactual.nii.gz`` and ``<stem>_difference.nii.gz`` (``stem`` is the input file's name),
    and for 2D images ``<stem>_panel.png`` (image | counterfactual | difference | ground-truth mask if any). At
    the end of the run ``counterfactuals.json`` lists every input with its prompt and files. The files overlay
    the input in 3D Slicer or ITK-SNAP. An existing file stops the run (all of an item's targets are checked
    before its first write) unless ``overwrite``; every file is written atomically. In multi-process runs each
    rank saves its own items and writes ``counterfactuals_rank<r>.json``.

    Args:
        output_dir: output folder (created).
        image_key, counterfactual_key, difference_key: item keys of the input, the counterfactual, the map.
        mask_key: item key of a ground-truth mask to outline in the panel (skipped when absent).
        prompt_key: item key of the item's prompt, recorded in the manifest.
        default_prompt: prompt recorded for items without one.
        png: write the 2D panel.
        overwrite: replace existing files.
        run_settings: the run's settings; a killed run resumes only with the same items and settings.
        intensity_key: item key of the intensity rule's ``[lo, hi, target_lo, target_hi]``
            (:class:`~monai_cfx.transforms.ScaleIntensityToModeld`), recorded in the manifest when present.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        image_key: str = CommonKeys.IMAGE,
        counterfactual_key: str = CommonKeys.PRED,
        difference_key: str = "difference",
        mask_key: str | None = "mask",
        prompt_key: str = "prompt",
        default_prompt: str | None = None,
        png: bool = True,
        overwrite: bool = False,
        run_settings: Mapping[str, Any] | None = None,
        intensity_key: str | None = "image_intensity",
    ) -> None:
        super().__init__(
            output_dir, "counterfactuals", image_key, overwrite, run_settings=run_settings, intensity_key=intensity_key
        )
        self.counterfactual_key, self.difference_key = counterfactual_key, difference_key
        self.mask_key, self.prompt_key, self.default_prompt = mask_key, prompt_key, default_prompt
        self.png = png

    def save_item(self, item: Mapping[str, Any], fallback_stem: str = "item") -> dict[str, Any]:
        """Write one item's files; returns its manifest record."""
        record, targets = self.new_record(
            item,
            (self.counterfactual_key, self.difference_key),
            fallback_stem,
            fields={"prompt": item.get(self.prompt_key) or self.default_prompt, **self.intensity_field(item)},
            files={"counterfactual": "_counterfactual.nii.gz", "difference": "_difference.nii.gz"},
            png=("panel", "_panel.png") if self.png else None,
        )
        image = item[self.image_key]
        affine = affine_of(image)
        counterfactual = to_numpy(item[self.counterfactual_key])
        difference = to_numpy(item[self.difference_key])
        write_nifti(counterfactual, affine, targets[0], overwrite=self.overwrite)
        write_nifti(difference, affine, targets[1], overwrite=self.overwrite)
        if "panel" in record:
            mask = item.get(self.mask_key) if self.mask_key else None
            mask_array = (
                to_numpy(mask) if isinstance(mask, torch.Tensor) and mask.shape[1:] == image.shape[1:] else None
            )
            _panel(
                targets[2],
                to_numpy(image),
                counterfactual,
                difference,
                mask_array,
                str(record["prompt"] or ""),
                self.overwrite,
            )
        self.records.append(record)
        return record


def gather_in_order(values: Sequence[float]) -> list[float]:
    """Every rank's per-item ``values`` in the dataset's order, for a sampler that gives rank ``r`` of ``W`` the
    items ``r, r + W, r + 2W, ...`` (MONAI's and PyTorch's ``DistributedSampler`` without shuffling or padding, as
    the bundles' ``multi_gpu_inference.json`` uses); the values themselves outside a multi-process run."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(values)
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, list(values))
    longest = max(len(part) for part in parts)
    return [part[index] for index in range(longest) for part in parts if index < len(part)]


class CounterfactualMetricsHandler:
    """Per-image counterfactual quality, averaged over the run into ``engine.state.metrics``.

    For every item, with the oracle's probabilities on the counterfactual:

    - ``validity``: the oracle no longer sees any labelled finding (``direction="remove"``) or sees all of them
      (``"induce"``);
    - ``l1_outside``: mean |counterfactual - input| outside the finding / edited region (proximity; leakage
      for induction), and ``l1_inside`` within it;
    - ``localization_auroc``: the difference map as a detector of the ground-truth mask;
    - ``ssim`` / ``ms_ssim`` between counterfactual and input (MONAI's metrics);
    - with the true counterfactual (``twin_key``): ``twin_l1`` (everywhere), ``twin_l1_outside``,
      ``twin_l1_inside`` and ``twin_ssim``.

    Means skip undefined values (e.g. AUROC of an image without a finding). Values of all ranks are gathered
    before averaging, so every rank ends with the same metrics. ``engine.state.metrics["per_image"]`` keeps the
    per-image values, of every rank in the dataset's order (:func:`gather_in_order`).

    Args:
        oracle: classifier with ``logits_and_embedding`` (a ``FindingClassifier``) or returning logits.
        spatial_dims: 2 or 3.
        direction: ``"remove"`` or ``"induce"``.
        label_key: item key of the multi-hot finding labels.
        mask_key: item key of the ground-truth finding (or region) mask.
        twin_key: item key of the true counterfactual, if the data has one: the healthy twin when removing a
            finding, the abnormal original when inducing it.
        ms_ssim_kernel_size, ms_ssim_weights: MS-SSIM settings; the defaults suit 64-pixel images (MONAI's
            defaults need 161 pixels or more).
        threshold: the oracle's decision threshold.
    """

    def __init__(
        self,
        oracle: torch.nn.Module,
        spatial_dims: int,
        direction: str = "remove",
        image_key: str = CommonKeys.IMAGE,
        counterfactual_key: str = CommonKeys.PRED,
        difference_key: str = "difference",
        label_key: str = "label",
        mask_key: str = "mask",
        twin_key: str | None = "healthy",
        ms_ssim_kernel_size: int = 7,
        ms_ssim_weights: Sequence[float] = (0.3, 0.3, 0.4),
        threshold: float = 0.5,
    ) -> None:
        self.oracle = oracle.eval()
        self.direction = check_option("direction", direction, ("remove", "induce"))
        self.image_key, self.counterfactual_key, self.difference_key = image_key, counterfactual_key, difference_key
        self.label_key, self.mask_key, self.twin_key = label_key, mask_key, twin_key
        self.threshold = threshold
        self.ssim = SSIMMetric(spatial_dims=spatial_dims, data_range=1.0, reduction="none")
        self.ms_ssim = MultiScaleSSIMMetric(
            spatial_dims=spatial_dims,
            data_range=1.0,
            kernel_size=ms_ssim_kernel_size,
            weights=ms_ssim_weights,
            reduction="none",
        )
        self.values: dict[str, list[float]] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._completed)

    def _started(self, _engine: Engine) -> None:
        self.values = {}

    def _stack(self, items: Sequence[Mapping[str, Any]], key: str, device: torch.device) -> torch.Tensor:
        return torch.stack([torch.as_tensor(i[key], dtype=torch.float32) for i in items]).to(device)

    def oracle_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """The oracle's finding probabilities ``(B, K)`` of images ``(B, C, *spatial)`` (sigmoid of its logits)."""
        with torch.no_grad():
            if hasattr(self.oracle, "logits_and_embedding"):
                logits, _ = self.oracle.logits_and_embedding(images)
            else:
                logits = self.oracle(images)
        return torch.sigmoid(logits)

    def compute(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """The per-image measures of a list of items."""
        device = next(self.oracle.parameters()).device
        missing = {self.image_key, self.counterfactual_key, self.difference_key, self.mask_key, self.label_key} - set(
            items[0]
        )
        if missing:
            raise ValueError(f"the items lack {sorted(missing)} (keys: {sorted(items[0])}); check the datalist.")
        image = self._stack(items, self.image_key, device)
        counterfactual = self._stack(items, self.counterfactual_key, device).clamp(0, 1)
        difference = self._stack(items, self.difference_key, device)
        mask = self._stack(items, self.mask_key, device)
        labels = self._stack(items, self.label_key, device)
        probabilities = self.oracle_probabilities(counterfactual)
        values = {
            "validity": compute_counterfactual_validity(probabilities, labels, self.direction, self.threshold),
            "l1_outside": compute_masked_l1(counterfactual, image, mask, "outside"),
            "l1_inside": compute_masked_l1(counterfactual, image, mask, "inside"),
            "localization_auroc": compute_localization_auroc(difference, mask),
            "ssim": self.ssim(counterfactual, image).flatten(),
            "ms_ssim": self.ms_ssim(counterfactual, image).flatten(),
        }
        if self.twin_key is not None:
            if not all(self.twin_key in i for i in items):
                # undefined rather than absent: every rank reports the same metric names
                missing = torch.full((len(items),), float("nan"))
                values.update({name: missing for name in TWIN_METRICS})
                return {k: v.detach().float().cpu() for k, v in values.items()}
            twin = self._stack(items, self.twin_key, device)
            values["twin_l1"] = compute_masked_l1(counterfactual, twin, mask, "all")
            values["twin_l1_outside"] = compute_masked_l1(counterfactual, twin, mask, "outside")
            values["twin_l1_inside"] = compute_masked_l1(counterfactual, twin, mask, "inside")
            values["twin_ssim"] = self.ssim(counterfactual, twin).flatten()
        return {k: v.detach().float().cpu() for k, v in values.items()}

    def __call__(self, engine: Engine) -> None:
        items = iterate_items(engine)
        # outputs on their inputs' own grids may differ in size within a batch: measure such items one by one
        same_size = len({tuple(torch.as_tensor(i[self.image_key]).shape) for i in items}) == 1
        for group in [items] if same_size else [[item] for item in items]:
            for name, value in self.compute(group).items():
                self.values.setdefault(name, []).extend(value.tolist())

    def metric_names(self) -> list[str]:
        """The names this handler reports, the same on every rank."""
        return list(BASE_METRICS) + (list(TWIN_METRICS) if self.twin_key is not None else [])

    def _completed(self, engine: Engine) -> None:
        # every rank gathers every name (collective calls in the same order), then names with no value are left out
        per_image = {name: gather_in_order(self.values.get(name, [])) for name in self.metric_names()}
        engine.state.metrics["per_image"] = {name: values for name, values in per_image.items() if values}
        for name in self.metric_names():
            # the means come from the values gathered above: one collective per metric, whatever each rank holds
            gathered = torch.tensor(per_image[name], dtype=torch.float64)
            finite = gathered[~torch.isnan(gathered)]
            engine.state.metrics[name] = float(finite.mean()) if len(finite) else math.nan
            engine.state.metrics[f"{name}_count"] = int(len(finite))
