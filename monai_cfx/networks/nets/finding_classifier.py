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
"""Multi-label finding classifier: the independent "oracle" that judges generated and counterfactual images."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DenseNet

from monai_cfx.transforms.scan import fit_to_size

__all__ = ["FindingClassifier"]


class FindingClassifier(DenseNet):
    """A MONAI ``DenseNet`` (2D or 3D) with one logit per finding, whose pooled features also serve as the
    embedding for FID/KID on this domain (torchvision's Inception is not available here, and is not a
    radiograph model anyway).

    Args:
        spatial_dims: 2 or 3.
        num_findings: number of multi-label outputs.
        in_channels: image channels.
        init_features, growth_rate, block_config: DenseNet size (defaults are small enough for CPU training).
        dropout_prob: dropout in the dense layers.
        stem_pooling: keep DenseNet's stem max-pooling. Without it the dense blocks see the image at half
            resolution instead of a quarter, which small findings (a few-pixel nodule at 64x64) need.
        input_size: the side the classifier was trained at. Images of another size (outputs mapped back onto a
            user's grid) are first brought to it as the bundles' preprocessing does: the longest side
            area-resized to ``input_size``, the rest zero-padded symmetrically. ``None`` takes images as they are.

    Example::

        oracle = FindingClassifier(spatial_dims=2, num_findings=4)
        probabilities = torch.sigmoid(oracle(images))
        embedding = oracle.embed(images)  # (B, F) for FID / KID
    """

    def __init__(
        self,
        spatial_dims: int,
        num_findings: int,
        in_channels: int = 1,
        init_features: int = 16,
        growth_rate: int = 8,
        block_config: Sequence[int] = (4, 6, 8),
        dropout_prob: float = 0.0,
        stem_pooling: bool = True,
        input_size: int | None = None,
    ) -> None:
        if num_findings < 1:
            raise ValueError(f"`num_findings` must be >= 1, got {num_findings}.")
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=num_findings,
            init_features=init_features,
            growth_rate=growth_rate,
            block_config=tuple(block_config),
            dropout_prob=dropout_prob,
        )
        if not stem_pooling:
            self.features.pool0 = torch.nn.Identity()
        self.input_size = input_size

    def fit_input(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` at ``input_size`` (:func:`~monai_cfx.transforms.fit_to_size`), or unchanged."""
        return images if self.input_size is None else fit_to_size(images, self.input_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(self.fit_input(images))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features before the classification layer, ``(B, F)``."""
        return self.class_layers[:-1](self.features(self.fit_input(images)))

    def logits_and_embedding(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward(images), embed(images))`` from one pass through the dense blocks."""
        embedding = self.embed(images)
        return self.class_layers[-1](embedding), embedding
