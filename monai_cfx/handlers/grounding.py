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
"""Ignite handler that accumulates phrase-grounding quality over an evaluator's run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from monai.utils import IgniteInfo, min_version, optional_import

from monai_cfx.metrics import GroundingMetric

from .counterfactual import iterate_items

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["GroundingMetricsHandler"]


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
