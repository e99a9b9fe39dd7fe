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
"""Networks: the Hugging Face text encoder with added-token embeddings, the finding classifier (oracle), and the
joint diffusion/classifier UNet (Mediffusion), and Stable Diffusion folders as MONAI networks."""

from __future__ import annotations

from .finding_classifier import FindingClassifier
from .joint_diffusion_unet import JointDiffusionUNet
from .stable_diffusion import (
    GreyscaleAutoencoder,
    StableDiffusion,
    StableDiffusionAutoencoderKL,
    load_stable_diffusion,
    load_stable_diffusion_autoencoder,
    load_stable_diffusion_scheduler,
    load_stable_diffusion_unet,
    save_unet_to_diffusers,
    unet_from_config,
)
from .text_encoder import AddedTokenEmbedding, PhraseTruncatedError, TextEncoder

__all__ = [
    "AddedTokenEmbedding",
    "FindingClassifier",
    "GreyscaleAutoencoder",
    "JointDiffusionUNet",
    "PhraseTruncatedError",
    "StableDiffusion",
    "StableDiffusionAutoencoderKL",
    "TextEncoder",
    "load_stable_diffusion",
    "load_stable_diffusion_autoencoder",
    "load_stable_diffusion_scheduler",
    "load_stable_diffusion_unet",
    "save_unet_to_diffusers",
    "unet_from_config",
]
