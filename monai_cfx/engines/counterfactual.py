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
"""Batch preparation that lets MONAI's ``SupervisedEvaluator`` run a :class:`CounterfactualInferer`."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.engines import PrepareBatch
from monai.utils import CommonKeys

from monai_cfx.data.collate import own_grid_value
from monai_cfx.inferers.sampling import SamplingHook
from monai_cfx.transforms.scan import fit_to_size

from .checks import check_reconstruction

__all__ = ["CounterfactualPrepareBatch"]


class CounterfactualPrepareBatch(PrepareBatch):
    """Turn a batch of ``{"image", "prompt"?, "mask"?}`` items into the arguments of a ``CounterfactualInferer``.

    ``SupervisedEvaluator(network=diffusion_unet, inferer=CounterfactualInferer(...), prepare_batch=this)`` then
    calls ``inferer(images, diffusion_unet, autoencoder, conditioning=..., uncond_conditioning=..., seed=...)``
    for every batch. The target prompt is the item's ``prompt_key`` if present, else ``prompt``; guidance runs
    against ``uncond_prompt`` (``""``: the empty prompt, or a source / negative prompt). Each image gets its own
    noise seed derived from its file name (see :meth:`seeds`), so a counterfactual does not depend on the batch,
    the rank or earlier runs.

    Args:
        autoencoder: the latent diffusion model's autoencoder.
        text_encoder: a :class:`~monai_cfx.networks.nets.TextEncoder` (``text_encoder(prompts)`` gives the
            context, ``null_context(n)`` the empty prompt's).
        prompt: default target prompt, e.g. ``"Normal chest radiograph."``.
        uncond_prompt: prompt of the unconditional branch; ``""`` uses the empty prompt.
        prompt_key: batch key of per-item prompts.
        target_key: batch key returned as the evaluator's label, if present (the multi-hot finding labels).
        region_mask_key: batch key of a region mask restricting the edit (disease induction), if any.
        seed: seed of the first image's noise.
        max_reconstruction_mse: refuse images whose autoencoder round trip has a larger mean squared error (the
            out-of-distribution check, :func:`~monai_cfx.engines.check_reconstruction`); ``None`` skips it.
        hooks: step hooks passed to every call of the inferer's denoising loop (e.g.
            :class:`~monai_cfx.inferers.ClipOriginalSampleHook`).
    """

    def __init__(
        self,
        autoencoder: torch.nn.Module,
        text_encoder: Any,
        prompt: str,
        uncond_prompt: str = "",
        prompt_key: str = "prompt",
        target_key: str | None = "label",
        region_mask_key: str | None = None,
        seed: int = 0,
        image_key: str = CommonKeys.IMAGE,
        max_reconstruction_mse: float | None = None,
        hooks: Sequence[SamplingHook] = (),
    ) -> None:
        self.max_reconstruction_mse = max_reconstruction_mse
        self.hooks = list(hooks)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"`prompt` must be a non-empty string, got {prompt!r}.")
        self.autoencoder = autoencoder.eval()
        self.text_encoder = text_encoder
        self.prompt = prompt
        self.uncond_prompt = uncond_prompt
        self.prompt_key = prompt_key
        self.target_key = target_key
        self.region_mask_key = region_mask_key
        self.seed = seed
        self.image_key = image_key
        self.num_unnamed = 0

    def seeds(self, images: torch.Tensor) -> list[int]:
        """One noise seed per image from its file name (``seed`` + CRC-32 of ``filename_or_obj``), so an image
        gets the same noise on every rank, in every run and whatever its batch; images without a file name
        are numbered in the order seen."""
        names = images.meta.get("filename_or_obj") if isinstance(images, MetaTensor) else None
        if isinstance(names, str):
            names = [names]
        seeds = []
        for index in range(images.shape[0]):
            name = names[index] if names is not None and index < len(names) and names[index] else None
            if name is None:
                seeds.append(self.seed + self.num_unnamed)
                self.num_unnamed += 1
            else:
                seeds.append((self.seed + zlib.crc32(str(name).encode())) % 2**31)
        return seeds

    def prompts(self, batchdata: Mapping[str, Any], batch_size: int) -> list[str]:
        """Per-item prompts, falling back to the default where an item has none (or an empty one)."""
        given = batchdata.get(self.prompt_key)
        if given is None:
            return [self.prompt] * batch_size
        if isinstance(given, str) or len(given) != batch_size:
            raise ValueError(
                f"batch key {self.prompt_key!r} must hold one prompt per image ({batch_size}), got {given!r}."
            )
        return [p if isinstance(p, str) and p.strip() else self.prompt for p in given]

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Sequence, dict]:
        if self.image_key not in batchdata:
            raise ValueError(f"the batch has no {str(self.image_key)!r} key; keys: {sorted(batchdata)}.")
        images = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        check_reconstruction(self.autoencoder, images, self.max_reconstruction_mse)
        batch_size = images.shape[0]
        with torch.no_grad():
            conditioning = self.text_encoder(self.prompts(batchdata, batch_size)).to(device)
            if self.uncond_prompt:
                uncond = self.text_encoder([self.uncond_prompt] * batch_size).to(device)
            else:
                uncond = self.text_encoder.null_context(batch_size).to(device)
        target = batchdata.get(self.target_key) if self.target_key is not None else None
        if isinstance(target, torch.Tensor):
            target = target.to(device=device, non_blocking=non_blocking, **kwargs)
        region_mask = None
        if self.region_mask_key is not None:
            if self.region_mask_key not in batchdata:
                raise ValueError(
                    f"`region_mask_key` {self.region_mask_key!r} is not in the batch: {sorted(batchdata)}."
                )
            masks = own_grid_value(batchdata[self.region_mask_key])
            # a region mask on the scan's own grid is brought to the model's input as the image was
            masks = [masks[i : i + 1] for i in range(masks.shape[0])] if isinstance(masks, torch.Tensor) else masks
            side = images.shape[-1]
            region_mask = torch.cat(
                [fit_to_size(torch.as_tensor(m).reshape(1, *m.shape[-images.ndim + 1 :]).float(), side) for m in masks]
            )
            region_mask = region_mask.to(device=device, non_blocking=non_blocking, **kwargs)
        seeds = self.seeds(images)
        call_kwargs = {
            "conditioning": conditioning,
            "uncond_conditioning": uncond,
            "region_mask": region_mask,
            "seed": seeds,
        }
        if self.hooks:
            call_kwargs["hooks"] = self.hooks
        return images, target, (self.autoencoder,), call_kwargs
