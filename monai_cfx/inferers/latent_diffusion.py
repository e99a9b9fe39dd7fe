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
"""Text-guided latent diffusion sampling on top of MONAI's ``LatentDiffusionInferer``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.data import decollate_batch
from monai.inferers import LatentDiffusionInferer
from monai.networks.schedulers import Scheduler

from .sampling import SamplingHook, denoise, seeded_noise

__all__ = ["TextGuidedLatentDiffusionInferer", "sample_prompts"]


class TextGuidedLatentDiffusionInferer(LatentDiffusionInferer):
    """MONAI's ``LatentDiffusionInferer`` whose ``sample`` runs classifier-free guidance against a real
    unconditional context (the empty prompt's embedding) instead of MONAI's constant fill value, and
    accepts step hooks. Training (``__call__``) is MONAI's, unchanged.

    Without ``uncond_conditioning`` (or with ``guidance_scale=1``) and without hooks, ``sample`` returns
    exactly what ``LatentDiffusionInferer.sample`` returns for the same seed.

    Example::

        inferer = TextGuidedLatentDiffusionInferer(DDIMScheduler(), scale_factor=1.1)
        inferer.scheduler.set_timesteps(50)
        context, _ = text_encoder.encode(["Chest radiograph with cardiomegaly."] * 4)
        images = inferer.sample(torch.randn(4, 3, 16, 16), autoencoder, unet, conditioning=context,
                                uncond_conditioning=text_encoder.null_context(4), guidance_scale=3.0)
    """

    @torch.no_grad()
    def sample(  # type: ignore[override]
        self,
        input_noise: torch.Tensor,
        autoencoder_model: torch.nn.Module,
        diffusion_model: torch.nn.Module,
        scheduler: Scheduler | None = None,
        conditioning: torch.Tensor | None = None,
        uncond_conditioning: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        hooks: Sequence[SamplingHook] = (),
        verbose: bool = True,
    ) -> torch.Tensor:
        """Denoise ``input_noise`` in latent space and decode it (see :func:`monai_cfx.inferers.denoise`)."""
        scheduler = scheduler or self.scheduler
        latent = denoise(
            diffusion_model,
            scheduler,
            input_noise,
            context=conditioning,
            uncond_context=uncond_conditioning,
            guidance_scale=guidance_scale,
            hooks=hooks,
            verbose=verbose,
        )
        return self.decode(latent, autoencoder_model)

    def decode(self, latent: torch.Tensor, autoencoder_model: torch.nn.Module) -> torch.Tensor:
        """Undo the latent scaling (and any padding MONAI's inferer added) and decode to image space."""
        if self.autoencoder_latent_shape is not None:
            latent = torch.stack([self.autoencoder_resizer(i) for i in decollate_batch(latent)], 0)
        return autoencoder_model.decode_stage_2_outputs(latent / self.scale_factor)


@torch.no_grad()
def sample_prompts(
    sample: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    text_encoder: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    latent_shape: Sequence[int],
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """One sample per prompt, in batches: item ``i`` starts from :func:`~monai_cfx.inferers.seeded_noise` of
    ``seeds[i]`` (so it does not depend on the batch it falls in) and is conditioned on ``prompts[i]`` against the
    empty prompt. The batched sampling of the library's generators (images, Latent Drifting samples, DreamBooth's
    prior latents); what a batch becomes is ``sample``'s choice.

    Args:
        sample: ``sample(noise, context, uncond_context)`` for one batch, e.g. a ``TextGuidedLatentDiffusionInferer``'s
            ``sample`` (images) or :func:`~monai_cfx.inferers.denoise` (latents), with its guidance and hooks bound.
        text_encoder: a :class:`~monai_cfx.networks.nets.TextEncoder` (``text_encoder(prompts)``, ``null_context(n)``).
        prompts: one prompt per sample.
        seeds: one noise seed per sample.
        latent_shape: ``(C, *spatial)`` of the initial noise.
        batch_size: samples per call of ``sample``.
        device: where the noise and the contexts go.

    Returns:
        ``(len(prompts), ...)``: the batches' results, concatenated on the CPU.

    Example::

        images = sample_prompts(
            lambda noise, text, empty: inferer.sample(noise, autoencoder, unet, conditioning=text,
                                                      uncond_conditioning=empty, guidance_scale=3.0, verbose=False),
            text_encoder, prompts, seeds=range(len(prompts)), latent_shape=(3, 16, 16))
    """
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError(f"`prompts` must be a non-empty list of strings, got {prompts!r}.")
    seeds = list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"`seeds` must have one entry per prompt ({len(prompts)}), got {len(seeds)}.")
    results = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        noise = seeded_noise(latent_shape, seeds[start : start + batch_size], device=device)
        context = text_encoder(batch).to(device)
        uncond_context = text_encoder.null_context(len(batch)).to(device)
        results.append(sample(noise, context, uncond_context).cpu())
    return torch.cat(results)
