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
"""Helpers that adjust built MONAI networks."""

from __future__ import annotations

import torch

__all__ = ["set_flash_attention"]


def set_flash_attention(network: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """Switch the fused attention kernel (``torch.nn.functional.scaled_dot_product_attention``) on or off in every
    attention block of a MONAI network (``SABlock``, ``CrossAttentionBlock``: the ``use_flash_attention`` flag).

    The fused kernel never materialises the ``N x N`` attention matrix, which is what lets 3D networks run on
    large volumes: a 3D ``AutoencoderKL``'s self-attention over a 32³ latent alone holds a 32768² matrix
    (4.3 GB) otherwise. Results equal the explicit softmax path up to float rounding; weights are unchanged.
    Blocks where the fused path is not equivalent are left as they are: those that save their attention
    (``save_attn=True``), add a relative positional bias, or use attention dropout (MONAI's fused call applies
    it even in eval mode). :class:`~monai_cfx.visualize.CrossAttentionRecorder` switches it off on the blocks
    it captures.

    Returns:
        ``network``, changed in place.
    """
    for module in network.modules():
        if not hasattr(module, "use_flash_attention"):
            continue
        explicit_only = (
            getattr(module, "save_attn", False)
            or getattr(module, "rel_positional_embedding", None) is not None
            or getattr(module, "dropout_rate", 0.0) > 0
        )
        if not explicit_only:
            module.use_flash_attention = bool(enabled)
    return network
