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
"""Latent Drifting (Yeganeh et al., arXiv 2412.20651): diffusion with a shifted latent mean.

A signed drift δ (one number, or one per channel) moves the mean of the latent distribution away from
zero, so that a model pretrained on one domain adapts to another (natural images to medical ones). The
drift is added in three places, each of which can be switched off:

- the forward process (training): ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) (ε + δ)``, i.e. ε ~ N(δ, I);
- the start of the reverse process: ``z_T = noise + δ``;
- every reverse step: ``p(x_{t-1} | x_t) = N(μ_θ(x_t, t) + δ, Σ_θ)``, a :class:`DriftHook` on the
  library's one sampling loop (:func:`monai_cfx.inferers.denoise`).

With δ = 0 the inferers here return exactly what MONAI's ``DiffusionInferer`` / ``LatentDiffusionInferer``
return.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import Any, Union

import numpy as np
import torch
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import Scheduler

from .latent_diffusion import TextGuidedLatentDiffusionInferer
from .sampling import SamplingHook, SamplingState, denoise

__all__ = ["Drift", "DriftDiffusionInferer", "DriftHook", "DriftLatentDiffusionInferer"]

DriftLike = Union["Drift", float, Sequence[float], torch.Tensor, np.ndarray]


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


class Drift:
    """Latent Drifting's δ (arXiv 2412.20651): one number for all channels, or one number per channel.

    The one owner of a drift: a value is checked once, when a ``Drift`` is made from it where it enters (an
    inferer, a hook, a fine-tuning set-up, a search grid), and the object is carried unchanged through training,
    the checkpoint (as :meth:`tolist`, which loads with ``weights_only=True``) and sampling. Making a ``Drift``
    from a ``Drift`` returns an equal one without checking again.

    Args:
        value: a number, or a non-empty sequence (or 1-d tensor / array) of numbers, all finite; or a ``Drift``.
        name: the argument name that errors show.

    Raises:
        ValueError: when ``value`` is none of those.

    Example::

        drift = Drift([0.1, -0.2, 0.0])
        noise = torch.randn(4, 3, 16, 16)
        drifted = noise + drift.tensor(noise)  # per-channel mean shift
        state = {"drift": drift.tolist()}  # [0.1, -0.2, 0.0]
    """

    __slots__ = ("values", "per_channel")

    def __init__(self, value: DriftLike = 0.0, name: str = "drift") -> None:
        if isinstance(value, Drift):
            self.values, self.per_channel = value.values, value.per_channel
            return
        raw = value.tolist() if isinstance(value, (torch.Tensor, np.ndarray)) else value  # 0-d gives a number
        if _is_number(raw):
            values, per_channel = (float(raw),), False
        elif isinstance(raw, Sequence) and not isinstance(raw, (str, bytes)) and raw and all(map(_is_number, raw)):
            values, per_channel = tuple(float(v) for v in raw), True
        else:
            raise ValueError(
                f"`{name}` must be a number or a non-empty sequence of numbers (one per channel), got {value!r}."
            )
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"`{name}` must be finite, got {value!r}.")
        self.values: tuple[float, ...] = values
        self.per_channel: bool = per_channel

    @property
    def is_zero(self) -> bool:
        """Whether δ is 0 in every channel (MONAI's diffusion, unchanged)."""
        return not any(self.values)

    def tolist(self) -> float | list[float]:
        """The plain form for checkpoints, configs and JSON: a float, or a list with one float per channel."""
        return list(self.values) if self.per_channel else self.values[0]

    def check_channels(self, channels: int, name: str = "drift", channel: str = "channel") -> None:
        """Raise a ``ValueError`` naming ``name`` unless δ is one number or has ``channels`` values (one per
        ``channel``, e.g. ``"latent channel"``)."""
        if self.per_channel and len(self.values) != channels:
            raise ValueError(
                f"`{name}` must be one number or one value per {channel} ({channels}), got {len(self.values)} "
                f"values {list(self.values)}."
            )

    def tensor(self, like: torch.Tensor) -> torch.Tensor:
        """δ as a tensor that broadcasts over ``like`` ``(B, C, *spatial)``: shape ``(1, 1, 1, ...)`` for one
        number, ``(1, C, 1, ...)`` for one value per channel, with ``like``'s dtype and device.

        Raises:
            ValueError: when a per-channel δ does not have one value per channel of ``like``.
        """
        self.check_channels(like.shape[1])
        shape = [1] * like.ndim
        shape[1] = len(self.values)
        dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
        return torch.tensor(self.values, dtype=dtype, device=like.device).reshape(shape)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Drift):
            return NotImplemented
        return (self.values, self.per_channel) == (other.values, other.per_channel)

    def __hash__(self) -> int:
        return hash((self.values, self.per_channel))

    def __repr__(self) -> str:
        return f"Drift({self.tolist()!r})"


class DriftHook(SamplingHook):
    """Shift the sample by δ after every reverse step: ``p(x_{t-1} | x_t) = N(μ_θ(x_t, t) + δ, Σ_θ)``
    (Latent Drifting, arXiv 2412.20651, the reverse-process drift).

    Usable wherever the library takes hooks (:func:`~monai_cfx.inferers.denoise`,
    ``TextGuidedLatentDiffusionInferer.sample``, ``CounterfactualInferer``).

    Args:
        drift: a :class:`Drift`, or one number for all channels, or one number per channel of the sample.

    Raises:
        ValueError: when ``drift`` is not a finite number or sequence of numbers (at construction), or does not
            have one value per channel of the sample (at the first step).

    Example::

        latent = denoise(unet, scheduler, torch.randn(4, 3, 16, 16) + 0.1, hooks=[DriftHook(0.1)])
    """

    def __init__(self, drift: DriftLike) -> None:
        self.drift = Drift(drift)
        self._tensors: dict[tuple, torch.Tensor] = {}

    def after_step(self, state: SamplingState) -> None:
        sample = state.sample
        key = (sample.ndim, sample.shape[1], sample.dtype, sample.device)
        if key not in self._tensors:
            self._tensors[key] = self.drift.tensor(sample)  # built (and checked) once per kind of sample
        # out of place: the scheduler's output may be referenced elsewhere (intermediates, other hooks)
        state.sample = sample + self._tensors[key]


class _Drift:
    """What both drift inferers share: the drift, its three switches and where each applies."""

    scheduler: Scheduler

    def _init_drift(self, drift: Any, drift_noise: bool, drift_initial: bool, drift_steps: bool) -> None:
        self.drift = drift
        for name, value in (
            ("drift_noise", drift_noise),
            ("drift_initial", drift_initial),
            ("drift_steps", drift_steps),
        ):
            if not isinstance(value, bool):
                raise ValueError(f"`{name}` must be True or False, got {value!r}.")
        self.drift_noise = drift_noise
        self.drift_initial = drift_initial
        self.drift_steps = drift_steps

    @property
    def drift(self) -> Drift:
        """δ as a :class:`Drift`; settable from a number, a per-channel sequence or a ``Drift`` (e.g. in a search)."""
        return self._drift

    @drift.setter
    def drift(self, value: DriftLike) -> None:
        self._drift = Drift(value)

    def _is_drifting(self) -> bool:
        return not self._drift.is_zero and (self.drift_noise or self.drift_initial or self.drift_steps)

    def forward_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """The forward-process noise ``ε + δ`` (given ε ~ N(0, I), it is ~ N(δ, I)); ``ε`` with ``drift_noise`` off."""
        return noise + self._drift.tensor(noise) if self.drift_noise else noise

    def initial_sample(self, input_noise: torch.Tensor) -> torch.Tensor:
        """The start of the reverse process ``z_T = noise + δ``; ``noise`` with ``drift_initial`` off."""
        return input_noise + self._drift.tensor(input_noise) if self.drift_initial else input_noise

    def sampling_hooks(self, hooks: Sequence[SamplingHook] = ()) -> list[SamplingHook]:
        """The step hooks of sampling: a :class:`DriftHook` (unless ``drift_steps`` is off), then ``hooks``.

        The drift is part of the reverse step (it shifts μ_θ), so it runs first and the user's hooks see the
        drifted sample.
        """
        return ([DriftHook(self._drift)] if self.drift_steps else []) + list(hooks)

    def training_target(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """The regression target of a training step whose forward pass was called with ``noise`` and
        ``timesteps``, for the scheduler's ``prediction_type``:

        - ``"epsilon"``: the drifted noise ``ε + δ`` (what was added, as in the paper's ε ~ N(δ, I));
        - ``"v_prediction"``: ``v = sqrt(ᾱ_t) (ε + δ) - sqrt(1 - ᾱ_t) x_0``, the velocity of the drifted noise;
        - ``"sample"``: ``x_0``, unchanged by the drift.

        With ``drift_noise`` off, ``ε`` replaces ``ε + δ``: exactly MONAI's targets.

        Args:
            original_samples: the clean ``x_0`` that the forward pass noised (the images for
                ``DriftDiffusionInferer``, the scaled latents for ``DriftLatentDiffusionInferer``); only
                ``v_prediction`` and ``sample`` use it.
            noise: the undrifted noise given to ``__call__``.
            timesteps: the timesteps given to ``__call__``.

        Returns:
            the target, shaped like ``noise``.

        Raises:
            ValueError: when the scheduler's ``prediction_type`` is none of the above.
        """
        prediction_type = getattr(self.scheduler, "prediction_type", None)
        if prediction_type == "epsilon":
            return self.forward_noise(noise)
        if prediction_type == "v_prediction":
            return self.scheduler.get_velocity(original_samples, self.forward_noise(noise), timesteps)
        if prediction_type == "sample":
            return original_samples
        raise ValueError(
            f"the scheduler's `prediction_type` must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}."
        )

    def _check_no_drift_for(self, method: str) -> None:
        if self._is_drifting():
            raise NotImplementedError(f"`{method}` does not model the drift; use it with drift=0.")

    def get_likelihood(self, *args: Any, **kwargs: Any) -> Any:
        """MONAI's likelihood, which assumes no drift: raises ``NotImplementedError`` while δ is in use."""
        self._check_no_drift_for("get_likelihood")
        return super().get_likelihood(*args, **kwargs)


class DriftDiffusionInferer(_Drift, DiffusionInferer):
    """MONAI's ``DiffusionInferer`` with Latent Drifting (Yeganeh et al., arXiv 2412.20651).

    A drift δ shifts the mean of the diffused distribution: training noises the inputs with ``ε + δ``
    (``drift_noise``), sampling starts from ``z_T = noise + δ`` (``drift_initial``) and adds δ after every
    reverse step, ``p(x_{t-1} | x_t) = N(μ_θ(x_t, t) + δ, Σ_θ)`` (``drift_steps``). Each place can be switched
    off on its own. With δ = 0 ``__call__`` and ``sample`` give exactly MONAI's outputs.

    Use it on images, or on latents drawn outside the inferer (as ``monai_cfx.engines.LatentDiffusionPrepareBatch``
    does); the loss target of a training step is :meth:`training_target`.

    Args:
        scheduler: a MONAI scheduler (``DDPMScheduler``, ``DDIMScheduler``).
        drift: δ, one number for all channels or a sequence with one number per channel.
        drift_noise: add δ to the forward-process (training) noise.
        drift_initial: add δ to the initial sample ``z_T`` of sampling.
        drift_steps: add δ after every reverse step of sampling.

    Raises:
        ValueError: when ``drift`` is not a finite number or sequence of numbers, or a switch is not a bool.

    Example::

        inferer = DriftDiffusionInferer(DDPMScheduler(1000), drift=[0.1, -0.1, 0.0])
        prediction = inferer(latents, unet, noise, timesteps, condition=context)
        loss = F.mse_loss(prediction, inferer.training_target(latents, noise, timesteps))
        inferer.scheduler.set_timesteps(50)
        samples = inferer.sample(torch.randn(4, 3, 16, 16), unet, conditioning=context)
    """

    def __init__(
        self,
        scheduler: Scheduler,
        drift: DriftLike = 0.0,
        drift_noise: bool = True,
        drift_initial: bool = True,
        drift_steps: bool = True,
    ) -> None:
        super().__init__(scheduler=scheduler)
        self._init_drift(drift, drift_noise, drift_initial, drift_steps)

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        diffusion_model: torch.nn.Module,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        condition: torch.Tensor | None = None,
        mode: str = "crossattn",
        seg: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The prediction of a training step, on ``scheduler.add_noise(inputs, noise + δ, timesteps)``.

        Args:
            inputs: clean samples ``(B, C, *spatial)``.
            diffusion_model: the denoiser.
            noise: standard normal noise like ``inputs``; δ is added here.
            timesteps: random timesteps ``(B,)``.
            condition: conditioning for the network.
            mode: ``"crossattn"`` or ``"concat"``, as MONAI's ``DiffusionInferer``.
            seg: segmentation for a SPADE diffusion model.

        Returns:
            the model's prediction; compare it with :meth:`training_target`.

        Raises:
            ValueError: when ``drift`` does not have one value per channel of ``noise``.
        """
        return super().__call__(inputs, diffusion_model, self.forward_noise(noise), timesteps, condition, mode, seg)

    @torch.no_grad()
    def sample(  # type: ignore[override]
        self,
        input_noise: torch.Tensor,
        diffusion_model: torch.nn.Module,
        scheduler: Scheduler | None = None,
        conditioning: torch.Tensor | None = None,
        uncond_conditioning: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        hooks: Sequence[SamplingHook] = (),
        verbose: bool = True,
    ) -> torch.Tensor:
        """Sample from ``z_T = input_noise + δ``, adding δ after every reverse step.

        Args:
            input_noise: standard normal noise ``(B, C, *spatial)``; δ is added here.
            diffusion_model: the denoiser.
            scheduler: overrides the inferer's scheduler (after ``set_timesteps``).
            conditioning: cross-attention context ``(B, L, D)``.
            uncond_conditioning: the unconditional context (e.g. the empty prompt's) for classifier-free guidance.
            guidance_scale: classifier-free guidance weight; 1 disables guidance.
            hooks: extra :class:`~monai_cfx.inferers.SamplingHook`\\ s, run after the drift at every step.
            verbose: show a progress bar.

        Returns:
            the samples.

        Raises:
            ValueError: when ``drift`` does not have one value per channel of ``input_noise``.
        """
        return denoise(
            diffusion_model,
            self.scheduler if scheduler is None else scheduler,
            self.initial_sample(input_noise),
            context=conditioning,
            uncond_context=uncond_conditioning,
            guidance_scale=guidance_scale,
            hooks=self.sampling_hooks(hooks),
            verbose=verbose,
        )


class DriftLatentDiffusionInferer(_Drift, TextGuidedLatentDiffusionInferer):
    """Latent diffusion with Latent Drifting (Yeganeh et al., arXiv 2412.20651): MONAI's
    ``LatentDiffusionInferer`` (through :class:`~monai_cfx.inferers.TextGuidedLatentDiffusionInferer`, so sampling
    takes an unconditional context and hooks) with the drift δ of :class:`DriftDiffusionInferer` in latent space.

    Training noises the scaled latents with ``ε + δ`` (``drift_noise``); sampling starts from
    ``z_T = noise + δ`` (``drift_initial``) and adds δ after every reverse step (``drift_steps``) before decoding.
    With δ = 0 ``__call__`` and ``sample`` give exactly MONAI's outputs.

    ``__call__`` encodes the images itself, and MONAI's ``AutoencoderKL`` samples its posterior there, so the
    latent it noised is not returned. For ``v_prediction`` (whose target needs that latent) draw the latents
    outside and train :class:`DriftDiffusionInferer` on them; the ``epsilon`` target needs no latent.

    Args:
        scheduler: a MONAI scheduler (``DDPMScheduler``, ``DDIMScheduler``).
        scale_factor: latent scaling (``1 / std`` of the training latents).
        drift: δ, one number for all latent channels or a sequence with one number per latent channel.
        drift_noise: add δ to the forward-process (training) noise.
        drift_initial: add δ to the initial latent ``z_T`` of sampling.
        drift_steps: add δ after every reverse step of sampling.
        ldm_latent_shape: spatial latent shape of the diffusion model, as MONAI's ``LatentDiffusionInferer``.
        autoencoder_latent_shape: spatial latent shape of the autoencoder, as MONAI's ``LatentDiffusionInferer``.

    Raises:
        ValueError: when ``drift`` is not a finite number or sequence of numbers, or a switch is not a bool.

    Example::

        inferer = DriftLatentDiffusionInferer(DDIMScheduler(), scale_factor=1.1, drift=0.05)
        inferer.scheduler.set_timesteps(50)
        images = inferer.sample(torch.randn(4, 3, 16, 16), autoencoder, unet, conditioning=context,
                                uncond_conditioning=text_encoder.null_context(4), guidance_scale=3.0)
    """

    def __init__(
        self,
        scheduler: Scheduler,
        scale_factor: float = 1.0,
        drift: DriftLike = 0.0,
        drift_noise: bool = True,
        drift_initial: bool = True,
        drift_steps: bool = True,
        ldm_latent_shape: list | None = None,
        autoencoder_latent_shape: list | None = None,
    ) -> None:
        super().__init__(
            scheduler=scheduler,
            scale_factor=scale_factor,
            ldm_latent_shape=ldm_latent_shape,
            autoencoder_latent_shape=autoencoder_latent_shape,
        )
        self._init_drift(drift, drift_noise, drift_initial, drift_steps)

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        autoencoder_model: torch.nn.Module,
        diffusion_model: torch.nn.Module,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        condition: torch.Tensor | None = None,
        mode: str = "crossattn",
        seg: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The prediction of a training step on the images' scaled latents noised with ``noise + δ``.

        Args:
            inputs: images ``(B, C, *spatial)``.
            autoencoder_model: the first-stage model (``AutoencoderKL`` or ``VQVAE``).
            diffusion_model: the denoiser.
            noise: standard normal noise like the (resized) latents; δ is added here.
            timesteps: random timesteps ``(B,)``.
            condition: conditioning for the network.
            mode: ``"crossattn"`` or ``"concat"``, as MONAI's ``LatentDiffusionInferer``.
            seg: segmentation for SPADE models.

        Returns:
            the model's prediction; compare it with :meth:`training_target` of the same latents.

        Raises:
            ValueError: when ``drift`` does not have one value per latent channel.
        """
        return super().__call__(
            inputs, autoencoder_model, diffusion_model, self.forward_noise(noise), timesteps, condition, mode, seg
        )

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
        """Sample latents from ``z_T = input_noise + δ``, adding δ after every reverse step, and decode them.

        Args:
            input_noise: standard normal noise of the latent shape ``(B, C_latent, *latent_spatial)``.
            autoencoder_model: the first-stage model that decodes the latents.
            diffusion_model: the denoiser.
            scheduler: overrides the inferer's scheduler (after ``set_timesteps``).
            conditioning: cross-attention context ``(B, L, D)``.
            uncond_conditioning: the unconditional context (e.g. the empty prompt's) for classifier-free guidance.
            guidance_scale: classifier-free guidance weight; 1 disables guidance.
            hooks: extra :class:`~monai_cfx.inferers.SamplingHook`\\ s, run after the drift at every step.
            verbose: show a progress bar.

        Returns:
            the decoded images.

        Raises:
            ValueError: when ``drift`` does not have one value per latent channel.
        """
        return super().sample(
            self.initial_sample(input_noise),
            autoencoder_model,
            diffusion_model,
            scheduler=scheduler,
            conditioning=conditioning,
            uncond_conditioning=uncond_conditioning,
            guidance_scale=guidance_scale,
            hooks=self.sampling_hooks(hooks),
            verbose=verbose,
        )
