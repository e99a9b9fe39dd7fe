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
"""Recording the cross-attention of a MONAI ``DiffusionModelUNet`` (phrase grounding, Vilouras et al. 2024).

Every ``CrossAttentionBlock`` named ``...attn2`` computes ``softmax(Q K^T)`` of image positions against the text
tokens and passes it through its ``drop_weights`` dropout; a forward hook there receives the probabilities
``(B, heads, N_spatial, L)``. MONAI skips that path under flash attention, so it is switched off on the captured
blocks only, for as long as the recorder is open.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks.crossattention import CrossAttentionBlock

__all__ = ["CrossAttentionRecorder", "cross_attention_layers"]

_BLOCK_NAME = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^(middle_block)\.")


def cross_attention_layers(unet: torch.nn.Module) -> dict[str, tuple[CrossAttentionBlock, int]]:
    """The ``attn2`` cross-attention blocks of a MONAI ``DiffusionModelUNet`` with their down-sampling level
    (0 at the latent's resolution; the layer's size is the latent's divided by ``2 ** level``)."""
    num_levels = len(getattr(unet, "block_out_channels", ()))
    layers: dict[str, tuple[CrossAttentionBlock, int]] = {}
    for name, module in unet.named_modules():
        if not (isinstance(module, CrossAttentionBlock) and name.endswith("attn2")):
            continue
        match = _BLOCK_NAME.match(name)
        if match is None or num_levels == 0:
            raise ValueError(f"cannot place cross-attention layer {name!r}: not a MONAI DiffusionModelUNet layout.")
        if match.group(3):
            level = num_levels - 1
        elif match.group(1) == "down_blocks":
            level = int(match.group(2))
        else:
            level = num_levels - 1 - int(match.group(2))
        layers[name] = (module, level)
    return layers


class CrossAttentionRecorder:
    """Context manager that accumulates the cross-attention maps of selected ``attn2`` layers of a UNet.

    While :attr:`recording` is True, every forward pass adds, for every selected layer, the head-averaged
    attention of the selected tokens, min-max normalised per map (optional) and resized to a common size, to a
    running sum: memory does not grow with steps or layers. :meth:`maps` returns the mean over everything
    added. Flash attention is switched off on the selected blocks on entry and restored on exit; the hooks are
    removed on exit, also after an error. 2D and 3D.

    Args:
        unet: a MONAI ``DiffusionModelUNet`` with cross-attention (``with_conditioning=True``).
        layers: ``"middle"`` (the layers at the deepest attention level: the paper's 16x16 layers of a 64x64
            latent), ``"all"``, an int level (resolution = latent size / 2**level), a sequence of levels
            (e.g. ``[0, 1]``), or a sequence of name patterns (``fnmatch``, e.g. ``"up_blocks.1.*"``).
        token_indices: token positions to keep (e.g. a phrase's, from ``TextEncoder.phrase_token_indices``);
            default all tokens. A sequence of sequences groups them: each group's tokens are averaged into one map
            before the normalisation (a phrase of several tokens is one map, as in the reference code).
        batch_indices: batch rows to record (e.g. the conditional half of a ``[uncond, cond]`` batch); default all.
        normalize_each: min-max normalise each layer/step/token map before averaging, as the reference code.
        size: the common spatial size; default the latent size of the first recorded call.

    Example::

        with CrossAttentionRecorder(unet, "middle", token_indices=[5, 6, 7]) as recorder:
            unet(latent, timesteps, context=context)
        heatmap = recorder.maps()  # (B, 3, H_latent, W_latent)
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        layers: str | int | Sequence[int] | Sequence[str] = "middle",
        token_indices: Sequence[int] | Sequence[Sequence[int]] | None = None,
        batch_indices: Sequence[int] | None = None,
        normalize_each: bool = True,
        size: Sequence[int] | None = None,
    ) -> None:
        available = cross_attention_layers(unet)
        if not available:
            raise ValueError(
                "`unet` has no cross-attention layers (attn2): build it with with_conditioning=True and "
                "cross_attention_dim, or ground with a text-conditioned model."
            )
        self.unet = unet
        self.layers = self._select(available, layers)
        self.token_groups: list[list[int]] | None = None
        self.token_indices: list[int] | None = None
        if token_indices is not None and any(isinstance(t, Sequence) for t in token_indices):
            self.token_groups = [[int(i) for i in group] for group in token_indices]  # type: ignore[union-attr]
            if not all(self.token_groups):
                raise ValueError(f"every group of `token_indices` needs a token, got {token_indices!r}.")
        elif token_indices is not None:
            self.token_indices = [int(i) for i in token_indices]  # type: ignore[arg-type]
        self.batch_indices = None if batch_indices is None else [int(i) for i in batch_indices]
        self.normalize_each = normalize_each
        self.size = None if size is None else tuple(int(s) for s in size)
        self.recording = True
        self._latent_size: tuple[int, ...] | None = None
        self._handles: list[Any] = []
        self._flash: dict[str, bool] = {}
        self._weights: tuple[Any, torch.Tensor] | None = None
        self.reset()

    @staticmethod
    def _select(
        available: dict[str, tuple[CrossAttentionBlock, int]], layers: str | int | Sequence[int] | Sequence[str]
    ) -> dict[str, tuple[CrossAttentionBlock, int]]:
        if layers == "all":
            return dict(available)
        if layers == "middle":
            deepest = max(level for _, level in available.values())
            return {n: v for n, v in available.items() if v[1] == deepest}
        single_level = isinstance(layers, int) and not isinstance(layers, bool)
        if not single_level and (isinstance(layers, str) or not isinstance(layers, Sequence)):
            raise ValueError(
                f"`layers` must be 'middle', 'all', a level (int), a list of levels or a list of name patterns, "
                f"got {layers!r}."
            )
        wanted = [layers] if single_level else list(layers)  # type: ignore[arg-type]
        is_level = [isinstance(level, int) and not isinstance(level, bool) for level in wanted]
        if any(is_level) and not all(is_level):
            raise ValueError(f"`layers` must be all levels (ints) or all name patterns, got {wanted!r}.")
        if wanted and all(is_level):
            levels = sorted({level for _, level in available.values()})
            missing = sorted(set(wanted) - set(levels))
            if missing:
                what = f"level {layers} has" if single_level else f"levels {missing} have"
                raise ValueError(f"`layers` {what} no cross-attention; levels with it: {levels}.")
            return {n: v for n, v in available.items() if v[1] in wanted}
        chosen = {n: v for n, v in available.items() if any(fnmatch.fnmatch(n, str(p)) for p in wanted)}
        if not chosen:
            raise ValueError(f"`layers` {wanted} match no cross-attention layer; layers: {sorted(available)}.")
        return chosen

    def reset(self) -> None:
        """Forget what was recorded (the hooks stay)."""
        self._sum: torch.Tensor | None = None
        self.count = 0

    def __enter__(self) -> CrossAttentionRecorder:
        try:
            self._handles.append(self.unet.register_forward_pre_hook(self._remember_size))
            for name, (block, level) in self.layers.items():
                self._flash[name] = block.use_flash_attention
                block.use_flash_attention = False  # only the explicit softmax path reaches drop_weights
                self._handles.append(block.drop_weights.register_forward_hook(self._hook(level)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for name, flash in self._flash.items():
            self.layers[name][0].use_flash_attention = flash
        self._flash = {}

    @property
    def num_hooks(self) -> int:
        """Hooks currently registered by this recorder (0 after exit)."""
        return len(self._handles)

    def _remember_size(self, _module: torch.nn.Module, args: tuple) -> None:
        sample = args[0] if args else None
        if isinstance(sample, torch.Tensor):
            self._latent_size = tuple(sample.shape[2:])

    def _hook(self, level: int):
        def hook(_module: torch.nn.Module, _inputs: tuple, probabilities: torch.Tensor) -> None:
            if self.recording:
                self._add(probabilities.detach(), level)

        return hook

    def _add(self, probabilities: torch.Tensor, level: int) -> None:
        if self._latent_size is None:
            raise RuntimeError("the recorder saw attention before the UNet's input: use it around unet(...) calls.")
        # batch rows and tokens first, then the mean over heads: the same maps, on fewer numbers
        if self.batch_indices is not None:
            probabilities = probabilities[self._batch_selection(probabilities.shape[0])]
        if self.token_indices is not None:
            probabilities = probabilities[..., self.token_indices].float()
        elif self.token_groups is not None:  # one matrix product averages every group's tokens
            probabilities = probabilities.float() @ self._group_weights(probabilities)
        else:
            probabilities = probabilities.float()
        maps = probabilities.mean(dim=1)  # (B, N, tokens or groups)
        layer_size = [math.ceil(s / 2**level) for s in self._latent_size]
        if math.prod(layer_size) != maps.shape[1]:
            raise RuntimeError(f"attention of {maps.shape[1]} positions does not fit a layer of size {layer_size}.")
        maps = maps.transpose(1, 2).reshape(maps.shape[0], maps.shape[2], *layer_size)
        if self.normalize_each:
            flat = maps.flatten(2)
            low, high = flat.amin(2, keepdim=True), flat.amax(2, keepdim=True)
            maps = ((flat - low) / (high - low).clamp_min(1e-12)).view_as(maps)
        size = self.size or self._latent_size
        if tuple(maps.shape[2:]) != tuple(size):
            mode = "bilinear" if len(size) == 2 else "trilinear"
            maps = F.interpolate(maps, size=size, mode=mode, align_corners=False)
        self._sum = maps if self._sum is None else self._sum + maps
        self.count += 1

    def _batch_selection(self, num_rows: int) -> slice | list[int]:
        rows = self.batch_indices or []
        if rows and 0 <= rows[0] and rows[-1] < num_rows and rows == list(range(rows[0], rows[-1] + 1)):
            return slice(rows[0], rows[-1] + 1)  # a view, not a copy
        return rows  # anything else indexes as given (out-of-range rows raise IndexError)

    def _group_weights(self, probabilities: torch.Tensor) -> torch.Tensor:
        """``(L, G)`` matrix whose column g averages the tokens of group g (a repeated token counts each time)."""
        groups = tuple(tuple(group) for group in self.token_groups or [])
        key = (probabilities.shape[-1], probabilities.device, groups)
        if self._weights is None or self._weights[0] != key:
            weights = torch.zeros(probabilities.shape[-1], len(groups), device=probabilities.device)
            for column, group in enumerate(groups):
                for token in group:
                    weights[token, column] += 1.0 / len(group)
            self._weights = (key, weights)
        return self._weights[1]

    def maps(self) -> torch.Tensor:
        """The mean of the recorded maps ``(B, tokens or groups, *size)``."""
        if self._sum is None or self.count == 0:
            raise RuntimeError("nothing was recorded: run the UNet inside the recorder with `recording` True.")
        return self._sum / self.count
