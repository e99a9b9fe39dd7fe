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
"""Measurements in an autoencoder's latent space: how far, per channel, one image domain's latents sit from
another's (the direction of a per-channel drift in Latent Drifting, Yeganeh et al., arXiv 2412.20651)."""

from __future__ import annotations

import numpy as np
import torch

from monai_cfx.utils import check_images

__all__ = ["latent_shift"]


@torch.no_grad()
def latent_shift(
    autoencoder: torch.nn.Module,
    source_images: torch.Tensor,
    target_images: torch.Tensor,
    scale_factor: float = 1.0,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> list[float]:
    """Per-channel difference of the mean scaled latent (posterior means) of ``target_images`` and ``source_images``.

    A direction for a per-channel drift: the target domain's latents sit, on average, this far from the source
    domain's (e.g. the chest phantom's target acquisition: about ``[0.08, 0.41, -0.97]`` with the shipped
    autoencoder).

    Example::

        shift = latent_shift(autoencoder, source_images, target_images, scale_factor=0.9)

    Args:
        autoencoder: the autoencoder (anything with ``encode(images) -> (z_mu, z_sigma)``).
        source_images: images of the source domain ``(N, C, *spatial)``.
        target_images: images of the target domain, same layout.
        scale_factor: the latent scale of the diffusion model.
        batch_size: images per encoder call.
        device: where the encoder runs.

    Returns:
        one value per latent channel: mean target latent minus mean source latent.

    Raises:
        ValueError: when either set is not a batch of 2D or 3D images.
    """
    means = []
    for name, images in (("source_images", source_images), ("target_images", target_images)):
        images = check_images(name, images)
        total = None
        for start in range(0, len(images), batch_size):
            z_mu, _ = autoencoder.encode(images[start : start + batch_size].to(device))
            sums = (z_mu.float() * scale_factor).sum(dim=[0, *range(2, z_mu.ndim)])
            total = sums if total is None else total + sums
        means.append(total / (len(images) * int(np.prod(z_mu.shape[2:]))))
    return [float(value) for value in (means[1] - means[0]).cpu()]
