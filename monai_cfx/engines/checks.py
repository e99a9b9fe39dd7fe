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
"""The out-of-distribution check of the inference PrepareBatches: the autoencoder's reconstruction error."""

from __future__ import annotations

import math

import torch
from monai.data import MetaTensor

__all__ = ["check_reconstruction"]


def check_reconstruction(autoencoder: torch.nn.Module, images: torch.Tensor, max_mse: float | None) -> torch.Tensor:
    """Refuse images that are not scans of the kind the model knows: the autoencoder's round trip
    (``decode_stage_2_outputs(encode_stage_2_inputs(x))``) of each image, in the model's intensity units, must be
    within ``max_mse`` mean squared error. A constant image, a photograph or a scan of another modality is far
    outside what a latent diffusion model was trained on, and its counterfactual or heat map would be invented.
    ``max_mse=None`` skips the check. Returns the per-image errors ``(B,)``.

    Raises:
        ValueError: naming every refused image's file, its error and the limit.
    """
    if max_mse is None:
        return torch.full((images.shape[0],), float("nan"))
    if not (isinstance(max_mse, (int, float)) and math.isfinite(max_mse) and max_mse > 0):
        raise ValueError(f"`max_reconstruction_mse` must be a positive number or None, got {max_mse!r}.")
    with torch.no_grad():
        reconstruction = autoencoder.decode_stage_2_outputs(autoencoder.encode_stage_2_inputs(images))
    errors = ((reconstruction.float() - images.float()) ** 2).flatten(1).mean(1).cpu()
    refused = [index for index, error in enumerate(errors.tolist()) if error > max_mse]
    if refused:
        names = images.meta.get("filename_or_obj") if isinstance(images, MetaTensor) else None
        names = [names] if isinstance(names, str) else names
        described = ", ".join(
            f"{names[i] if names and i < len(names) else f'batch item {i}'!r} (error {errors[i]:.4f})" for i in refused
        )
        raise ValueError(
            f"out of distribution: the autoencoder reconstructs {described} with a mean squared error above "
            f"max_reconstruction_mse={max_mse} (the model's own held-out scans stay below it): not a scan of the kind "
            "this model was trained on, so its output would be invented. Use weights trained on such scans, or set "
            "--max_reconstruction_mse null to run anyway."
        )
    return errors
