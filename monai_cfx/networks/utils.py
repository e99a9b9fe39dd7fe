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
deterministic latent of an autoencoder, the fused attention switch and the inference speed switches."""

from __future__ import annotations

import types
from typing import Any

import torch
from torch.utils._pytree import tree_map

__all__ = [
    "accelerate",
    "cross_attention_dim_of",
    "downsampling_factor",
    "encode_mean",
    "parameter_dtype_of",
    "reconstruct_mean",
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


def reconstruct_mean(autoencoder_model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The autoencoder's deterministic round trip: the decoding of :func:`encode_mean` (call under ``no_grad`` for
    evaluation)."""
    return autoencoder_model.decode_stage_2_outputs(encode_mean(autoencoder_model, images))


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


_AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _autocast_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The class's forward under ``torch.autocast``, with floating outputs back in float32 so that the scheduler
    steps and the decoder run as without it."""
    device_type, dtype = self._monai_cfx_autocast
    with torch.autocast(device_type, dtype=dtype):
        outputs = type(self).forward(self, *args, **kwargs)
    return tree_map(lambda x: x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x, outputs)


def accelerate(
    network: torch.nn.Module,
    channels_last: bool = False,
    flash_attention: bool | None = None,
    autocast_dtype: str | torch.dtype | None = None,
    compile: bool = False,
) -> torch.nn.Module:
    """Inference speed switches for a built network, each off by default, so that a config can turn them on.

    ``benchmarks/accelerated_paths.py`` measures each against the plain network on the counterfactual edit. On this
    project's CPU (one thread, 64² chest) none is faster except ``compile`` (0.87 of the time after a first call
    that compiles for minutes); the others are meant for GPUs.

    Args:
        network: a built network (weights loaded); changed in place.
        channels_last: weights in ``torch.channels_last`` (2D) or ``torch.channels_last_3d`` (3D) memory format.
            Results equal the plain network's up to float rounding.
        flash_attention: MONAI's fused attention (``set_flash_attention``) on (True) or off (False) in every block
            where it is equivalent; None leaves the blocks as built.
        autocast_dtype: ``"bfloat16"`` or ``"float16"``: the forward runs under ``torch.autocast`` on the network's
            device, outputs back in float32. Rounding changes the results (bf16: about 1e-2 on a counterfactual).
        compile: ``torch.compile`` in place (``nn.Module.compile``: the module, its names and hooks stay), which
            needs a C++ compiler on CPU; the first call compiles.

    Returns:
        ``network``.
    """
    if channels_last:
        dims = spatial_dims_of(network)
        if dims not in (2, 3):
            raise ValueError(f"`channels_last` needs a 2D or 3D convolutional network, got spatial dims {dims}.")
        network.to(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    if flash_attention is not None:
        set_flash_attention(network, flash_attention)
    if autocast_dtype is not None:
        dtype = _AUTOCAST_DTYPES.get(autocast_dtype, autocast_dtype) if isinstance(autocast_dtype, str) else None
        dtype = autocast_dtype if isinstance(autocast_dtype, torch.dtype) else dtype
        if dtype not in _AUTOCAST_DTYPES.values():
            raise ValueError(
                f"`autocast_dtype` must be one of {sorted(_AUTOCAST_DTYPES)} or None, got {autocast_dtype!r}."
            )
        parameter = next(network.parameters(), None)
        device_type = parameter.device.type if parameter is not None else "cpu"
        network._monai_cfx_autocast = (device_type, dtype)
        # an instance attribute, so the module keeps its class, names and state dict (deepcopy rebinds it)
        network.forward = types.MethodType(_autocast_forward, network)
    if compile:
        network.compile()
    return network
