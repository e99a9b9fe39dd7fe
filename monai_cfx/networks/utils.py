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
"""Helpers that inspect and adjust built MONAI networks: spatial dimensionality, down-sampling factor, the
deterministic latent of an autoencoder, the fused attention switch."""

from __future__ import annotations

import torch

__all__ = [
    "cross_attention_dim_of",
    "downsampling_factor",
    "encode_mean",
    "parameter_dtype_of",
    "set_flash_attention",
    "spatial_dims_of",
]


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


def spatial_dims_of(network: torch.nn.Module) -> int | None:
    """Spatial dimensionality of a convolutional network, read from its first convolution (None without one).

    Example::

        spatial_dims_of(DiffusionModelUNet(spatial_dims=3, ...))  # 3
    """
    for module in network.modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            return module.weight.ndim - 2
    return None


def downsampling_factor(network: torch.nn.Module) -> int:
    """Total down-sampling of MONAI's AutoencoderKL / VQVAE encoder or DiffusionModelUNet (1 if unknown).

    Example::

        downsampling_factor(autoencoder) * downsampling_factor(unet)  # what an input size must be divisible by
    """
    encoder = getattr(network, "encoder", None)
    if encoder is not None and hasattr(encoder, "channels"):
        return 2 ** (len(encoder.channels) - 1)
    if hasattr(network, "block_out_channels"):
        return 2 ** (len(network.block_out_channels) - 1)
    return 1


def encode_mean(autoencoder_model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The posterior mean of an AutoencoderKL (deterministic), else the model's stage-2 encoding.

    Example::

        latent = encode_mean(autoencoder, images) * scale_factor
    """
    encode = getattr(autoencoder_model, "encode", None)
    if encode is not None and hasattr(autoencoder_model, "sampling"):
        return encode(images)[0]
    return autoencoder_model.encode_stage_2_inputs(images)


def parameter_dtype_of(network: torch.nn.Module) -> torch.dtype | None:
    """The float type of a network's parameters, or None for a network without float parameters."""
    parameter = next(network.parameters(), None)
    return parameter.dtype if parameter is not None and parameter.is_floating_point() else None


def cross_attention_dim_of(network: torch.nn.Module) -> int | None:
    """The text context width a MONAI ``DiffusionModelUNet`` takes (its first cross-attention block's context
    input), or None for a network without cross-attention."""
    for module in network.modules():
        if type(module).__name__ == "CrossAttentionBlock" and hasattr(module, "context_input_size"):
            return int(module.context_input_size)
    return None
