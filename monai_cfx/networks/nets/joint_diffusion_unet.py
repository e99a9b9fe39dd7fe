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
"""A diffusion UNet that also classifies (Mediffusion, Kaleta et al., arXiv 2411.09434).

One network both denoises and classifies: the encoder (input blocks) and middle block of MONAI's
``DiffusionModelUNet`` are shared, their globally average-pooled activations are concatenated and read by a small
MLP head. The denoising path is MONAI's own, unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from monai.utils import ensure_tuple_rep
from torch import nn

__all__ = ["JointDiffusionUNet"]

HEAD_PREFIX = "head."
HEAD_NORM_PREFIX = "head_norm."
CLASSIFIER_NORMS = (None, "batch")
CLASSIFIER_POOLINGS = ("mean", "mean_max")


class JointDiffusionUNet(DiffusionModelUNet):
    """MONAI's ``DiffusionModelUNet`` with a classification head on its pooled encoder features (Mediffusion,
    Kaleta et al. 2024, arXiv 2411.09434; reference code ``pskiers/Joint-Diffusion-in-Latent-Space``).

    * ``forward`` is MONAI's, untouched: every MONAI inferer and the library's sampling loop run this network as a
      plain denoiser.
    * :meth:`features` runs only the time (and class) embedding, ``conv_in``, the down blocks and the middle block,
      exactly as ``DiffusionModelUNet.forward`` does, and returns every input-block output (``conv_in``'s and each
      down block's residuals, the tensors the skip connections carry) and the middle block's output, each averaged
      over space (2D or 3D), concatenated: ``(B, num_features)`` with
      ``num_features = c_0 + sum_i c_i * (r_i + [i is not the last level]) + c_last`` for channels ``c`` and
      residual blocks ``r`` (with ``classifier_pooling="mean_max"`` the spatial maxima of the same maps follow:
      twice as many).
    * :attr:`head` is ``Linear(F, H) - LeakyReLU(0.2) - Dropout(p) - Linear(H, num_classes)``. It reads the
      features through :attr:`head_norm`: the identity (the reference), or with ``classifier_norm="batch"`` a
      ``BatchNorm1d`` that standardises each feature. The pooled features' scales differ by two orders of magnitude
      (block to block and channel to channel), and a head that reads them raw hardly uses the small ones.
    * :meth:`classify` gives logits; the classifier is trained and used on the *clean* latent at ``t = 0``, so
      ``timesteps=None`` means ``t = 0`` for every row (the reference's guidance evaluated it on x̂₀ at timestep
      ``t``, a timestep the head never saw in training).

    The defaults of ``classifier_hidden`` (2048) and ``classifier_dropout`` (0.3) are those of the reference's
    chest X-ray multi-label configuration
    (``configs/latent_diffusion/supervised/non_noisy_classifier/joint_diffusion_pooling/chest_xray_multilabel.yaml``;
    the head is built in ``models/latent_diffusion/joint_latent_diffusion_noisy_classifier.py``). Two differences
    from the reference: the reference also applies dropout to the head's input, and it pools each feature map to a
    fixed ``pool_size`` grid instead of globally, which ties the head to one latent size; global pooling here keeps
    the head valid for any input size, 2D or 3D. ``classifier_norm`` is ours (off by default, as in the reference).

    Args:
        spatial_dims, in_channels, out_channels, num_res_blocks, channels, attention_levels, norm_num_groups,
        norm_eps, resblock_updown, num_head_channels, with_conditioning, transformer_num_layers,
        cross_attention_dim, num_class_embeds, upcast_attention, dropout_cattn, include_fc, use_combined_linear,
        use_flash_attention: as MONAI's ``DiffusionModelUNet``.
        num_classes: number of classifier outputs (findings of a multi-label problem), >= 1.
        classifier_hidden: hidden width ``H`` of the head, >= 1.
        classifier_dropout: dropout probability of the head, in [0, 1).
        classifier_norm: normalisation of the head's input: ``None`` (the reference's raw features) or ``"batch"``
            (``BatchNorm1d`` over the features: batch statistics in training, running ones in ``eval()``).
        classifier_pooling: pooling of each captured feature map: ``"mean"`` (global average, as the reference) or
            ``"mean_max"`` (the averages, then the spatial maxima of the same maps: ``2 * num_features``; a finding
            of a few latent voxels moves a maximum more than an average).

    Raises:
        ValueError: for a ``num_classes`` or ``classifier_hidden`` that is not a positive int, a
            ``classifier_dropout`` outside [0, 1), a ``classifier_norm`` not in (None, "batch") or a
            ``classifier_pooling`` not in ("mean", "mean_max"); MONAI's own checks
            for the UNet arguments.

    Example::

        unet = JointDiffusionUNet(spatial_dims=2, in_channels=4, out_channels=4, channels=(64, 128, 256),
                                  attention_levels=(False, True, True), num_classes=14)
        unet.load_unet_state_dict(torch.load("diffusion_unet.pt", weights_only=True))  # a plain UNet checkpoint
        noise_prediction = unet(noisy_latent, timesteps)              # MONAI's forward
        logits = unet.classify(clean_latent)                          # (B, 14), at t = 0
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        num_res_blocks: Sequence[int] | int = (2, 2, 2, 2),
        channels: Sequence[int] = (32, 64, 64, 64),
        attention_levels: Sequence[bool] = (False, False, True, True),
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        resblock_updown: bool = False,
        num_head_channels: int | Sequence[int] = 8,
        with_conditioning: bool = False,
        transformer_num_layers: int = 1,
        cross_attention_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        dropout_cattn: float = 0.0,
        include_fc: bool = True,
        use_combined_linear: bool = False,
        use_flash_attention: bool = False,
        *,
        num_classes: int,
        classifier_hidden: int = 2048,
        classifier_dropout: float = 0.3,
        classifier_norm: str | None = None,
        classifier_pooling: str = "mean",
    ) -> None:
        # check the head's arguments before building the (possibly large) UNet
        for name, value in (("num_classes", num_classes), ("classifier_hidden", classifier_hidden)):
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
        valid_dropout = isinstance(classifier_dropout, Real) and not isinstance(classifier_dropout, bool)
        if not valid_dropout or not 0.0 <= classifier_dropout < 1.0:
            raise ValueError(f"`classifier_dropout` must be a probability in [0, 1), got {classifier_dropout!r}.")
        if classifier_norm not in CLASSIFIER_NORMS:
            raise ValueError(f"`classifier_norm` must be one of {CLASSIFIER_NORMS}, got {classifier_norm!r}.")
        if classifier_pooling not in CLASSIFIER_POOLINGS:
            raise ValueError(f"`classifier_pooling` must be one of {CLASSIFIER_POOLINGS}, got {classifier_pooling!r}.")
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            num_res_blocks=num_res_blocks,
            channels=channels,
            attention_levels=attention_levels,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            resblock_updown=resblock_updown,
            num_head_channels=num_head_channels,
            with_conditioning=with_conditioning,
            transformer_num_layers=transformer_num_layers,
            cross_attention_dim=cross_attention_dim,
            num_class_embeds=num_class_embeds,
            upcast_attention=upcast_attention,
            dropout_cattn=dropout_cattn,
            include_fc=include_fc,
            use_combined_linear=use_combined_linear,
            use_flash_attention=use_flash_attention,
        )
        self.num_classes = int(num_classes)
        self.classifier_hidden = int(classifier_hidden)
        self.classifier_dropout = float(classifier_dropout)
        self.classifier_norm = classifier_norm
        self.classifier_pooling = classifier_pooling
        pooled_per_channel = 2 if classifier_pooling == "mean_max" else 1
        self.num_features = pooled_per_channel * self.feature_count(channels, num_res_blocks)
        self.head_norm = nn.BatchNorm1d(self.num_features) if classifier_norm == "batch" else nn.Identity()
        self.head = nn.Sequential(
            nn.Linear(self.num_features, self.classifier_hidden),
            nn.LeakyReLU(0.2),
            nn.Dropout(self.classifier_dropout),
            nn.Linear(self.classifier_hidden, self.num_classes),
        )

    @staticmethod
    def feature_count(channels: Sequence[int], num_res_blocks: Sequence[int] | int) -> int:
        """Length of :meth:`features` for a UNet of these ``channels`` and ``num_res_blocks``: ``conv_in``'s output,
        every residual of every down block (one per res block, plus the downsampler's on all but the last level)
        and the middle block's output."""
        num_res_blocks = ensure_tuple_rep(num_res_blocks, len(channels))
        last = len(channels) - 1
        down = sum(c * (r + (i != last)) for i, (c, r) in enumerate(zip(channels, num_res_blocks)))
        return int(channels[0] + down + channels[-1])

    def _embedding(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """Time (and class) embedding, as steps 1 and 2 of ``DiffusionModelUNet.forward``."""
        t_emb = get_timestep_embedding(timesteps, self.block_out_channels[0]).to(dtype=x.dtype)
        emb = self.time_embed(t_emb)
        if self.num_class_embeds is not None:
            if class_labels is None:
                raise ValueError("class_labels should be provided when num_class_embeds > 0")
            emb = emb + self.class_embedding(class_labels).to(dtype=x.dtype)
        return emb

    def features(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pooled encoder and middle-block features ``(B, num_features)``.

        Args:
            x: input ``(B, C, *spatial)``, 2D or 3D.
            timesteps: timesteps ``(B,)``.
            context: cross-attention conditioning ``(B, L, D)``, for a network ``with_conditioning``.
            class_labels: class labels ``(B,)``, for a network with ``num_class_embeds``.
        """
        emb = self._embedding(x, timesteps, class_labels)
        h = self.conv_in(x)
        if context is not None and self.with_conditioning is False:
            raise ValueError("model should have with_conditioning = True if context is provided")
        captured: list[torch.Tensor] = [h]
        for downsample_block in self.down_blocks:
            h, res_samples = downsample_block(hidden_states=h, temb=emb, context=context)
            captured.extend(res_samples)
        captured.append(self.middle_block(hidden_states=h, temb=emb, context=context))
        means = [c.mean(dim=tuple(range(2, c.ndim))) for c in captured]
        if self.classifier_pooling == "mean":
            return torch.cat(means, dim=1)
        maxima = [c.flatten(2).amax(dim=2) for c in captured]
        return torch.cat(means + maxima, dim=1)

    def classify(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Classification logits ``(B, num_classes)`` of ``x``; ``timesteps=None`` is ``t = 0`` for every row (the
        clean latent, where the head is trained and used). Other arguments as :meth:`features`."""
        if timesteps is None:
            timesteps = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.classify_features(self.features(x, timesteps, context, class_labels))

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of pooled :meth:`features` ``(B, num_features)``: the head on ``head_norm``.

        Raises:
            ValueError: for a batch of one row in training with ``classifier_norm="batch"`` (no batch statistics).
        """
        if self.training and self.classifier_norm == "batch" and features.shape[0] < 2:
            raise ValueError(
                f"classifier_norm='batch' standardises each feature by the batch's statistics in training, which "
                f"needs at least 2 rows; got a batch of {features.shape[0]}. Use a batch size >= 2, or call eval()."
            )
        return self.head(self.head_norm(features))

    @staticmethod
    def _is_head_key(key: str) -> bool:
        return key.startswith((HEAD_PREFIX, HEAD_NORM_PREFIX))

    def _check_head(self, state_dict: Mapping[str, Any]) -> None:
        """Refuse a checkpoint whose head does not fit this network, with a message naming ``num_classes`` and
        ``classifier_norm``."""

        def head_shapes(states: Mapping[str, Any]) -> dict[str, tuple]:
            return {key: tuple(value.shape) for key, value in states.items() if self._is_head_key(key)}

        expected, checkpoint_head = head_shapes(self.state_dict()), head_shapes(state_dict)
        found = {key: shape for key, shape in checkpoint_head.items() if key in expected}
        foreign = sorted(set(checkpoint_head) - set(expected))
        has_norm = any(key.startswith(HEAD_NORM_PREFIX) for key in checkpoint_head)
        lacks_norm = bool(checkpoint_head) and not has_norm and self.classifier_norm is not None
        if foreign or lacks_norm or found != {key: expected[key] for key in found}:
            raise ValueError(
                f"The checkpoint's classification head does not fit this network (num_classes={self.num_classes}, "
                f"num_features={self.num_features}, classifier_hidden={self.classifier_hidden}, "
                f"classifier_norm={self.classifier_norm!r}, classifier_pooling={self.classifier_pooling!r}): the "
                f"checkpoint has head keys and shapes {checkpoint_head}, this network expects {expected}. Build the "
                "network with the checkpoint's `num_classes` / `classifier_hidden` / `classifier_norm` (a "
                "`head_norm.*` key means 'batch') / `classifier_pooling` ('mean_max' reads twice the features), or "
                "drop the `head.*` and `head_norm.*` keys to load the UNet only."
            )

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, refusing first a head of another shape with a clear message."""
        self._check_head(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def load_unet_state_dict(self, state_dict: Mapping[str, Any]) -> list[str]:
        """Load a plain ``DiffusionModelUNet`` checkpoint (or a ``JointDiffusionUNet`` one): every UNet key must be
        there and no other key; ``head.*`` (and ``head_norm.*``) keys are loaded when present and of this network's
        shape.

        Returns:
            the head keys the checkpoint lacked (left at their initialisation; train the head).

        Raises:
            ValueError: for missing UNet keys, unexpected keys, or a head of another shape (naming ``num_classes``
                and the checkpoint's head shapes).
        """
        own = set(self.state_dict())
        missing = sorted(key for key in own - set(state_dict) if not self._is_head_key(key))
        unexpected = sorted(key for key in set(state_dict) - own if not self._is_head_key(key))
        if missing or unexpected:
            raise ValueError(
                "`state_dict` must hold exactly the keys of the DiffusionModelUNet this network extends (`head.*` and "
                f"`head_norm.*` optional); missing UNet keys {missing[:10]}{' ...' if len(missing) > 10 else ''} "
                f"({len(missing)}), unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} "
                f"({len(unexpected)})."
            )
        self.load_state_dict(state_dict, strict=False)
        return sorted(key for key in own - set(state_dict))
