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
"""Dictionary transform that encodes images to the posterior of a frozen ``AutoencoderKL`` once."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["EncodeLatentd"]


class EncodeLatentd(MapTransform):
    """Add the autoencoder's posterior ``(z_mu, z_sigma)`` of an image as ``<key>_z_mu`` and ``<key>_z_sigma``.

    The transform is deterministic, so a ``CacheDataset`` runs the encoder once per image for the whole
    training; ``LatentDiffusionPrepareBatch`` then draws ``z = z_mu + z_sigma * eps`` each step, which is
    what ``AutoencoderKL.encode_stage_2_inputs`` returns, without another encoder pass.

    Args:
        keys: image keys (channel-first, no batch dimension).
        autoencoder: a MONAI ``AutoencoderKL`` (anything with ``encode(x) -> (z_mu, z_sigma)``); kept frozen.
        device: where to run the encoder; outputs are moved back to the CPU.
        allow_missing_keys: don't raise if a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection,
        autoencoder: torch.nn.Module,
        device: str | torch.device = "cpu",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.device = torch.device(device)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key], dtype=torch.float32)
            with torch.no_grad():
                z_mu, z_sigma = self.autoencoder.encode(image.unsqueeze(0).to(self.device))
            d[f"{key}_z_mu"], d[f"{key}_z_sigma"] = z_mu[0].cpu(), z_sigma[0].cpu()
        return d
