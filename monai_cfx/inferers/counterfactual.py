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
"""Counterfactual image editing in latent space (VALD-MD, arXiv 2401.01414; SDEdit, Meng et al. 2022).

An image is encoded, its latent is taken part of the way back to noise (by adding noise, as SDEdit, or by
DDIM inversion) and denoised again under a *target* prompt: "this scan, healthy". The same inferer with a
finding prompt on a healthy image and a region mask induces a finding in that region only (blended latent
diffusion, Avrahami et al. 2023).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, Scheduler
from monai.transforms import SpatialPad
from monai.utils import convert_to_dst_type

from monai_cfx.networks.schedulers import (
    TIMESTEP_SPACINGS,
    DDIMInverseScheduler,
    check_num_inference_steps,
    check_strength,
    set_timestep_spacing,
    strength_steps,
)
from monai_cfx.networks.utils import (
    cross_attention_dim_of,
    downsampling_factor,
    encode_mean,
    parameter_dtype_of,
    spatial_dims_of,
)
from monai_cfx.utils import check_finite, check_option

from .sampling import GuidedStepsHook, KeepSamples, SamplingHook, SamplingState, _run_loop, seeded_noise

__all__ = ["CounterfactualInferer", "RegionBlendHook"]

START_MODES = ("noise", "inversion")


class RegionBlendHook(SamplingHook):
    """Keep the latent outside a region on the input's own trajectory (blended latent diffusion).

    After every reverse step the sample is replaced by ``mask * sample + (1 - mask) * known``, where ``known``
    is the input's latent at the noise level the step has just reached, so only the region is edited.

    Args:
        latent_mask: ``(B or 1, 1, *latent_spatial)`` weights in [0, 1]; 1 marks the editable region.
        known_latent: ``known_latent(step_index)`` returns the input's latent after reverse step ``step_index``.
    """

    def __init__(self, latent_mask: torch.Tensor, known_latent: Callable[[int], torch.Tensor]) -> None:
        self.latent_mask = latent_mask
        self.known_latent = known_latent

    def after_step(self, state: SamplingState) -> None:
        known = self.known_latent(state.step_index)
        state.sample = self.latent_mask * state.sample + (1.0 - self.latent_mask) * known


class CounterfactualInferer(Inferer):
    """Edit images towards a target prompt in the latent space of a text-conditioned latent diffusion model.

    ``inferer(images, diffusion_model, autoencoder_model, conditioning, uncond_conditioning)``:

    1. encode ``images`` (posterior mean) and scale by ``scale_factor``;
    2. go to noise level ``noise_strength`` of the ``num_inference_steps`` schedule: add seeded Gaussian noise
       (``start="noise"``, SDEdit) or DDIM-invert under ``uncond_conditioning`` (``start="inversion"``, which
       needs a ``DDIMScheduler`` and keeps more of the image at equal strength);
    3. denoise the remaining ``round(noise_strength * num_inference_steps)`` steps on the library's one
       sampling loop (:func:`monai_cfx.inferers.denoise`), conditioned on the target prompt with
       classifier-free guidance against ``uncond_conditioning`` -- the empty prompt, or a source / negative
       prompt ("... with a pleural effusion") that guidance steers away from;
    4. decode, and crop any padding away; the output keeps the input's meta data (affine included).

    With ``region_mask`` only the region is edited (disease induction: a healthy image, a finding prompt and
    the region where it should appear); outside it the latent follows the input's own trajectory at every step.

    Works in 2D and 3D. Images whose size the networks cannot divide are padded (constant, as MONAI's
    ``LatentDiffusionInferer`` pads latents) and cropped back.

    Args:
        scheduler: a MONAI scheduler (``DDIMScheduler`` for a deterministic edit, required for inversion).
        scale_factor: latent scaling of the diffusion model (``1 / std`` of the training latents).
        noise_strength: fraction of the schedule to go back, in (0, 1]; higher removes more and keeps less.
        num_inference_steps: steps of the full schedule; ``noise_strength`` selects its tail.
        start: ``"noise"`` (SDEdit) or ``"inversion"`` (DDIM inversion).
        guidance_scale: classifier-free guidance weight of the target prompt; 1 disables guidance.
        inversion_fixed_point_iterations: extra model calls per inversion step (see ``ddim_invert``).
        guided_steps: classifier-free guidance on the first ``guided_steps`` denoising steps only (later steps run
            the target prompt's branch alone, one evaluation instead of two; :class:`GuidedStepsHook`); None
            guides every step.
        timestep_spacing: ``"linspace"`` (MONAI's), ``"leading"`` (Stable Diffusion's; what a Stable Diffusion
            fine-tune's scheduler config usually names) or ``"trailing"``
            (:func:`~monai_cfx.networks.schedulers.set_timestep_spacing`; the last two need a DDIMScheduler).
        verbose: show tqdm progress bars.

    Example::

        inferer = CounterfactualInferer(DDIMScheduler(), scale_factor=1.2, noise_strength=0.5)
        healthy = text_encoder(["Normal chest radiograph."] * len(images))
        counterfactual = inferer(images, unet, autoencoder, healthy, text_encoder.null_context(len(images)), seed=0)
    """

    def __init__(
        self,
        scheduler: Scheduler,
        scale_factor: float = 1.0,
        noise_strength: float = 0.5,
        num_inference_steps: int = 50,
        start: str = "noise",
        guidance_scale: float = 3.0,
        inversion_fixed_point_iterations: int = 0,
        guided_steps: int | None = None,
        timestep_spacing: str = "linspace",
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(scheduler, (DDIMScheduler, DDPMScheduler)):
            # the edit's bookkeeping (a tail of N timesteps, T // N apart) is that of these two schedulers
            raise ValueError(
                f"`scheduler` must be a MONAI DDIMScheduler or DDPMScheduler, got {type(scheduler).__name__}."
            )
        self.scheduler = scheduler
        self.scale_factor = float(scale_factor)
        self.noise_strength = check_strength("noise_strength", noise_strength)
        self.num_inference_steps = check_num_inference_steps(scheduler, num_inference_steps)
        self.start = check_option("start", start, START_MODES)
        if start == "inversion" and not isinstance(scheduler, DDIMScheduler):
            raise ValueError(f'`start="inversion"` needs a DDIMScheduler, got {type(scheduler).__name__}.')
        self.guidance_scale = self._check_guidance_scale(guidance_scale)
        if not isinstance(inversion_fixed_point_iterations, int) or inversion_fixed_point_iterations < 0:
            raise ValueError(
                f"`inversion_fixed_point_iterations` must be an int >= 0, got {inversion_fixed_point_iterations!r}."
            )
        self.inversion_fixed_point_iterations = inversion_fixed_point_iterations
        # checked here, so that a bad value fails before any model runs
        self.guided_steps = None if guided_steps is None else GuidedStepsHook(guided_steps).guided_steps
        self.timestep_spacing = check_option("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        if timestep_spacing != "linspace":
            if not isinstance(scheduler, DDIMScheduler):
                raise ValueError(
                    f"`timestep_spacing={timestep_spacing!r}` needs a DDIMScheduler, got {type(scheduler).__name__}."
                )
            set_timestep_spacing(scheduler, self.num_inference_steps, timestep_spacing)  # refuses steps it cannot space
        self.verbose = verbose

    @staticmethod
    def _check_guidance_scale(guidance_scale: Any) -> float:
        if (
            isinstance(guidance_scale, bool)
            or not isinstance(guidance_scale, Real)
            or not math.isfinite(guidance_scale)
        ):
            raise ValueError(f"`guidance_scale` must be a finite number, got {guidance_scale!r}.")
        if guidance_scale < 0:
            raise ValueError(
                f"`guidance_scale` must be >= 0, got {guidance_scale!r}: a negative scale pushes away from the target "
                "prompt and strengthens what the counterfactual should remove."
            )
        return float(guidance_scale)

    def num_edit_steps(self, noise_strength: float | None = None) -> int:
        """Reverse steps an edit at ``noise_strength`` runs (:func:`~monai_cfx.networks.schedulers.strength_steps`:
        ``max(1, round(noise_strength * N))``); the inferer's own strength by default."""
        strength = self.noise_strength if noise_strength is None else check_strength("noise_strength", noise_strength)
        return strength_steps(strength, self.num_inference_steps)

    def num_unet_evaluations(self, guided: bool = True, noise_strength: float | None = None) -> int:
        """UNet image-evaluations one image costs (the unit of the counterfactual bundle's cost study): per edit
        step, one inversion call (``start="inversion"``, plus ``inversion_fixed_point_iterations``) and one
        denoising call, two when classifier-free guidance runs both branches (``guided`` with a ``guidance_scale``
        other than 1, as when the call gets an ``uncond_conditioning``)."""
        steps = self.num_edit_steps(noise_strength)
        inversion = steps * (1 + self.inversion_fixed_point_iterations) if self.start == "inversion" else 0
        both = min(steps, self.guided_steps if self.guided_steps is not None else steps)
        both = both if guided and self.guidance_scale != 1.0 else 0
        return inversion + steps + both

    def _check_inputs(
        self,
        inputs: torch.Tensor,
        diffusion_model: torch.nn.Module,
        autoencoder_model: torch.nn.Module,
        conditioning: torch.Tensor | None,
        uncond_conditioning: torch.Tensor | None,
        region_mask: torch.Tensor | None,
    ) -> None:
        if not isinstance(inputs, torch.Tensor) or inputs.ndim not in (4, 5) or not inputs.is_floating_point():
            shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ValueError(f"`inputs` must be a float (B, C, H, W) or (B, C, H, W, D) tensor, got {shape}.")
        check_finite("inputs", inputs)
        spatial_dims = inputs.ndim - 2
        for name, network in (("autoencoder_model", autoencoder_model), ("diffusion_model", diffusion_model)):
            network_dims = spatial_dims_of(network)
            if network_dims is not None and network_dims != spatial_dims:
                raise ValueError(
                    f"`inputs` has {spatial_dims} spatial dimensions {tuple(inputs.shape[2:])}, but `{name}` is a "
                    f"{network_dims}D network: give {network_dims}D images or a {spatial_dims}D network."
                )
        in_channels = getattr(getattr(autoencoder_model, "encoder", None), "in_channels", None)
        if in_channels is not None and inputs.shape[1] != in_channels:
            raise ValueError(
                f"`inputs` has {inputs.shape[1]} channels, but `autoencoder_model` takes {in_channels} "
                f"(shape {tuple(inputs.shape)})."
            )
        batch_size = inputs.shape[0]
        for name, value in (("conditioning", conditioning), ("uncond_conditioning", uncond_conditioning)):
            if value is not None and value.shape[0] not in (1, batch_size):
                raise ValueError(
                    f"`{name}` must have one entry per image ({batch_size}) or one for all, got {value.shape[0]} "
                    f"(shape {tuple(value.shape)})."
                )
        if uncond_conditioning is not None and conditioning is None:
            raise ValueError("`uncond_conditioning` was given without `conditioning`: guidance needs both.")
        context_dim = cross_attention_dim_of(diffusion_model)
        for name, value in (("conditioning", conditioning), ("uncond_conditioning", uncond_conditioning)):
            if value is not None and context_dim is not None and (value.ndim != 3 or value.shape[-1] != context_dim):
                raise ValueError(
                    f"`{name}` must be a (B or 1, L, {context_dim}) text context for this `diffusion_model` "
                    f"(cross_attention_dim={context_dim}), got shape {tuple(value.shape)}."
                )
        if region_mask is not None:
            if not isinstance(region_mask, torch.Tensor) or region_mask.shape[2:] != inputs.shape[2:]:
                shape = tuple(region_mask.shape) if isinstance(region_mask, torch.Tensor) else region_mask
                raise ValueError(
                    f"`region_mask` must be a (B or 1, 1, {', '.join(map(str, inputs.shape[2:]))}) tensor like "
                    f"`inputs`, got {shape}."
                )
            if region_mask.shape[0] not in (1, batch_size) or region_mask.shape[1] != 1:
                raise ValueError(
                    f"`region_mask` must have 1 channel and batch 1 or {batch_size}, got {tuple(region_mask.shape)}."
                )

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        diffusion_model: torch.nn.Module,
        autoencoder_model: torch.nn.Module,
        conditioning: torch.Tensor | None = None,
        uncond_conditioning: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
        noise_strength: float | None = None,
        seed: int | Sequence[int] | None = None,
        hooks: Sequence[SamplingHook] = (),
    ) -> torch.Tensor:
        """Return the counterfactuals of ``inputs`` (same shape and meta data).

        Args:
            inputs: images ``(B, C, *spatial)``, 2D or 3D, in the autoencoder's intensity range.
            diffusion_model: the text-conditioned denoiser (MONAI ``DiffusionModelUNet`` contract).
            autoencoder_model: MONAI ``AutoencoderKL`` (or any model with ``encode_stage_2_inputs`` /
                ``decode_stage_2_outputs``).
            conditioning: target prompt context ``(B or 1, L, D)``, e.g. the healthy prompt's.
            uncond_conditioning: the unconditional / source / negative prompt context for guidance, also
                the context of DDIM inversion.
            region_mask: optional ``(B or 1, 1, *spatial)`` mask of the region that may change.
            noise_strength: overrides the inferer's ``noise_strength`` for this call.
            seed: seed of the added noise (``start="noise"``), one for the batch or one per image; with a
                ``DDIMScheduler`` the same seed gives the same counterfactual (a ``DDPMScheduler`` also draws step
                noise from torch's global generator). None draws from the global generator. Inversion needs none.
            hooks: extra :class:`SamplingHook`\\ s (guidance, drift, prompt swap), run before region blending.
        """
        self._check_inputs(inputs, diffusion_model, autoencoder_model, conditioning, uncond_conditioning, region_mask)
        # float64 / float16 images and contexts are cast to the networks' own float type (safe for images in the
        # autoencoder's range; MONAI's layers refuse mixed types); the output keeps the input's type
        input_dtype, dtype = inputs.dtype, parameter_dtype_of(diffusion_model)
        if dtype is not None and input_dtype != dtype:
            inputs = inputs.to(dtype)
        if dtype is not None:
            conditioning = conditioning.to(dtype) if conditioning is not None else None
            uncond_conditioning = uncond_conditioning.to(dtype) if uncond_conditioning is not None else None
        num_steps = self.num_edit_steps(noise_strength)
        device = inputs.device
        batch_size = inputs.shape[0]
        if conditioning is not None:
            conditioning = conditioning.expand(batch_size, *conditioning.shape[1:])
        if uncond_conditioning is not None:
            uncond_conditioning = uncond_conditioning.expand(batch_size, *uncond_conditioning.shape[1:])

        # pad so that the autoencoder and the UNet can divide the size, crop back after decoding
        factor = downsampling_factor(autoencoder_model) * downsampling_factor(diffusion_model)
        original_size = tuple(inputs.shape[2:])
        padded_size = tuple(math.ceil(s / factor) * factor for s in original_size)
        # pad at the end of each axis so that cropping back is a plain slice (a centred pad of an odd amount
        # and MONAI's centred crop disagree by one pixel)
        padder = SpatialPad(padded_size, method="end") if padded_size != original_size else None
        images = torch.as_tensor(inputs)  # plain tensor: the meta data is put back on the output
        if padder is not None:
            images = torch.stack([torch.as_tensor(padder(i)) for i in images])

        with torch.no_grad():
            clean_latent = encode_mean(autoencoder_model, images) * self.scale_factor
            if self.timestep_spacing == "linspace":
                self.scheduler.set_timesteps(self.num_inference_steps)
            else:  # the inversion below reads the same (shared) schedule
                set_timestep_spacing(self.scheduler, self.num_inference_steps, self.timestep_spacing)
            timesteps = self.scheduler.timesteps[self.num_inference_steps - num_steps :]
            trajectory: list[torch.Tensor] = []
            noise = None
            if self.start == "inversion":
                # the inversion runs the head of the schedule that the edit denoises back (the same num_steps)
                inverse = DDIMInverseScheduler(self.scheduler)
                kept = KeepSamples() if region_mask is not None else None  # only region blending needs the path
                noisy_latent = _run_loop(
                    diffusion_model,
                    inverse,
                    clean_latent,
                    inverse.timesteps[:num_steps],
                    context=uncond_conditioning if uncond_conditioning is not None else conditioning,
                    hooks=[kept] if kept is not None else [],
                    fixed_point_iterations=self.inversion_fixed_point_iterations,
                    progress_description="DDIM inversion" if self.verbose else None,
                )
                if kept is not None:
                    trajectory = [clean_latent, *(kept.samples[i] for i in range(num_steps))]
            else:
                noise = self._noise(clean_latent, seed)
                noisy_latent = self.scheduler.add_noise(clean_latent, noise, timesteps[:1].to(device))

            all_hooks = list(hooks)
            if self.guided_steps is not None:
                all_hooks.insert(0, GuidedStepsHook(self.guided_steps))  # first: later hooks see the step's scale
            if region_mask is not None:
                all_hooks.append(
                    self._region_blend_hook(region_mask, padder, clean_latent, noise, trajectory, timesteps)
                )
            latent = _run_loop(
                diffusion_model,
                self.scheduler,
                noisy_latent,
                timesteps,
                context=conditioning,
                uncond_context=uncond_conditioning,
                guidance_scale=self.guidance_scale,
                hooks=all_hooks,
                progress_description="sampling" if self.verbose else None,
            )
            decoded = autoencoder_model.decode_stage_2_outputs(latent / self.scale_factor)
        if padder is not None:
            decoded = decoded[(slice(None), slice(None), *(slice(0, size) for size in original_size))]
        result = convert_to_dst_type(decoded, inputs)[0] if isinstance(inputs, MetaTensor) else decoded
        return result.to(input_dtype)

    @staticmethod
    def _noise(latent: torch.Tensor, seed: int | Sequence[int] | None) -> torch.Tensor:
        """Gaussian noise like ``latent``, drawn on the CPU so that a seed gives the same noise on every device."""
        if seed is None:
            return torch.randn_like(latent)
        if isinstance(seed, torch.Tensor):
            seed = seed.tolist()
        if isinstance(seed, Sequence):
            if len(seed) != latent.shape[0]:
                raise ValueError(f"`seed` must be one int or one per image ({latent.shape[0]}), got {len(seed)} seeds.")
            return seeded_noise(latent.shape[1:], seed, latent.dtype, latent.device)
        generator = torch.Generator().manual_seed(int(seed))
        return torch.randn(latent.shape, generator=generator, dtype=latent.dtype).to(latent.device)

    def _region_blend_hook(
        self,
        region_mask: torch.Tensor,
        padder: SpatialPad | None,
        clean_latent: torch.Tensor,
        noise: torch.Tensor | None,
        trajectory: list[torch.Tensor],
        timesteps: torch.Tensor,
    ) -> RegionBlendHook:
        mask = torch.as_tensor(region_mask, dtype=clean_latent.dtype, device=clean_latent.device)
        if padder is not None:
            mask = torch.stack([torch.as_tensor(padder(m)) for m in mask])
        # a latent cell is editable if any of its pixels is: the region is never shrunk by the down-sampling
        latent_mask = (F.interpolate(mask, size=clean_latent.shape[2:], mode="area") > 0).to(clean_latent.dtype)
        step_size = self.scheduler.num_train_timesteps // self.num_inference_steps
        num_steps = len(timesteps)

        def known_latent(step_index: int) -> torch.Tensor:
            if trajectory:  # inversion: the input's own latent at the level this step reached
                return trajectory[num_steps - 1 - step_index]
            level = int(timesteps[step_index]) - step_size
            if level < 0:
                return clean_latent
            return self.scheduler.add_noise(clean_latent, noise, torch.tensor([level], device=clean_latent.device))

        return RegionBlendHook(latent_mask, known_latent)
