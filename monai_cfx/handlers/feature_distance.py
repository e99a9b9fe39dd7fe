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
"""Epoch-level feature distances (FID, KID) between generated and reference images."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.metrics import FIDMetric
from monai.utils import CommonKeys, IgniteInfo, evenly_divisible_all_gather, min_version, optional_import

from monai_cfx.metrics import KIDMetric

from .saving import iterate_items

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
idist, _ = optional_import("ignite", IgniteInfo.OPT_IMPORT_VERSION, min_version, "distributed")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["FeatureDistanceHandler"]


class FeatureDistanceHandler:
    """Collect features of generated and reference images over a run; at its end put FID and KID in
    ``engine.state.metrics`` (``<prefix>fid``, ``<prefix>kid``, ``<prefix>kid_std``).

    Distribution distances need all images at once, so they cannot be iteration metrics. Features of all ranks
    are gathered before computing, so every rank reports the same value. Only features are kept, never images.

    Args:
        feature_fn: images ``(B, C, *spatial)`` -> features ``(B, F)``, e.g. ``oracle.embed`` (2D or 3D) or an
            Inception network for 2D natural-image statistics.
        generated_key: item key of the generated images (the counterfactuals).
        reference_key: item key of the reference images (e.g. the healthy twins, or the input images).
        metrics: which of ``"fid"``, ``"kid"`` to compute.
        prefix: prefix of the metric names.
        kid_subset_size, kid_num_subsets: KID estimator settings (see :func:`monai_cfx.metrics.compute_kid`).
    """

    def __init__(
        self,
        feature_fn: Callable[[torch.Tensor], torch.Tensor],
        generated_key: str = CommonKeys.PRED,
        reference_key: str = CommonKeys.IMAGE,
        metrics: Sequence[str] = ("fid", "kid"),
        prefix: str = "",
        kid_subset_size: int = 1000,
        kid_num_subsets: int = 100,
    ) -> None:
        unknown = set(metrics) - {"fid", "kid"}
        if unknown:
            raise ValueError(f"`metrics` may contain 'fid' and 'kid', got {sorted(unknown)}.")
        self.feature_fn = feature_fn
        self.generated_key, self.reference_key = generated_key, reference_key
        self.metrics, self.prefix = tuple(metrics), prefix
        self.kid = KIDMetric(subset_size=kid_subset_size, num_subsets=kid_num_subsets)
        self.generated: list[torch.Tensor] = []
        self.reference: list[torch.Tensor] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._completed)

    def _started(self, _engine: Engine) -> None:
        self.generated, self.reference = [], []

    def _features(self, items: Sequence[Any], key: str, device: torch.device) -> torch.Tensor:
        if any(key not in i for i in items):
            raise ValueError(f"an item has no {str(key)!r} key; keys: {sorted(items[0])}.")
        images = [torch.as_tensor(i[key], dtype=torch.float32).to(device).clamp(0, 1) for i in items]
        # images on their inputs' own grids may differ in size within a batch: embed such images one by one
        groups = [torch.stack(images)] if len({i.shape for i in images}) == 1 else [i[None] for i in images]
        with torch.no_grad():
            return torch.cat([self.feature_fn(group).detach().double().cpu() for group in groups])

    def __call__(self, engine: Engine) -> None:
        items = iterate_items(engine)
        device = torch.device(getattr(engine.state, "device", None) or "cpu")
        self.generated.append(self._features(items, self.generated_key, device))
        self.reference.append(self._features(items, self.reference_key, device))

    def _completed(self, engine: Engine) -> None:
        if not self.generated:
            raise ValueError("no images were seen during the run: nothing to compute FID/KID on.")
        # ranks may hold different numbers of images (a sampler that is not evenly divisible)
        generated = evenly_divisible_all_gather(torch.cat(self.generated))
        reference = evenly_divisible_all_gather(torch.cat(self.reference))
        if "fid" in self.metrics:
            engine.state.metrics[f"{self.prefix}fid"] = float(FIDMetric()(generated, reference))
        if "kid" in self.metrics:
            engine.state.metrics[f"{self.prefix}kid"] = float(self.kid(generated, reference))
            engine.state.metrics[f"{self.prefix}kid_std"] = float(self.kid.last_std)
