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
"""How much of a finding an autoencoder keeps, measured against the healthy twin."""

from __future__ import annotations

import torch

from monai_cfx.networks.utils import reconstruct_mean

__all__ = ["compute_finding_contrast_kept"]


@torch.no_grad()
def compute_finding_contrast_kept(
    autoencoder: torch.nn.Module, images: torch.Tensor, healthy: torch.Tensor, masks: torch.Tensor
) -> torch.Tensor:
    """Per image, the finding's contrast in the autoencoder's reconstructions over its contrast in the input:
    ``mean over the mask of |AE(image) - AE(healthy)|`` / ``mean over the mask of |image - healthy|``. 1 keeps the
    finding as it is, 0 erases it (a plain L1 autoencoder erases a lesion of a few voxels at almost no cost).

    Args:
        autoencoder: a MONAI ``AutoencoderKL`` (encoded to the posterior mean, then decoded).
        images, healthy: ``(N, C, *spatial)`` images with a finding and their healthy twins.
        masks: ``(N, 1 or C, *spatial)`` the finding's voxels (non-zero), each image's mask non-empty.

    Raises:
        ValueError: when the shapes differ or an image's mask is empty or its finding has no contrast.
    """
    if images.shape != healthy.shape or masks.shape[0] != images.shape[0] or masks.shape[2:] != images.shape[2:]:
        raise ValueError(
            f"`images` {tuple(images.shape)}, `healthy` {tuple(healthy.shape)} and `masks` {tuple(masks.shape)} "
            "must hold the same images."
        )
    inside = (masks != 0).expand_as(images)
    contrast = ((images - healthy).abs() * inside).flatten(1).sum(1)
    voxels = inside.flatten(1).sum(1)
    if (voxels == 0).any() or (contrast == 0).any():
        raise ValueError("every image needs a non-empty mask over which it differs from its healthy twin.")
    kept = []
    for image, twin, region in zip(images, healthy, inside):  # one pair at a time: a volume's memory at most
        pair = torch.stack([image, twin]).float()
        reconstructions = reconstruct_mean(autoencoder, pair)
        kept.append(((reconstructions[0] - reconstructions[1]).abs() * region).sum())
    return torch.stack(kept) / contrast  # the means over the same voxels: their sums' ratio
