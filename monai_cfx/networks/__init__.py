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
"""Networks (text encoder, finding classifier), diffusion schedulers, and helpers that inspect built networks."""

from __future__ import annotations

from .utils import (
    accelerate,
    downsampling_factor,
    encode_mean,
    reconstruct_mean,
    set_flash_attention,
    spatial_dims_of,
)

__all__ = [
    "accelerate",
    "downsampling_factor",
    "encode_mean",
    "reconstruct_mean",
    "set_flash_attention",
    "spatial_dims_of",
]
