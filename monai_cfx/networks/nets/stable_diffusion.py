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
"""Stable Diffusion folders (diffusers layout) as MONAI networks: the UNet as MONAI's ``DiffusionModelUNet`` with
its weights renamed (no weight changes but a 1x1 reshape), the VAE as :class:`StableDiffusionAutoencoderKL` (a
MONAI ``AutoencoderKL`` built from MONAI's own encoder and decoder pieces), the scheduler as MONAI's
``DDIMScheduler`` with the folder's settings, and the way back for a fine-tuned UNet.

The converter reads ``config.json`` and the weights (safetensors, or ``.bin`` with ``weights_only=True``) directly;
diffusers is not needed to load, only to write the test fixtures.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.nets.autoencoderkl import Decoder, Encoder
from monai.networks.schedulers import DDIMScheduler
from torch import nn

__all__ = [
    "GreyscaleAutoencoder",
    "StableDiffusion",
    "StableDiffusionAutoencoderKL",
    "load_stable_diffusion",
    "load_stable_diffusion_autoencoder",
    "load_stable_diffusion_scheduler",
    "load_stable_diffusion_unet",
    "save_unet_to_diffusers",
    "unet_state_dict_from_diffusers",
    "unet_state_dict_to_diffusers",
]

SD_SCALE_FACTOR = 0.18215  # SD 1.x / 2.x VAE's scaling_factor when its config does not give one
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# the schedulers whose discrete beta schedule and timesteps a DDIM scheduler shares (diffusers swaps them with
# from_config, as the DiffEdit pipeline does for its DDIM inversion)
DISCRETE_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "DDIMInverseScheduler")
BETA_SCHEDULES = {"scaled_linear": "scaled_linear_beta", "linear": "linear_beta"}

# UNet config fields MONAI's DiffusionModelUNet cannot express: the value each must have (SDXL, class or added
# embeddings, other time embeddings and blocks)
_UNET_FIXED = {
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "class_embed_type": None,
    "num_class_embeds": None,
    "projection_class_embeddings_input_dim": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "center_input_sample": False,
    "act_fn": "silu",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "mid_block_only_cross_attention": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
    "attention_type": "default",
    "reverse_transformer_layers_per_block": None,
    "dropout": 0.0,
}
_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


def _read_config(folder: Path, what: str) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no config.json in {str(folder)!r} (a diffusers component folder).")
    with open(path) as f:
        return json.load(f)


def _read_weights(folder: Path, what: str) -> dict[str, torch.Tensor]:
    """A component's weights: safetensors when present, else the ``.bin`` read with ``weights_only=True``."""
    for name in WEIGHT_NAMES:
        path = folder / name
        if path.is_file():
            try:
                if name.endswith(".safetensors"):
                    from safetensors.torch import load_file

                    return load_file(str(path))
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:
                raise ValueError(f"{what}: cannot read the weights {str(path)!r}: {error}") from error
    raise FileNotFoundError(f"{what}: none of {list(WEIGHT_NAMES)} in {str(folder)!r}.")


def _per_level(name: str, value: Any, levels: int, where: str) -> list[Any]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(values) != levels:
        raise ValueError(f"{where}: `{name}` has {len(values)} entries for {levels} levels.")
    return values


# --------------------------------------------------------------------------------------------------------- UNet


def unet_from_config(
    config: Mapping[str, Any],
    where: str = "unet/config.json",
    network_class: type[DiffusionModelUNet] = DiffusionModelUNet,
    **extra_arguments: Any,
) -> DiffusionModelUNet:
    """A MONAI ``DiffusionModelUNet`` of a diffusers ``UNet2DConditionModel`` config (SD 1.x and 2.x layouts).

    ``network_class`` builds it (a ``DiffusionModelUNet`` subclass with the same architecture, such as
    :class:`~monai_cfx.networks.nets.JointDiffusionUNet`, taking ``extra_arguments`` as well).

    Raises:
        ValueError: naming the field, for anything MONAI cannot express (SDXL's added embeddings and per-level
            transformer depth, class embeddings, other blocks, ...).
    """
    for field, expected in _UNET_FIXED.items():
        if config.get(field, expected) != expected:
            raise ValueError(
                f"{where}: `{field}` is {config[field]!r}; MONAI's DiffusionModelUNet can only express {expected!r} "
                "(SD 1.x / 2.x UNets; SDXL-style and class-conditioned UNets are not supported)."
            )
    down, up = list(config.get("down_block_types", [])), list(config.get("up_block_types", []))
    unknown = [t for t in down if t not in _DOWN] + [t for t in up if t not in _UP]
    if unknown or not down:
        raise ValueError(f"{where}: block types {unknown or down} are not SD 1.x / 2.x blocks ({list(_DOWN)}).")
    attention = [_DOWN[t] for t in down]
    if [_UP[t] for t in up] != attention[::-1]:
        raise ValueError(f"{where}: `up_block_types` {up} do not mirror `down_block_types` {down}.")
    levels = len(down)
    channels = [int(c) for c in config["block_out_channels"]]
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    # diffusers' attention_head_dim of SD 1.x / 2.x is the number of heads (its own comment says so)
    heads = [int(h) for h in _per_level("attention_head_dim", heads, levels, where)]
    if any(c % h for c, h in zip(channels, heads)):
        raise ValueError(f"{where}: `block_out_channels` {channels} are not divisible by the heads {heads}.")
    layers = _per_level("transformer_layers_per_block", config.get("transformer_layers_per_block", 1), levels, where)
    if len(set(layers)) != 1:
        raise ValueError(
            f"{where}: `transformer_layers_per_block` {layers} differs per level; MONAI's DiffusionModelUNet has one "
            "depth for every level."
        )
    num_res_blocks = [int(n) for n in _per_level("layers_per_block", config.get("layers_per_block", 2), levels, where)]
    unet = network_class(
        spatial_dims=2,
        in_channels=int(config.get("in_channels", 4)),
        out_channels=int(config.get("out_channels", 4)),
        num_res_blocks=num_res_blocks,
        channels=channels,
        attention_levels=attention,
        norm_num_groups=int(config.get("norm_num_groups", 32)),
        norm_eps=float(config.get("norm_eps", 1e-5)),
        num_head_channels=[c // h for c, h in zip(channels, heads)],
        with_conditioning=True,
        transformer_num_layers=int(layers[0]),
        cross_attention_dim=int(config.get("cross_attention_dim", 768)),
        upcast_attention=bool(config.get("upcast_attention", False)),
        **extra_arguments,
    )
    # diffusers' Transformer2DModel normalises its input with eps 1e-6 whatever the config's norm_eps
    for module in unet.modules():
        if type(module).__name__ == "SpatialTransformer":
            module.norm.eps = 1e-6
    return unet


_UNET_RULES = [  # (diffusers pattern, MONAI replacement), applied in order to each key
    (r"^conv_in\.", "conv_in.conv."),
    (r"^time_embedding\.linear_1\.", "time_embed.0."),
    (r"^time_embedding\.linear_2\.", "time_embed.2."),
    (r"^mid_block\.resnets\.0\.", "middle_block.resnet_1."),
    (r"^mid_block\.resnets\.1\.", "middle_block.resnet_2."),
    (r"^mid_block\.attentions\.0\.", "middle_block.attention."),
    (r"\.downsamplers\.0\.conv\.", ".downsampler.op.conv."),
    (r"\.upsamplers\.0\.conv\.", ".upsampler.postconv.conv."),
    (r"\.conv1\.", ".conv1.conv."),
    (r"\.conv2\.", ".conv2.conv."),
    (r"\.conv_shortcut\.", ".skip_connection.conv."),
    (r"\.proj_in\.", ".proj_in.conv."),
    (r"\.proj_out\.", ".proj_out.conv."),
    (r"\.to_out\.0\.", ".out_proj."),
    (r"\.ff\.net\.0\.proj\.", ".ff.linear1."),
    (r"\.ff\.net\.2\.", ".ff.linear2."),
    (r"^conv_norm_out\.", "out.0."),
    (r"^conv_out\.", "out.2.conv."),
]


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def unet_state_dict_from_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict in MONAI ``DiffusionModelUNet`` names. SD 2.x's linear
    ``proj_in`` / ``proj_out`` become 1x1 convolutions (the same numbers, reshaped)."""
    converted = {}
    for key, value in state.items():
        name = _rename(key, _UNET_RULES)
        if (".proj_in.conv.weight" in name or ".proj_out.conv.weight" in name) and value.ndim == 2:
            value = value[:, :, None, None]
        converted[name] = value
    return converted


def unet_state_dict_to_diffusers(
    state: Mapping[str, torch.Tensor], use_linear_projection: bool = False
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`unet_state_dict_from_diffusers`: a MONAI ``DiffusionModelUNet`` state dict (converted
    from a Stable Diffusion UNet, possibly fine-tuned) in diffusers' names."""
    inverse = [
        (r"^conv_in\.conv\.", "conv_in."),
        (r"^time_embed\.0\.", "time_embedding.linear_1."),
        (r"^time_embed\.2\.", "time_embedding.linear_2."),
        (r"^middle_block\.resnet_1\.", "mid_block.resnets.0."),
        (r"^middle_block\.resnet_2\.", "mid_block.resnets.1."),
        (r"^middle_block\.attention\.", "mid_block.attentions.0."),
        (r"\.downsampler\.op\.conv\.", ".downsamplers.0.conv."),
        (r"\.upsampler\.postconv\.conv\.", ".upsamplers.0.conv."),
        (r"\.conv1\.conv\.", ".conv1."),
        (r"\.conv2\.conv\.", ".conv2."),
        (r"\.skip_connection\.conv\.", ".conv_shortcut."),
        (r"\.proj_in\.conv\.", ".proj_in."),
        (r"\.proj_out\.conv\.", ".proj_out."),
        (r"\.out_proj\.", ".to_out.0."),
        (r"\.ff\.linear1\.", ".ff.net.0.proj."),
        (r"\.ff\.linear2\.", ".ff.net.2."),
        (r"^out\.0\.", "conv_norm_out."),
        (r"^out\.2\.conv\.", "conv_out."),
    ]
    converted = {}
    for key, value in state.items():
        name = _rename(key, inverse)
        if use_linear_projection and (".proj_in.weight" in name or ".proj_out.weight" in name) and value.ndim == 4:
            value = value[:, :, 0, 0]
        converted[name] = value.contiguous()
    return converted


def _load_into(network: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Load a converted state dict, refusing (by name) any missing, unexpected or misshapen tensor."""
    own = network.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshapen = [f"{k}: {tuple(state[k].shape)} there, {tuple(own[k].shape)} here" for k in own if k in state
                 and tuple(state[k].shape) != tuple(own[k].shape)]  # fmt: skip
    if missing or unexpected or misshapen:
        raise ValueError(
            f"{where}: the weights do not fit the network built from its config: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"shapes differ {misshapen[:5]}."
        )
    network.load_state_dict(state)


def load_stable_diffusion_unet(folder: str | os.PathLike) -> DiffusionModelUNet:
    """MONAI ``DiffusionModelUNet`` with the weights of a diffusers UNet folder (``config.json`` and weights)."""
    folder = Path(folder)
    where = str(folder)
    config = _read_config(folder, where)
    unet = unet_from_config(config, where=str(folder / "config.json"))
    state = unet_state_dict_from_diffusers(_read_weights(folder, where))
    _load_into(unet, state, where)
    return unet.eval()


def save_unet_to_diffusers(
    unet: DiffusionModelUNet, folder: str | os.PathLike, config: Mapping[str, Any], overwrite: bool = False
) -> Path:
    """Write a MONAI UNet converted from Stable Diffusion (e.g. after a Latent Drifting or DreamBooth fine-tune) as a
    diffusers UNet folder: ``config`` (the source folder's ``unet/config.json``) and
    ``diffusion_pytorch_model.safetensors``, written into a temporary folder and moved into place.

    Raises:
        FileExistsError: when ``folder`` exists and ``overwrite`` is False.
        ValueError: when ``unet`` does not have the architecture ``config`` describes.
    """
    from safetensors.torch import save_file

    from monai_cfx.utils import atomic_directory

    reference = unet_from_config(config)
    state = {k: v.detach().cpu() for k, v in unet.state_dict().items()}
    _load_into(reference, state, "the UNet to save")  # the architecture matches the config
    converted = unet_state_dict_to_diffusers(state, bool(config.get("use_linear_projection", False)))
    with atomic_directory(folder, overwrite) as staging:
        save_file(converted, os.path.join(staging, WEIGHT_NAMES[0]))
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(dict(config), f, indent=2)
    return Path(folder)


# ---------------------------------------------------------------------------------------------------------- VAE


class StableDiffusionAutoencoderKL(AutoencoderKL):
    """Stable Diffusion's VAE as a MONAI ``AutoencoderKL``, built from MONAI's own ``Encoder`` and ``Decoder``.

    Three things differ from MONAI's ``AutoencoderKL``, and only those are changed: a SiLU before the encoder's and
    the decoder's output convolutions, a single ``quant_conv`` that gives the mean and the log-variance (2 x
    ``latent_channels``), and ``layers_per_block + 1`` residual blocks per decoder level. Everything else
    (``decode``, ``encode_stage_2_inputs`` / ``decode_stage_2_outputs`` that the inferers call, sampling) is MONAI's.
    SD's conventions belong to transforms and configs: 3-channel input in [-1, 1], and the scale factor
    (``scaling_factor`` in the VAE's config, 0.18215 for SD 1.x / 2.x).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        channels: tuple[int, ...] = (128, 256, 512, 512),
        latent_channels: int = 4,
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        use_flash_attention: bool = False,
    ) -> None:
        levels = len(channels)
        common = {"include_fc": True, "use_combined_linear": False, "use_flash_attention": use_flash_attention}
        super().__init__(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=out_channels,
            num_res_blocks=[layers_per_block] * levels,
            channels=channels,
            attention_levels=[False] * levels,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            with_encoder_nonlocal_attn=True,
            with_decoder_nonlocal_attn=True,
            **common,
        )
        self.encoder = Encoder(2, in_channels, channels, 2 * latent_channels, [layers_per_block] * levels,
                               norm_num_groups, norm_eps, [False] * levels, True, **common)  # fmt: skip
        self.decoder = Decoder(2, channels, latent_channels, out_channels, [layers_per_block + 1] * levels,
                               norm_num_groups, norm_eps, [False] * levels, True, **common)  # fmt: skip
        for part in (self.encoder, self.decoder):  # norm -> SiLU -> conv_out
            part.blocks.insert(len(part.blocks) - 1, nn.SiLU())
        del self.quant_conv_mu, self.quant_conv_log_sigma
        self.quant_conv = Convolution(2, 2 * latent_channels, 2 * latent_channels, strides=1, kernel_size=1, padding=0,
                                      conv_only=True)  # fmt: skip
        self.layers_per_block = layers_per_block

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moments = self.quant_conv(self.encoder(x))
        z_mu, z_log_var = moments.chunk(2, dim=1)
        z_log_var = torch.clamp(z_log_var, -30.0, 20.0)
        return z_mu, torch.exp(z_log_var / 2)


class GreyscaleAutoencoder(nn.Module):
    """Single-channel scans in [0, 1] (the library's model input) through an autoencoder trained on RGB images in
    [-1, 1] (Stable Diffusion's VAE): the grey channel is repeated to ``channels`` and scaled to [-1, 1] on the way
    in, and the decoded image is averaged over its channels and scaled back to [0, 1] on the way out. The latents are
    the wrapped autoencoder's own. It has the contract the library's inferers, checks and transforms use
    (``encode``, ``decode``, ``sampling``, ``encode_stage_2_inputs``, ``decode_stage_2_outputs``), so every bundle's
    single-channel preprocessing, difference maps and writers stay as they are.
    """

    def __init__(self, autoencoder: nn.Module, channels: int = 3) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.channels = channels
        self.latent_channels = getattr(autoencoder, "latent_channels", None)

    def _to_model(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] != 1:
            raise ValueError(f"GreyscaleAutoencoder takes single-channel images, got {images.shape[1]} channels.")
        return images.repeat(1, self.channels, *(1,) * (images.ndim - 2)) * 2.0 - 1.0

    @staticmethod
    def _to_grey(images: torch.Tensor) -> torch.Tensor:
        return (images.mean(dim=1, keepdim=True) + 1.0) / 2.0

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.autoencoder.encode(self._to_model(images))

    def sampling(self, z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.sampling(z_mu, z_sigma)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._to_grey(self.autoencoder.decode(latents))

    def encode_stage_2_inputs(self, images: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode_stage_2_inputs(self._to_model(images))

    def decode_stage_2_outputs(self, latents: torch.Tensor) -> torch.Tensor:
        return self._to_grey(self.autoencoder.decode_stage_2_outputs(latents))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        reconstruction, z_mu, z_sigma = self.autoencoder(self._to_model(images))
        return self._to_grey(reconstruction), z_mu, z_sigma


def _vae_key_map(levels: int, layers: int) -> dict[str, str]:
    """diffusers VAE module prefix -> :class:`StableDiffusionAutoencoderKL` prefix."""
    mapping: dict[str, str] = {}

    def resnet(source: str, target: str) -> None:
        for a, b in (("norm1", "norm1"), ("conv1", "conv1.conv"), ("norm2", "norm2"), ("conv2", "conv2.conv"),
                     ("conv_shortcut", "nin_shortcut.conv")):  # fmt: skip
            mapping[f"{source}.{a}"] = f"{target}.{b}"

    def attention(source: str, target: str) -> None:
        for names, b in ((("group_norm",), "norm"), (("to_q", "query"), "attn.to_q"), (("to_k", "key"), "attn.to_k"),
                         (("to_v", "value"), "attn.to_v"), (("to_out.0", "proj_attn"), "attn.out_proj")):  # fmt: skip
            for a in names:  # current names, and those of older diffusers checkpoints
                mapping[f"{source}.{a}"] = f"{target}.{b}"

    mapping["encoder.conv_in"] = "encoder.blocks.0.conv"
    k = 1
    for level in range(levels):
        for j in range(layers):
            resnet(f"encoder.down_blocks.{level}.resnets.{j}", f"encoder.blocks.{k}")
            k += 1
        if level < levels - 1:
            mapping[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = f"encoder.blocks.{k}.conv.conv"
            k += 1
    resnet("encoder.mid_block.resnets.0", f"encoder.blocks.{k}")
    attention("encoder.mid_block.attentions.0", f"encoder.blocks.{k + 1}")
    resnet("encoder.mid_block.resnets.1", f"encoder.blocks.{k + 2}")
    mapping["encoder.conv_norm_out"] = f"encoder.blocks.{k + 3}"
    mapping["encoder.conv_out"] = f"encoder.blocks.{k + 5}.conv"  # k + 4 is the SiLU
    mapping["decoder.conv_in"] = "decoder.blocks.0.conv"
    resnet("decoder.mid_block.resnets.0", "decoder.blocks.1")
    attention("decoder.mid_block.attentions.0", "decoder.blocks.2")
    resnet("decoder.mid_block.resnets.1", "decoder.blocks.3")
    k = 4
    for level in range(levels):
        for j in range(layers + 1):
            resnet(f"decoder.up_blocks.{level}.resnets.{j}", f"decoder.blocks.{k}")
            k += 1
        if level < levels - 1:
            mapping[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = f"decoder.blocks.{k}.postconv.conv"
            k += 1
    mapping["decoder.conv_norm_out"] = f"decoder.blocks.{k}"
    mapping["decoder.conv_out"] = f"decoder.blocks.{k + 2}.conv"
    mapping["quant_conv"] = "quant_conv.conv"
    mapping["post_quant_conv"] = "post_quant_conv.conv"
    return mapping


def load_stable_diffusion_autoencoder(folder: str | os.PathLike) -> tuple[StableDiffusionAutoencoderKL, float]:
    """:class:`StableDiffusionAutoencoderKL` with the weights of a diffusers ``AutoencoderKL`` folder, and its scale
    factor (``scaling_factor``, 0.18215 when the config has none).

    Raises:
        ValueError: naming the field for a VAE this class cannot express, or when the weights do not fit.
    """
    folder = Path(folder)
    where = str(folder / "config.json")
    config = _read_config(folder, str(folder))
    down = config.get("down_block_types", ["DownEncoderBlock2D"])
    up = config.get("up_block_types", ["UpDecoderBlock2D"])
    if set(down) != {"DownEncoderBlock2D"} or set(up) != {"UpDecoderBlock2D"} or len(down) != len(up):
        raise ValueError(f"{where}: block types {down} / {up} are not SD's (DownEncoderBlock2D / UpDecoderBlock2D).")
    for field, expected in (("act_fn", "silu"), ("mid_block_add_attention", True), ("use_quant_conv", True),
                            ("use_post_quant_conv", True), ("force_upcast", None)):  # fmt: skip
        value = config.get(field, expected)
        if expected is not None and value != expected:
            raise ValueError(f"{where}: `{field}` is {value!r}; only {expected!r} is supported.")
    channels = tuple(int(c) for c in config["block_out_channels"])
    if len(channels) != len(down):
        raise ValueError(f"{where}: {len(channels)} `block_out_channels` for {len(down)} blocks.")
    autoencoder = StableDiffusionAutoencoderKL(
        in_channels=int(config.get("in_channels", 3)),
        out_channels=int(config.get("out_channels", 3)),
        channels=channels,
        latent_channels=int(config.get("latent_channels", 4)),
        layers_per_block=int(config.get("layers_per_block", 2)),
        norm_num_groups=int(config.get("norm_num_groups", 32)),
    )
    mapping = _vae_key_map(len(channels), autoencoder.layers_per_block)
    state = {}
    for key, value in _read_weights(folder, str(folder)).items():
        prefix, _, leaf = key.rpartition(".")
        target = mapping.get(prefix)
        if target is None:
            raise ValueError(f"{str(folder)!r}: the VAE weight {key!r} has no place in SD's VAE layout.")
        if ".attn." in target and value.ndim == 4:  # older checkpoints store attention projections as 1x1 convs
            value = value[:, :, 0, 0]
        state[f"{target}.{leaf}"] = value
    _load_into(autoencoder, state, str(folder))
    scale_factor = config.get("scaling_factor")
    return autoencoder.eval(), float(SD_SCALE_FACTOR if scale_factor is None else scale_factor)


# ---------------------------------------------------------------------------------------------------- scheduler


def load_stable_diffusion_scheduler(folder: str | os.PathLike) -> tuple[DDIMScheduler, str]:
    """MONAI ``DDIMScheduler`` with a diffusers scheduler folder's settings (``scheduler_config.json``: betas,
    ``steps_offset``, ``set_alpha_to_one``, ``clip_sample``, prediction type), and its ``timestep_spacing`` (SD's
    ``"leading"`` when the config has none), which the library's inferers take as ``timestep_spacing``.

    Raises:
        ValueError: naming the file and field, for a scheduler whose timesteps a DDIM scheduler does not share
            (continuous-time and flow-matching schedulers: DDIM inversion needs DDIM's discrete schedule), trained
            betas or an unknown beta schedule.
    """
    path = Path(folder) / "scheduler_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no scheduler_config.json in {str(folder)!r}.")
    with open(path) as f:
        config = json.load(f)
    name = config.get("_class_name")
    if name not in DISCRETE_SCHEDULERS:
        raise ValueError(
            f"{str(path)}: `_class_name` is {name!r}; DDIM sampling and inversion need one of "
            f"{list(DISCRETE_SCHEDULERS)} (the same discrete beta schedule)."
        )
    if config.get("trained_betas") is not None:
        raise ValueError(f"{str(path)}: `trained_betas` are not supported.")
    schedule = config.get("beta_schedule", "linear")
    if schedule not in BETA_SCHEDULES:
        raise ValueError(f"{str(path)}: `beta_schedule` is {schedule!r}; supported: {list(BETA_SCHEDULES)}.")
    prediction_type = config.get("prediction_type", "epsilon")
    scheduler = DDIMScheduler(
        num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
        schedule=BETA_SCHEDULES[schedule],
        beta_start=float(config.get("beta_start", 0.0001)),
        beta_end=float(config.get("beta_end", 0.02)),
        clip_sample=bool(config.get("clip_sample", False)),
        set_alpha_to_one=bool(config.get("set_alpha_to_one", False)),
        steps_offset=int(config.get("steps_offset", 0)),
        prediction_type=prediction_type,
    )
    return scheduler, str(config.get("timestep_spacing", "leading"))


# ------------------------------------------------------------------------------------------------------ pipeline


@dataclass
class StableDiffusion:
    """A Stable Diffusion folder's components as MONAI networks (:func:`load_stable_diffusion`)."""

    unet: DiffusionModelUNet
    autoencoder: StableDiffusionAutoencoderKL
    text_encoder: Any
    scheduler: DDIMScheduler
    scale_factor: float
    timestep_spacing: str
    image_size: int
    unet_config: dict[str, Any]


def load_stable_diffusion(path: str | os.PathLike, text_encoder: bool = True) -> StableDiffusion:
    """Every component of a local diffusers Stable Diffusion folder (``model_index.json``, ``unet/``, ``vae/``,
    ``text_encoder/``, ``tokenizer/``, ``scheduler/``) as MONAI networks and a MONAI scheduler.

    Args:
        path: the pipeline folder (never a hub id: nothing is downloaded).
        text_encoder: also load ``text_encoder/`` + ``tokenizer/`` as :class:`~monai_cfx.networks.nets.TextEncoder`.

    Raises:
        FileNotFoundError: for a folder that is not a diffusers pipeline, or a missing component (named).
        ValueError: for a component MONAI cannot express or weights that do not fit (named), or a VAE whose latent
            channels differ from the UNet's input channels.
    """
    if path is None:
        raise ValueError("no Stable Diffusion folder was given (from a bundle config: --sd_path <folder>).")
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a diffusers pipeline folder: it has no model_index.json.")
    components = ("unet", "vae", "scheduler") + (("text_encoder", "tokenizer") if text_encoder else ())
    missing = [name for name in components if not (path / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"the Stable Diffusion folder {str(path)!r} lacks the component folders {missing}.")
    unet = load_stable_diffusion_unet(path / "unet")
    autoencoder, scale_factor = load_stable_diffusion_autoencoder(path / "vae")
    if autoencoder.latent_channels != unet.in_channels:
        raise ValueError(
            f"{str(path / 'vae')!r} has {autoencoder.latent_channels} latent channels but the UNet in "
            f"{str(path / 'unet')!r} takes {unet.in_channels}."
        )
    scheduler, spacing = load_stable_diffusion_scheduler(path / "scheduler")
    encoder = None
    if text_encoder:
        from .text_encoder import TextEncoder

        encoder = TextEncoder(path)
    unet_config = _read_config(path / "unet", str(path / "unet"))
    vae_config = _read_config(path / "vae", str(path / "vae"))
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    image_size = int(unet_config.get("sample_size", 64)) * factor
    return StableDiffusion(unet, autoencoder, encoder, scheduler, scale_factor, spacing, image_size, unet_config)
