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
"""Batch preparation that lets MONAI's ``SupervisedEvaluator`` run a :class:`CrossAttentionGroundingInferer`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.engines import PrepareBatch
from monai.utils import CommonKeys

from .checks import check_reconstruction

__all__ = ["GroundingPrepareBatch"]


class GroundingPrepareBatch(PrepareBatch):
    """Turn a batch of one image with its prompt and phrase tokens (from :class:`~monai_cfx.transforms.PhraseTokensd`)
    into the arguments of a ``CrossAttentionGroundingInferer``.

    ``SupervisedEvaluator(network=diffusion_unet, inferer=CrossAttentionGroundingInferer(...), prepare_batch=this)``
    then calls ``inferer(image, diffusion_unet, autoencoder, conditioning=..., uncond_conditioning=...,
    token_indices=...)``: all phrases of the image share one inversion. Images with different prompts cannot share
    an inversion, so the batch size must be 1 unless every image of the batch has the same prompt and phrases.

    Args:
        autoencoder: the latent diffusion model's autoencoder.
        text_encoder: a :class:`~monai_cfx.networks.nets.TextEncoder`.
        uncond_prompt: prompt of the unconditional branch; ``""`` uses the empty prompt.
        prompt_key, tokens_key: batch keys of the prompts and the ``(B, P, L)`` phrase tokens.
        target_key: batch key returned as the evaluator's label, if present (e.g. the phrases' box masks).
        max_reconstruction_mse: refuse images whose autoencoder round trip has a larger mean squared error (the
            out-of-distribution check, :func:`~monai_cfx.engines.check_reconstruction`); ``None`` skips it.
    """

    def __init__(
        self,
        autoencoder: torch.nn.Module,
        text_encoder: Any,
        uncond_prompt: str = "",
        prompt_key: str = "prompt",
        tokens_key: str = "phrase_tokens",
        target_key: str | None = "phrase_mask",
        image_key: str = CommonKeys.IMAGE,
        max_reconstruction_mse: float | None = None,
    ) -> None:
        self.max_reconstruction_mse = max_reconstruction_mse
        self.autoencoder = autoencoder.eval()
        self.text_encoder = text_encoder
        self.uncond_prompt = uncond_prompt
        self.prompt_key, self.tokens_key, self.target_key, self.image_key = (
            prompt_key,
            tokens_key,
            target_key,
            image_key,
        )

    def __call__(
        self,
        batchdata: dict[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Sequence, dict]:
        missing = {self.image_key, self.prompt_key, self.tokens_key} - set(batchdata)
        if missing:
            raise ValueError(f"the batch lacks {sorted(missing)} (keys: {sorted(batchdata)}); run PhraseTokensd first.")
        images = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        check_reconstruction(self.autoencoder, images, self.max_reconstruction_mse)
        prompts = batchdata[self.prompt_key]
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tokens = torch.as_tensor(batchdata[self.tokens_key]).bool()
        if tokens.ndim == 2:
            tokens = tokens[None]
        if len(set(prompts)) > 1 or not (tokens == tokens[:1]).all():
            raise ValueError(
                "the images of a batch share one inversion, so they need the same prompt and phrases; use "
                f"batch_size 1 for per-image phrases (got {len(prompts)} prompts: {prompts!r})."
            )
        token_indices = [row.nonzero().flatten().tolist() for row in tokens[0]]
        batch_size = images.shape[0]
        with torch.no_grad():
            conditioning = self.text_encoder(prompts[:1]).to(device)
            if self.uncond_prompt:
                uncond = self.text_encoder([self.uncond_prompt]).to(device)
            else:
                uncond = self.text_encoder.null_context(1).to(device)
        target = batchdata.get(self.target_key) if self.target_key is not None else None
        if isinstance(target, torch.Tensor):
            target = target.to(device=device, non_blocking=non_blocking, **kwargs)
        call_kwargs = {
            "conditioning": conditioning.expand(batch_size, *conditioning.shape[1:]),
            "uncond_conditioning": uncond.expand(batch_size, *uncond.shape[1:]),
            "token_indices": token_indices,
        }
        return images, target, (self.autoencoder,), call_kwargs
